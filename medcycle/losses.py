"""Losses of the MR <-> CT CycleGAN and the discriminators' image history.

* Adversarial: least-squares GAN (Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017)
  through MONAI ``PatchAdversarialLoss``, as in CycleGAN (Zhu et al., "Unpaired Image-to-Image
  Translation using Cycle-Consistent Adversarial Networks", ICCV 2017).
* Structure: L1 between MIND descriptors (Heinrich et al., "MIND: Modality independent neighbourhood
  descriptor for multi-modal deformable registration", Medical Image Analysis 16(7), 2012) of the MR and
  the synthetic CT, the structure-consistency loss of Yang et al., "Unpaired Brain MR-to-CT Synthesis
  using a Structure-Constrained CycleGAN" (DLMIA, MICCAI workshops 2018).
* Gradient consistency: 1 - gradient correlation (Hiasa et al., "Cross-modality image synthesis from
  unpaired data using CycleGAN: Effects of gradient consistency loss and training data size",
  SASHIMI, MICCAI workshops 2018; gradient correlation after Penney et al., IEEE TMI 1998).
* ``ImagePool``: the history of generated images shown to the discriminators (Shrivastava et al.,
  "Learning from Simulated and Unsupervised Images through Adversarial Training", CVPR 2017), with the
  size-50 buffer of the CycleGAN reference implementation.

The structure and gradient losses are computed in float32 (outside autocast) on ``(B, C, H, W)``
batches; each channel is treated as a separate 2D image.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = [
    "GradientConsistencyLoss",
    "ImagePool",
    "MINDLoss",
    "adversarial_loss",
    "discriminator_adv_loss",
    "generator_adv_loss",
    "mind_descriptor",
]


# --------------------------------------------------------------------------------------------------
# Adversarial (LSGAN)
# --------------------------------------------------------------------------------------------------


def adversarial_loss() -> PatchAdversarialLoss:
    """The LSGAN criterion: MONAI ``PatchAdversarialLoss`` (mean squared error to 1 / 0, no activation)."""
    return PatchAdversarialLoss(reduction="mean", criterion="least_squares", no_activation_leastsq=True)


def generator_adv_loss(loss: PatchAdversarialLoss, pred: torch.Tensor) -> torch.Tensor:
    """Generator term ``mean((D(G(x)) - 1)^2)`` for the discriminator prediction map ``pred`` (float32)."""
    return loss(pred.float(), target_is_real=True, for_discriminator=False)


def discriminator_adv_loss(
    loss: PatchAdversarialLoss, pred_real: torch.Tensor, pred_fake: torch.Tensor
) -> torch.Tensor:
    """Discriminator term ``0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2))``, as in the reference."""
    real = loss(pred_real.float(), target_is_real=True, for_discriminator=True)
    fake = loss(pred_fake.float(), target_is_real=False, for_discriminator=True)
    return 0.5 * (real + fake)


# --------------------------------------------------------------------------------------------------
# MIND structure loss
# --------------------------------------------------------------------------------------------------

Neighbourhood = Literal["four", "six", "dense"]


def _offsets(neighbourhood: str, radius: int) -> list[tuple[int, int]]:
    """Search offsets ``(dy, dx)``: the 4-neighbourhood at distance ``radius`` or all in the square."""
    if neighbourhood in ("four", "six"):
        return [(-radius, 0), (radius, 0), (0, -radius), (0, radius)]
    if neighbourhood == "dense":
        span = range(-radius, radius + 1)
        return [(dy, dx) for dy in span for dx in span if (dy, dx) != (0, 0)]
    raise ValueError(f"unknown MIND neighbourhood {neighbourhood!r}; expected 'four' ('six') or 'dense'")


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian of half-width ``ceil(1.5 sigma)`` (the size used by Heinrich's code)."""
    half = max(1, math.ceil(1.5 * sigma))
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _shift(img: torch.Tensor, dy: int, dx: int, pad: int) -> torch.Tensor:
    """``out[y, x] = img[y + dy, x + dx]`` with replicated borders; ``img`` is ``(N, 1, H, W)``."""
    h, w = img.shape[-2:]
    p = F.pad(img, (pad, pad, pad, pad), mode="replicate")
    return p[..., pad + dy : pad + dy + h, pad + dx : pad + dx + w]


def _smooth(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter with replicated borders on ``(N, M, H, W)`` (each channel alone)."""
    m = img.shape[1]
    r = kernel.numel() // 2
    kx = kernel.to(img).view(1, 1, 1, -1).expand(m, 1, 1, -1)
    ky = kernel.to(img).view(1, 1, -1, 1).expand(m, 1, -1, 1)
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), kx, groups=m)
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), ky, groups=m)


def mind_descriptor(
    image: torch.Tensor, radius: int = 1, sigma: float = 0.5, neighbourhood: Neighbourhood = "four"
) -> torch.Tensor:
    """MIND descriptor of 2D images (Heinrich et al. 2012, Eq. 4).

    ``MIND(I, x, r) = exp(-D_p(I, x, x + r) / V(I, x)) / max_r(...)`` where ``D_p`` is the
    Gaussian-weighted (``sigma``) patch SSD between the patch at x and at x + r, and ``V`` the mean of
    ``D_p`` over the four nearest neighbours (the 2D six-neighbourhood). ``V`` is clamped to
    ``[1e-3, 1e3] * mean(V)`` per image -- relative bounds, so that the descriptor is exactly invariant
    to affine intensity changes ``a * I + b`` (Heinrich's code uses ``sqrt(mean V)`` and ``mean(V)^2``)
    -- and flat images get an all-ones descriptor.

    Args:
        image: ``(B, C, H, W)``; each channel is one image.
        radius: distance of the four neighbours, or half-width of the dense search square.
        sigma: standard deviation (pixels) of the Gaussian patch weighting.
        neighbourhood: ``"four"`` (alias ``"six"``, its 3D name) or ``"dense"``.

    Returns:
        ``(B, C, R, H, W)`` float32 descriptor in (0, 1], R = number of search offsets.
    """
    if image.ndim != 4:
        raise ValueError(f"MIND expects (B, C, H, W), got shape {tuple(image.shape)}")
    if radius < 1 or sigma <= 0:
        raise ValueError(f"MIND needs radius >= 1 and sigma > 0, got radius={radius} sigma={sigma}")
    b, c, h, w = image.shape
    with torch.autocast(device_type=image.device.type, enabled=False):
        img = image.float().reshape(b * c, 1, h, w)
        kernel = _gaussian_kernel(sigma)
        pad = radius

        def patch_ssd(offs: list[tuple[int, int]]) -> torch.Tensor:
            diffs = torch.cat([(img - _shift(img, dy, dx, pad)) ** 2 for dy, dx in offs], dim=1)
            return _smooth(diffs, kernel)

        near = patch_ssd(_offsets("four", 1))
        v = near.mean(dim=1, keepdim=True)
        v_mean = v.mean(dim=(2, 3), keepdim=True)
        v = torch.minimum(torch.maximum(v, 1e-3 * v_mean), 1e3 * v_mean) + 1e-12
        d = near if (neighbourhood in ("four", "six") and radius == 1) else patch_ssd(_offsets(neighbourhood, radius))
        # exp(-d / v) / max_r exp(-d / v) == exp(-(d - min_r d) / v): no underflow to 0 / 0
        d = d - d.amin(dim=1, keepdim=True)
        mind = torch.exp(-d / v)
        return mind.reshape(b, c, -1, h, w)


class MINDLoss(nn.Module):
    """Structure loss: mean absolute difference between the MIND descriptors of two images.

    Args:
        radius: neighbour distance / search half-width (see :func:`mind_descriptor`).
        sigma: Gaussian patch standard deviation in pixels.
        neighbourhood: ``"four"`` (2D six-neighbourhood) or ``"dense"``.
        channels: ``"all"`` compares every channel; ``"centre"`` only the centre (2.5D) channel.
    """

    def __init__(
        self,
        radius: int = 1,
        sigma: float = 0.5,
        neighbourhood: Neighbourhood = "four",
        channels: Literal["all", "centre"] = "all",
    ) -> None:
        super().__init__()
        _offsets(neighbourhood, max(radius, 1))  # validate
        if channels not in ("all", "centre"):
            raise ValueError(f"MINDLoss channels must be 'all' or 'centre', got {channels!r}")
        self.radius, self.sigma, self.neighbourhood, self.channels = radius, sigma, neighbourhood, channels

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L1 between ``MIND(source)`` and ``MIND(target)``, both ``(B, C, H, W)``; returns a scalar."""
        if source.shape != target.shape:
            raise ValueError(f"MINDLoss shapes differ: {tuple(source.shape)} vs {tuple(target.shape)}")
        if self.channels == "centre":
            mid = source.shape[1] // 2
            source, target = source[:, mid : mid + 1], target[:, mid : mid + 1]
        a = mind_descriptor(source, self.radius, self.sigma, self.neighbourhood)
        b = mind_descriptor(target, self.radius, self.sigma, self.neighbourhood)
        return (a - b).abs().mean()


# --------------------------------------------------------------------------------------------------
# Gradient consistency
# --------------------------------------------------------------------------------------------------


def _ncc(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Normalised cross-correlation per image of ``(N, H, W)`` tensors -> ``(N,)``."""
    a = a - a.mean(dim=(1, 2), keepdim=True)
    b = b - b.mean(dim=(1, 2), keepdim=True)
    num = (a * b).sum(dim=(1, 2))
    den = torch.sqrt((a * a).sum(dim=(1, 2)) * (b * b).sum(dim=(1, 2)) + eps)
    return num / den


class GradientConsistencyLoss(nn.Module):
    """Hiasa et al. 2018: ``1 - GC(A, B)``, ``GC = (NCC(dA/dx, dB/dx) + NCC(dA/dy, dB/dy)) / 2``.

    Gradients are forward differences; the NCC is computed per image (per batch item and channel)
    and the loss averaged. 0 for ``B = a * A + b`` with ``a > 0``; in [0, 2]. ``eps`` keeps flat images
    finite (their correlation counts as 0).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss between ``(B, C, H, W)`` batches ``source`` and ``target``; returns a scalar."""
        if source.shape != target.shape or source.ndim != 4:
            raise ValueError(
                "GradientConsistencyLoss needs equal (B, C, H, W) shapes: "
                f"{tuple(source.shape)} vs {tuple(target.shape)}"
            )
        with torch.autocast(device_type=source.device.type, enabled=False):
            a = source.float().flatten(0, 1)
            b = target.float().flatten(0, 1)
            gx = _ncc(a[:, :, 1:] - a[:, :, :-1], b[:, :, 1:] - b[:, :, :-1], self.eps)
            gy = _ncc(a[:, 1:, :] - a[:, :-1, :], b[:, 1:, :] - b[:, :-1, :], self.eps)
            return 1.0 - 0.5 * (gx + gy).mean()


# --------------------------------------------------------------------------------------------------
# Image history
# --------------------------------------------------------------------------------------------------


class ImagePool:
    """History buffer of generated images (CycleGAN reference ``ImagePool``).

    Until ``size`` images are stored, :meth:`query` stores and returns each image. Once full, each
    image is, with probability 0.5, swapped for a random stored one (which is returned and the new one
    stored in its place), else returned as is. Randomness comes from torch's global CPU RNG, so
    restoring ``torch.get_rng_state()`` together with :meth:`state_dict` reproduces the outputs.
    ``size=0`` disables the pool.
    """

    def __init__(self, size: int = 50) -> None:
        if size < 0:
            raise ValueError(f"ImagePool size must be >= 0, got {size}")
        self.size = size
        self.images: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch like ``images`` (detached, same dtype/device) drawn from the history."""
        if self.size == 0:
            return images
        out: list[torch.Tensor] = []
        for image in images.detach():
            image = image.clone()
            if len(self.images) < self.size:
                self.images.append(image)
                out.append(image)
            elif torch.rand(()).item() > 0.5:
                idx = int(torch.randint(0, self.size, ()).item())
                out.append(self.images[idx].to(image))
                self.images[idx] = image
            else:
                out.append(image)
        return torch.stack(out, dim=0)

    def state_dict(self) -> dict[str, Any]:
        """``{"size": int, "images": (N, C, H, W) CPU tensor or None}``."""
        stored = torch.stack([im.cpu() for im in self.images]) if self.images else None
        return {"size": self.size, "images": stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; images stay on CPU until they are returned."""
        size = int(state["size"])
        if size != self.size:
            raise ValueError(f"ImagePool size mismatch: checkpoint has {size}, this pool {self.size}")
        stored = state.get("images")
        self.images = [] if stored is None else [im.clone() for im in stored]
        if len(self.images) > self.size:
            raise ValueError(f"ImagePool state holds {len(self.images)} images, more than its size {self.size}")
