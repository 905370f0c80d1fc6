"""Generator and discriminator networks built from MONAI blocks."""

from medcycle.networks.discriminators import (
    PatchGANDiscriminator,
    build_discriminator,
    patchgan_output_size,
    patchgan_receptive_field,
)
from medcycle.networks.generators import (
    GENERATOR_KINDS,
    ResnetBlock,
    ResnetGenerator,
    UNetGenerator,
    build_generator,
)

__all__ = [
    "GENERATOR_KINDS",
    "PatchGANDiscriminator",
    "ResnetBlock",
    "ResnetGenerator",
    "UNetGenerator",
    "build_discriminator",
    "build_generator",
    "patchgan_output_size",
    "patchgan_receptive_field",
]
