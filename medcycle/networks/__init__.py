"""Generator and discriminator networks built from MONAI blocks."""

from medcycle.networks.discriminators import (
    PatchGANDiscriminator,
    build_discriminator,
    patchgan_output_size,
    patchgan_receptive_field,
)
from medcycle.networks.generators import (
    ResnetBlock,
    ResnetGenerator,
    build_generator,
)

__all__ = [
    "PatchGANDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "build_discriminator",
    "build_generator",
    "patchgan_output_size",
    "patchgan_receptive_field",
]
