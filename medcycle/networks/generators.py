"""The generator of the MR <-> CT CycleGAN, assembled from MONAI blocks.

The ResNet generator of CycleGAN -- Johnson, Alahi & Fei-Fei, "Perceptual Losses for Real-Time Style
Transfer and Super-Resolution" (ECCV 2016) as used by Zhu, Park, Isola & Efros, "Unpaired
Image-to-Image Translation using Cycle-Consistent Adversarial Networks" (ICCV 2017). Layer for layer
(and parameter for parameter) the ``ResnetGenerator`` of the reference pytorch-CycleGAN-and-pix2pix
code with instance norm (affine=False, so convolutions keep their bias) and no dropout. It maps ``k``
channels (the 2.5D context slices) to ``k`` channels in [-1, 1]; convolution weights start from
N(0, 0.02) with zero bias, as the reference's ``init_type="normal"``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.utils import normal_init
from torch import nn

#: MONAI norm spec equal to the reference ``nn.InstanceNorm2d(affine=False, track_running_stats=False)``.
INSTANCE_NORM: tuple[str, dict[str, Any]] = ("instance", {"affine": False})


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


class PhaseShuffleConv2d(nn.Conv2d):
    """``nn.Conv2d`` (stride 1, no padding) for few output channels, faster on CPUs; identical result.

    oneDNN's CPU convolutions compute output channels in blocks of 16, so the generator's last layer
    (width -> k channels, 7 x 7) costs as much as width -> 16. On a CPU this layer instead computes
    the r x r output phases as r^2 x more channels of one stride-r convolution whose
    (k + r - 1)-wide kernels hold the weights shifted by each phase, then interleaves them with
    ``pixel_shuffle``; ``r`` is the largest of 4, 2 with ``out_channels * r^2 <= 16``. Parameters and
    state dict are the plain convolution's; other devices, odd output sizes and more output channels
    take the plain path. Measured on a 2-core AVX512-BF16 CPU, 32 -> 1 channels at 128 px, batch 3:
    forward 6.3 -> 1.5 ms, forward + backward 19.9 -> 6.2 ms in bf16.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)
        self.phases = next((r for r in (4, 2) if out_channels * r * r <= 16), 1)
        # A plain CPU tensor, not a buffer: only the CPU path reads it, and DDP would broadcast a buffer every step.
        self.phase_index = self._phase_index()

    def _phase_index(self) -> torch.Tensor:
        """Index into ``[weight.flatten(), 0]`` of every entry of the phase kernels (last = zero)."""
        r, (k, _), out_ch, in_ch = self.phases, self.kernel_size, self.out_channels, self.in_channels
        size = k + r - 1
        o, a, b, c, ty, tx = torch.meshgrid(
            *(torch.arange(n) for n in (out_ch, r, r, in_ch, size, size)), indexing="ij"
        )
        ky, kx = ty - a, tx - b  # phase (a, b) reads the input shifted by (a, b)
        inside = (ky >= 0) & (ky < k) & (kx >= 0) & (kx < k)
        flat = ((o * in_ch + c) * k + ky.clamp(0, k - 1)) * k + kx.clamp(0, k - 1)
        zero = out_ch * in_ch * k * k
        return torch.where(inside, flat, torch.full_like(flat, zero)).reshape(out_ch * r * r, in_ch, size, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The convolution of ``x`` (``nn.Conv2d.forward``), by the phase path where it is faster."""
        r = self.phases
        out_h, out_w = x.shape[-2] - self.kernel_size[0] + 1, x.shape[-1] - self.kernel_size[1] + 1
        # ONNX runtimes choose their own convolution kernels: export the plain convolution
        if r == 1 or x.device.type != "cpu" or out_h % r or out_w % r or torch.onnx.is_in_onnx_export():
            return super().forward(x)
        weight = torch.cat([self.weight.reshape(-1), self.weight.new_zeros(1)])[self.phase_index]
        bias = self.bias.repeat_interleave(r * r) if self.bias is not None else None
        return F.pixel_shuffle(F.conv2d(x, weight, bias, stride=r), r)


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
        head = Convolution(2, w, out_channels, kernel_size=7, padding=0, bias=True, conv_only=True)
        head.conv = PhaseShuffleConv2d(w, out_channels, 7)  # the same convolution, faster on CPUs
        layers += [nn.ReflectionPad2d(3), head, nn.Tanh()]
        self.model = nn.Sequential(*layers)
        self.apply(normal_init)  # N(0, 0.02) weights, zero bias: the reference's init_type="normal"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``(B, in, H, W)`` to ``(B, out, H, W)`` in [-1, 1]."""
        return self.model(x)


def build_generator(channels: int, width: int = 64, n_blocks: int = 9) -> ResnetGenerator:
    """The CycleGAN ResNet generator mapping ``channels`` (k context slices) to ``channels``.

    Args:
        channels: input = output channels (k).
        width: filters of the first layer (``ngf``).
        n_blocks: residual blocks.
    """
    if channels < 1:
        raise ValueError(f"generator channels must be >= 1, got {channels}")
    return ResnetGenerator(channels, channels, width=width, n_blocks=n_blocks)
