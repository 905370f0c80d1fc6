"""PatchGAN discriminator on MONAI's ``PatchDiscriminator``.

The 70x70 PatchGAN of Isola, Zhu, Zhou & Efros, "Image-to-Image Translation with Conditional
Adversarial Networks" (CVPR 2017), used by CycleGAN (Zhu et al., ICCV 2017). With ``n_layers=3``,
MONAI's ``PatchDiscriminator`` (spatial_dims=2, kernel 4, padding 1, LeakyReLU 0.2, instance norm,
bias on) is layer for layer the reference ``NLayerDiscriminator``: C64 (no norm) - C128 - C256 (stride 2)
- C512 (stride 1) - 1-channel 4x4 conv (stride 1); 256x256 in -> 30x30 out, receptive field 70x70.
Difference: for ``n_layers > 3`` MONAI keeps doubling the width (the reference caps it at 8 * width).
"""

from __future__ import annotations

import torch
from monai.networks.nets import PatchDiscriminator
from torch import nn


def patchgan_output_size(size: int, n_layers: int = 3) -> int:
    """Output map side for an input side ``size`` (4x4 convs, padding 1: n_layers stride 2, then 2 stride 1)."""
    for _ in range(n_layers):
        size = (size + 2 - 4) // 2 + 1
    for _ in range(2):
        size = size + 2 - 4 + 1
    return size


def patchgan_receptive_field(n_layers: int = 3) -> int:
    """Receptive field (pixels) of one output of the PatchGAN (70 for ``n_layers=3``)."""
    rf = 1
    for stride in [1, 1] + [2] * n_layers:  # walk back from the output
        rf = (rf - 1) * stride + 4
    return rf


class PatchGANDiscriminator(nn.Module):
    """Wraps MONAI ``PatchDiscriminator`` so that ``forward`` returns only the prediction map."""

    def __init__(self, channels: int, width: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if channels < 1 or width < 1 or n_layers < 1:
            raise ValueError(f"invalid discriminator sizes: channels={channels} width={width} layers={n_layers}")
        self.net = PatchDiscriminator(
            spatial_dims=2,
            channels=width,
            in_channels=channels,
            out_channels=1,
            num_layers_d=n_layers,
            kernel_size=4,
            activation=("LEAKYRELU", {"negative_slope": 0.2}),
            norm="INSTANCE",
            bias=True,
            padding=1,
            dropout=0.0,
            last_conv_kernel_size=4,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the raw (no activation) patch prediction map ``(B, 1, h, w)``."""
        return self.net(x)[-1]


def build_discriminator(channels: int, width: int = 64, n_layers: int = 3) -> PatchGANDiscriminator:
    """The PatchGAN discriminator for ``channels``-channel images.

    Args:
        channels: input channels (k).
        width: filters of the first layer (``ndf``).
        n_layers: stride-2 layers after the first one plus one stride-1 layer (3 gives the 70x70 PatchGAN).
    """
    return PatchGANDiscriminator(channels, width=width, n_layers=n_layers)
