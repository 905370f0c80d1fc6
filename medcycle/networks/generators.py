"""Generators for the MR <-> CT CycleGAN, assembled from MONAI blocks.

* ``"resnet"``: the ResNet generator of CycleGAN -- Johnson, Alahi & Fei-Fei, "Perceptual Losses for
  Real-Time Style Transfer and Super-Resolution" (ECCV 2016) as used by Zhu, Park, Isola & Efros,
  "Unpaired Image-to-Image Translation using Cycle-Consistent Adversarial Networks" (ICCV 2017).
  Layer for layer (and parameter for parameter) the ``ResnetGenerator`` of the reference
  pytorch-CycleGAN-and-pix2pix code with instance norm (affine=False, so convolutions keep their bias)
  and no dropout.
* ``"unet"``: MONAI's residual ``UNet`` (Kerfoot et al., "Left-Ventricle Quantification Using Residual
  U-Net", STACOM 2018) with four levels, followed by tanh.

Both map ``k`` channels (the 2.5D context slices) to ``k`` channels in [-1, 1]; convolution weights
start from N(0, 0.02) with zero bias, as the reference's ``init_type="normal"``.
"""

from __future__ import annotations

from typing import Any

import torch
from monai.networks.blocks import Convolution
from monai.networks.nets import UNet
from monai.networks.utils import normal_init
from torch import nn

#: MONAI norm spec equal to the reference ``nn.InstanceNorm2d(affine=False, track_running_stats=False)``.
INSTANCE_NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": False})
GENERATOR_KINDS: tuple[str, ...] = ("resnet", "unet")


def _conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int = 0,
    act: str | None = "RELU",
    transposed: bool = False,
) -> Convolution:
    """A 2D MONAI ``Convolution`` -> instance norm -> [ReLU] unit with bias, as in the reference."""
    return Convolution(
        spatial_dims=2,
        in_channels=in_ch,
        out_channels=out_ch,
        strides=stride,
        kernel_size=kernel,
        padding=padding,
        output_padding=1 if transposed else None,
        is_transposed=transposed,
        adn_ordering="NA",
        norm=INSTANCE_NORM,
        act=act,
        bias=True,
    )


class ResnetBlock(nn.Module):
    """Residual block ``x + [pad, conv3x3, IN, ReLU, pad, conv3x3, IN](x)`` with reflection padding."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.ReflectionPad2d(1),
            _conv(dim, dim, 3),
            nn.ReflectionPad2d(1),
            _conv(dim, dim, 3, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x + block(x)``."""
        return x + self.block(x)


class ResnetGenerator(nn.Module):
    """CycleGAN ResNet generator: c7s1-w, d2w, d4w, n x R4w, u2w, uw, c7s1-out, tanh.

    Spatial sizes divisible by 4 are returned unchanged.
    """

    #: Ratio of the input size to the smallest feature map.
    downsampling = 4

    def __init__(self, in_channels: int, out_channels: int, width: int = 64, n_blocks: int = 9) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or width < 1 or n_blocks < 0:
            raise ValueError(
                f"invalid ResnetGenerator sizes: in={in_channels} out={out_channels} width={width} blocks={n_blocks}"
            )
        w = width
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), _conv(in_channels, w, 7)]
        layers += [_conv(w, 2 * w, 3, stride=2, padding=1), _conv(2 * w, 4 * w, 3, stride=2, padding=1)]
        layers += [ResnetBlock(4 * w) for _ in range(n_blocks)]
        layers += [
            _conv(4 * w, 2 * w, 3, stride=2, padding=1, transposed=True),
            _conv(2 * w, w, 3, stride=2, padding=1, transposed=True),
        ]
        layers += [
            nn.ReflectionPad2d(3),
            Convolution(2, w, out_channels, kernel_size=7, padding=0, bias=True, conv_only=True),
            nn.Tanh(),
        ]
        self.model = nn.Sequential(*layers)
        self.apply(normal_init)  # N(0, 0.02) weights, zero bias: the reference's init_type="normal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in, H, W)`` to ``(B, out, H, W)`` in [-1, 1]."""
        return self.model(x)


class UNetGenerator(nn.Module):
    """MONAI residual UNet (channels w, 2w, 4w, 8w; strides 2, 2, 2; 2 residual units) followed by tanh.

    Spatial sizes must be divisible by 8.
    """

    #: Ratio of the input size to the smallest feature map.
    downsampling = 8

    def __init__(self, in_channels: int, out_channels: int, width: int = 64) -> None:
        super().__init__()
        if in_channels < 1 or out_channels < 1 or width < 1:
            raise ValueError(f"invalid UNet sizes: in={in_channels} out={out_channels} width={width}")
        w = width
        self.unet = UNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            channels=(w, 2 * w, 4 * w, 8 * w),
            strides=(2, 2, 2),
            num_res_units=2,
            norm=INSTANCE_NORM,
        )
        self.act = nn.Tanh()
        self.apply(normal_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in, H, W)`` to ``(B, out, H, W)`` in [-1, 1]."""
        return self.act(self.unet(x))


def build_generator(kind: Any, channels: int, width: int = 64, n_blocks: int = 9) -> nn.Module:
    """Build a generator mapping ``channels`` (k context slices) to ``channels``.

    Args:
        kind: ``"resnet"`` or ``"unet"``; or a model config (``ModelConfig``-like object with
            ``generator``, ``gen_width``, ``gen_blocks``), whose values then replace ``width``/``n_blocks``.
        channels: input = output channels (k).
        width: filters of the first layer (``ngf``).
        n_blocks: residual blocks of the ResNet generator (ignored by the UNet).
    """
    if hasattr(kind, "generator"):  # build_generator(model_cfg, channels)
        cfg = kind
        kind, width, n_blocks = cfg.generator, cfg.gen_width, cfg.gen_blocks
    if channels < 1:
        raise ValueError(f"generator channels must be >= 1, got {channels}")
    if kind == "resnet":
        return ResnetGenerator(channels, channels, width=width, n_blocks=n_blocks)
    if kind == "unet":
        return UNetGenerator(channels, channels, width=width)
    raise ValueError(f"unknown generator kind {kind!r}; expected one of {', '.join(GENERATOR_KINDS)}")
