"""LSGAN helpers, MIND structure loss and the image pool."""

from __future__ import annotations

import pytest
import torch

from medcycle.losses import (
    ImagePool,
    MINDLoss,
    adversarial_loss,
    discriminator_adv_loss,
    generator_adv_loss,
    mind_descriptor,
)


def _phantom(batch: int = 2, channels: int = 1, size: int = 32) -> torch.Tensor:
    """Smooth shapes in [0, 1]: an ellipse, a bright square, a gentle gradient."""
    axis = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    img = 0.3 * (((yy - 15) / 11) ** 2 + ((xx - 16) / 8) ** 2 < 1).float()
    img = img + 0.5 * ((yy - 9).abs() < 3).float() * ((xx - 20).abs() < 3).float() + 0.2 * xx / size
    img = img.clamp(0, 1)
    return img.expand(batch, channels, size, size).clone()


def _shifted(x: torch.Tensor, pixels: int) -> torch.Tensor:
    return torch.roll(x, shifts=(pixels, pixels), dims=(-2, -1))


# ----------------------------------------------------------------------------------------- LSGAN


def test_lsgan_by_hand() -> None:
    loss = adversarial_loss()
    ones, zeros = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4)
    assert generator_adv_loss(loss, ones).item() == 0.0
    assert generator_adv_loss(loss, zeros).item() == pytest.approx(1.0)
    assert generator_adv_loss(loss, torch.full((1, 1, 3, 3), 0.5)).item() == pytest.approx(0.25)
    assert discriminator_adv_loss(loss, ones, zeros).item() == 0.0
    assert discriminator_adv_loss(loss, zeros, ones).item() == pytest.approx(1.0)
    # 0.5 * ((0.5 - 1)^2 + 0.5^2) = 0.25
    half = torch.full((1, 1, 3, 3), 0.5)
    assert discriminator_adv_loss(loss, half, half).item() == pytest.approx(0.25)


def test_lsgan_bf16_and_grad() -> None:
    loss = adversarial_loss()
    pred = torch.zeros(1, 1, 3, 3, dtype=torch.bfloat16, requires_grad=True)
    out = generator_adv_loss(loss, pred)
    assert out.dtype == torch.float32
    out.backward()
    assert pred.grad is not None


# ------------------------------------------------------------------------------------------ MIND


def test_mind_zero_for_identical_and_affine_contrast() -> None:
    mind = MINDLoss()
    x = _phantom()
    assert mind(x, x).item() == 0.0
    assert mind(x, -2 * x + 1).item() < 1e-5  # inverted contrast, still the same structure
    assert mind(x, 3 * x - 0.7).item() < 1e-5
    assert mind(x, _shifted(x, 3)).item() > 0.02


def test_mind_grows_with_shift_and_descriptor_range() -> None:
    mind = MINDLoss()
    x = _phantom()
    values = [mind(x, _shifted(x, s)).item() for s in (0, 1, 3)]
    assert values[0] < 1e-7 < values[1]
    assert values[2] > 0.02
    d = mind_descriptor(x)
    assert d.shape == (2, 1, 4, 32, 32)
    assert d.min() > 0 and d.max() <= 1.0 + 1e-6
    assert torch.allclose(d.amax(dim=2), torch.ones(()))


def test_mind_batches_channels_flat_images_and_grad() -> None:
    x = _phantom(batch=2, channels=3)
    y = (x + 0.05 * torch.randn_like(x)).requires_grad_(True)
    loss = MINDLoss()(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y.grad).all()
    flat = torch.zeros(1, 1, 8, 8, requires_grad=True)
    out = MINDLoss()(flat, flat)
    out.backward()
    assert out.item() == 0.0 and torch.isfinite(flat.grad).all()
    z = x.clone()  # every channel counts
    z[:, 0] = _shifted(x[:, 0], 3)
    assert MINDLoss()(x, z).item() > 0.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert MINDLoss()(x.bfloat16(), y.bfloat16()).dtype == torch.float32


def test_mind_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        MINDLoss()(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="expects .B, C, H, W."):
        mind_descriptor(torch.zeros(8, 8))


# ------------------------------------------------------------------------------------ image pool


def test_pool_size_zero_is_identity() -> None:
    pool = ImagePool(0)
    x = torch.rand(3, 1, 4, 4)
    assert pool.query(x) is x
    assert pool.state_dict() == {"size": 0, "images": None}


def test_pool_fills_then_mixes() -> None:
    pool = ImagePool(4)
    first = torch.rand(3, 1, 4, 4, requires_grad=True)
    out = pool.query(first)
    assert torch.equal(out, first.detach()) and not out.requires_grad and len(pool) == 3
    second = torch.rand(3, 1, 4, 4)
    out = pool.query(second)
    assert len(pool) == 4
    assert torch.equal(out[0], second[0])  # fourth image still fills the pool
    history = torch.cat([first.detach(), second])
    for _ in range(20):
        batch = torch.rand(2, 1, 4, 4)
        out = pool.query(batch)
        history = torch.cat([history, batch])
        for image in out:  # every output is a new image or one seen before
            assert any(torch.equal(image, h) for h in history)
    assert len(pool) == 4


def test_pool_state_round_trip_reproduces_outputs() -> None:
    pool = ImagePool(5)
    for _ in range(4):
        pool.query(torch.rand(2, 1, 4, 4))
    state = pool.state_dict()
    assert state["images"].shape == (5, 1, 4, 4)
    rng = torch.get_rng_state()
    batches = [torch.rand(2, 1, 4, 4) for _ in range(6)]
    torch.set_rng_state(rng)
    expected = [pool.query(b) for b in batches]

    restored = ImagePool(5)
    restored.load_state_dict(state)
    torch.set_rng_state(rng)
    got = [restored.query(b) for b in batches]
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(e, b) for e, b in zip(expected, batches, strict=True))  # the pool mixed
    with pytest.raises(ValueError, match="size mismatch"):
        ImagePool(3).load_state_dict(state)
