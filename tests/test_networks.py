"""Generators and discriminators: shapes, ranges, parity with the reference CycleGAN networks."""

from __future__ import annotations

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


@pytest.mark.parametrize("k", [1, 3])
def test_generator_shape_and_range(k: int) -> None:
    g = build_generator(k, width=4, n_blocks=1)
    x = torch.rand(2, k, 24, 32) * 2 - 1
    y = g(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all() and y.abs().max() <= 1.0
    y.mean().backward()
    assert all(p.grad is not None for p in g.parameters())


@pytest.mark.parametrize("width,blocks,k", [(32, 6, 1), (64, 9, 1), (64, 9, 3), (8, 0, 3)])
def test_resnet_parameter_count_matches_reference(width: int, blocks: int, k: int) -> None:
    assert n_params(build_generator(k, width, blocks)) == n_params(ResnetGenerator(k, k, width, blocks))


def test_resnet_matches_reference_numerically() -> None:
    ours, ref = build_generator(3, width=4, n_blocks=2), ResnetGenerator(3, 3, ngf=4, n_blocks=2)
    pairs = list(zip(ours.parameters(), ref.parameters(), strict=True))
    with torch.no_grad():
        for a, b in pairs:
            assert a.shape == b.shape
            b.copy_(a)
    x = torch.rand(1, 3, 16, 20) * 2 - 1
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("out_channels,phases", [(1, 4), (3, 2), (4, 2), (5, 1)])
def test_phase_shuffle_conv_equals_the_plain_convolution(out_channels: int, phases: int) -> None:
    from medcycle.networks.generators import PhaseShuffleConv2d

    torch.manual_seed(0)
    fast = PhaseShuffleConv2d(6, out_channels, 7)
    plain = torch.nn.Conv2d(6, out_channels, 7)
    plain.load_state_dict(fast.state_dict())  # same parameters, same state-dict keys
    assert fast.phases == phases
    for size in (30, 31):  # 24 x 24 output: the phase path; 25 x 25: not divisible, the plain path
        x = torch.randn(2, 6, size, size, requires_grad=True)
        x_plain = x.detach().clone().requires_grad_()
        y, y_plain = fast(x), plain(x_plain)
        torch.testing.assert_close(y, y_plain, atol=1e-5, rtol=1e-5)
        grad = torch.randn_like(y)
        y.backward(grad)
        y_plain.backward(grad)
        torch.testing.assert_close(x.grad, x_plain.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.weight.grad, plain.weight.grad, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.bias.grad, plain.bias.grad, atol=1e-4, rtol=1e-4)
        fast.zero_grad()
        plain.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.randn(1, 6, 30, 30)
        torch.testing.assert_close(fast(x).float(), plain(x).float(), atol=2e-2, rtol=2e-2)


def test_resnet_generator_last_layer_takes_the_phase_path() -> None:
    from medcycle.networks.generators import PhaseShuffleConv2d

    g = build_generator(1, width=4, n_blocks=1)
    heads = [m for m in g.modules() if isinstance(m, PhaseShuffleConv2d)]
    assert len(heads) == 1 and heads[0].phases == 4
    assert all(not name.endswith("phase_index") for name in g.state_dict())  # checkpoints keep their keys
    calls = []
    handle = torch.nn.functional.pixel_shuffle
    try:
        torch.nn.functional.pixel_shuffle = lambda t, r: calls.append(r) or handle(t, r)
        g(torch.rand(1, 1, 16, 16))
    finally:
        torch.nn.functional.pixel_shuffle = handle
    assert calls == [4]


def test_known_reference_count() -> None:
    # pytorch-CycleGAN-and-pix2pix prints "Total number of parameters : 11.378 M" for RGB resnet_9blocks
    assert n_params(build_generator(3)) == 11_378_179


def test_generator_channels_last_and_bf16_autocast() -> None:
    g = build_generator(3, width=4, n_blocks=1).to(memory_format=torch.channels_last)
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).to(memory_format=torch.channels_last)
    ref = g(x.contiguous())
    y = g(x)
    torch.testing.assert_close(y.contiguous(), ref, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = g(x)
    assert z.shape == x.shape and torch.isfinite(z.float()).all()
    z.float().mean().backward()


def test_network_sizes_and_errors() -> None:
    d = build_discriminator(3, width=4, n_layers=2)
    side = patchgan_output_size(32, 2)
    assert d(torch.zeros(1, 3, 32, 32)).shape == (1, 1, side, side)
    with pytest.raises(ValueError, match="generator channels must be >= 1"):
        build_generator(0)


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
