"""Losses of the MR <-> CT CycleGAN and the discriminators' image history.

* Adversarial: least-squares GAN (Mao et al., "Least Squares Generative Adversarial Networks", ICCV 2017)
  through MONAI ``PatchAdversarialLoss``, as in CycleGAN (Zhu et al., "Unpaired Image-to-Image
  Translation using Cycle-Consistent Adversarial Networks", ICCV 2017).
* Structure: L1 between MIND descriptors (Heinrich et al., "MIND: Modality independent neighbourhood
  descriptor for multi-modal deformable registration", Medical Image Analysis 16(7), 2012) of the MR and
  the synthetic CT, the structure-consistency loss of Yang et al., "Unpaired Brain MR-to-CT Synthesis
  using a Structure-Constrained CycleGAN" (DLMIA, MICCAI workshops 2018).
* ``ImagePool``: the history of generated images shown to the discriminators (Shrivastava et al.,
  "Learning from Simulated and Unsupervised Images through Adversarial Training", CVPR 2017), with the
  size-50 buffer of the CycleGAN reference implementation.

The structure loss is computed in float32 (outside autocast) on ``(B, C, H, W)`` batches; each
channel is treated as a separate 2D image.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import nn

__all__ = [
    "ImagePool",
    "MIND_SIGMA",
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

#: standard deviation (pixels) of the Gaussian patch weighting: the MIND paper's; 1.0 measured no gain
MIND_SIGMA = 0.5
#: the four nearest neighbours (the 2D six-neighbourhood of Heinrich et al.), as ``(dy, dx)``
_NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1D Gaussian of half-width ``ceil(1.5 sigma)`` (the size used by Heinrich's code)."""
    half = max(1, math.ceil(1.5 * sigma))
    x = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


def _shift(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[y, x] = img[y + dy, x + dx]`` (|dy|, |dx| <= 1) with replicated borders; ``img`` is ``(N, 1, H, W)``."""
    h, w = img.shape[-2:]
    p = F.pad(img, (1, 1, 1, 1), mode="replicate")
    return p[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _smooth(img: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter with replicated borders on ``(N, M, H, W)`` (each channel alone)."""
    m = img.shape[1]
    r = kernel.numel() // 2
    kx = kernel.to(img).view(1, 1, 1, -1).expand(m, 1, 1, -1)
    ky = kernel.to(img).view(1, 1, -1, 1).expand(m, 1, -1, 1)
    img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), kx, groups=m)
    return F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), ky, groups=m)


def mind_descriptor(image: torch.Tensor) -> torch.Tensor:
    """MIND descriptor of 2D images over the four nearest neighbours (Heinrich et al. 2012, Eq. 4).

    ``MIND(I, x, r) = exp(-D_p(I, x, x + r) / V(I, x)) / max_r(...)`` where ``D_p`` is the
    Gaussian-weighted (:data:`MIND_SIGMA`) patch SSD between the patch at x and at x + r, and ``V`` the
    mean of ``D_p`` over the four neighbours. ``V`` is clamped to ``[1e-3, 1e3] * mean(V)`` per image --
    relative bounds, so that the descriptor is exactly invariant to affine intensity changes
    ``a * I + b`` (Heinrich's code uses ``sqrt(mean V)`` and ``mean(V)^2``) -- and flat images get an
    all-ones descriptor.

    Args:
        image: ``(B, C, H, W)``; each channel is one image.

    Returns:
        ``(B, C, 4, H, W)`` float32 descriptor in (0, 1].
    """
    if image.ndim != 4:
        raise ValueError(f"MIND expects (B, C, H, W), got shape {tuple(image.shape)}")
    b, c, h, w = image.shape
    with torch.autocast(device_type=image.device.type, enabled=False):
        img = image.float().reshape(b * c, 1, h, w)
        diffs = torch.cat([(img - _shift(img, dy, dx)) ** 2 for dy, dx in _NEIGHBOURS], dim=1)
        d = _smooth(diffs, _gaussian_kernel(MIND_SIGMA))
        v = d.mean(dim=1, keepdim=True)
        v_mean = v.mean(dim=(2, 3), keepdim=True)
        v = torch.minimum(torch.maximum(v, 1e-3 * v_mean), 1e3 * v_mean) + 1e-12
        # exp(-d / v) / max_r exp(-d / v) == exp(-(d - min_r d) / v): no underflow to 0 / 0
        d = d - d.amin(dim=1, keepdim=True)
        mind = torch.exp(-d / v)
        return mind.reshape(b, c, -1, h, w)


class MINDLoss(nn.Module):
    """Structure loss: mean absolute difference between the MIND descriptors of two images (every channel)."""

    def forward(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """L1 between ``MIND(source)`` and ``MIND(target)``, both ``(B, C, H, W)``; returns a scalar."""
        if source.shape != target.shape:
            raise ValueError(f"MINDLoss shapes differ: {tuple(source.shape)} vs {tuple(target.shape)}")
        return (mind_descriptor(source) - mind_descriptor(target)).abs().mean()


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
