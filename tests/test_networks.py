"""Generators and discriminators: shapes, ranges, parity with the reference CycleGAN networks."""

from __future__ import annotations

import types

import pytest
import torch

from medcycle.networks import (
    PatchGANDiscriminator,
    build_discriminator,
    build_generator,
    patchgan_output_size,
    patchgan_receptive_field,
)

try:
    from tests.reference_cyclegan import NLayerDiscriminator, ResnetGenerator, n_params
except ModuleNotFoundError:  # `pytest` run without the repository root on sys.path
    from reference_cyclegan import NLayerDiscriminator, ResnetGenerator, n_params  # type: ignore[no-redef]


@pytest.mark.parametrize("kind", ["resnet", "unet"])
@pytest.mark.parametrize("k", [1, 3])
def test_generator_shape_and_range(kind: str, k: int) -> None:
    g = build_generator(kind, k, width=4, n_blocks=1)
    x = torch.rand(2, k, 24, 32) * 2 - 1
    y = g(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.abs().max() <= 1.0
    y.mean().backward()
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("width,blocks,k", [(32, 6, 1), (64, 9, 1), (64, 9, 3), (8, 0, 3)])
def test_resnet_parameter_count_matches_reference(width: int, blocks: int, k: int) -> None:
    assert n_params(build_generator("resnet", k, width, blocks)) == n_params(ResnetGenerator(k, k, width, blocks))


def test_resnet_matches_reference_numerically() -> None:
    ours, ref = build_generator("resnet", 3, width=4, n_blocks=2), ResnetGenerator(3, 3, ngf=4, n_blocks=2)
    pairs = list(zip(ours.parameters(), ref.parameters(), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            assert a.shape == b.shape
            b.copy_(a)
    x = torch.rand(1, 3, 16, 20) * 2 - 1
    torch.testing.assert_close(ours(x), ref(x))


def test_known_reference_count() -> None:
    # pytorch-CycleGAN-and-pix2pix prints "Total number of parameters : 11.378 M" for RGB resnet_9blocks
    assert n_params(build_generator("resnet", 3)) == 11_378_179


@pytest.mark.parametrize("kind", ["resnet", "unet"])
def test_generator_channels_last_and_bf16_autocast(kind: str) -> None:
    g = build_generator(kind, 3, width=4, n_blocks=1).to(memory_format=torch.channels_last)
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).to(memory_format=torch.channels_last)
    ref = g(x.contiguous())
    y = g(x)
    torch.testing.assert_close(y.contiguous(), ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = g(x)
    assert z.shape == x.shape and torch.isfinite(z.float()).all()
    z.float().mean().backward()


def test_generator_from_config_and_errors() -> None:
    cfg = types.SimpleNamespace(generator="unet", gen_width=4, gen_blocks=9, disc_width=4, disc_layers=2)
    assert type(build_generator(cfg, 1)).__name__ == "UNetGenerator"
    d = build_discriminator(cfg, 3)
    side = patchgan_output_size(32, 2)
    assert d(torch.zeros(1, 3, 32, 32)).shape == (1, 1, side, side)
    with pytest.raises(ValueError, match="unknown generator kind"):
        build_generator("vit", 1)


@pytest.mark.parametrize("k", [1, 3])
def test_discriminator_returns_single_map_like_reference(k: int) -> None:
    d = build_discriminator(k, width=4)
    assert isinstance(d, PatchGANDiscriminator)
    assert n_params(d) == n_params(NLayerDiscriminator(k, ndf=4))
    x = torch.rand(2, k, 64, 48)
    out = d(x)
    assert isinstance(out, torch.Tensor)
    assert out.shape == NLayerDiscriminator(k, ndf=4)(x).shape == (2, 1, 6, 4)
    assert out.shape[-2:] == (patchgan_output_size(64), patchgan_output_size(48))


def test_discriminator_full_size_parity() -> None:
    assert n_params(build_discriminator(1)) == n_params(NLayerDiscriminator(1)) == 2_762_689
    assert patchgan_receptive_field(3) == 70
    assert patchgan_output_size(256) == 30


def test_discriminator_receptive_field_is_70() -> None:
    # instance norm couples all pixels, so measure the conv stack's window with the norms removed
    d = build_discriminator(1, width=2)
    for name, module in list(d.named_modules()):
        if isinstance(module, torch.nn.InstanceNorm2d):
            parent = d.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], torch.nn.Identity())
    x = torch.rand(1, 1, 96, 96, requires_grad=True)
    d(x)[0, 0, 5, 5].backward()
    grad = x.grad[0, 0].abs()
    rows = grad.sum(1).nonzero().flatten()
    cols = grad.sum(0).nonzero().flatten()
    assert rows.numel() == cols.numel() == patchgan_receptive_field(3) == 70
    assert (rows[0].item(), rows[-1].item()) == (5 * 8 - 23, 5 * 8 - 23 + 69)


def test_discriminator_channels_last_and_bf16_autocast() -> None:
    d = build_discriminator(3, width=4).to(memory_format=torch.channels_last)
    x = torch.rand(1, 3, 32, 32).to(memory_format=torch.channels_last)
    torch.testing.assert_close(d(x).contiguous(), d(x.contiguous()), atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = d(x)
    assert out.shape == (1, 1, 2, 2) and torch.isfinite(out.float()).all()
