"""medcycle: MRI to synthetic CT (HU) with an unpaired CycleGAN built on MONAI.

The public API, one function per job (each also a ``medcycle`` sub-command)::

    import medcycle
    medcycle.phantom("data", cases=8)                       # built-in paired MR/CT head phantom
    medcycle.preprocess(data="data", out="cache", config="configs/demo_cpu.yaml")
    medcycle.train(config="configs/demo_cpu.yaml", data="cache", out="run")
    medcycle.convert("data/phantom_007/mr.nii.gz", "sct.nii.gz", model="run")
    sct = medcycle.convert_array(mr_array, affine=affine, model="run")  # in memory: a MetaTensor, same grid
    medcycle.export("run", out="model")                      # a model folder to hand over
    medcycle.evaluate(pred="sct.nii.gz", ref="data/phantom_007/ct.nii.gz", mask="data/phantom_007/mask.nii.gz")

Volumes: :func:`medcycle.io.load_volume` / :func:`medcycle.io.save_nifti` keep the exact geometry.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

__version__ = "0.1.0"

# MONAI announces optional GPU DICOM decoders on every LoadImage; medcycle never uses them.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message="NvImgCodecPydicomReader")

_JOBS = {
    "phantom": "medcycle.jobs.phantom",
    "preprocess": "medcycle.jobs.preprocess",
    "train": "medcycle.jobs.train",
    "convert": "medcycle.jobs.convert",
    "evaluate": "medcycle.jobs.evaluate",
    "demo": "medcycle.jobs.demo",
    "export": "medcycle.jobs.export",
}


_FUNCTIONS = {"convert_array": "medcycle.jobs.convert"}  # the in-memory API


def __getattr__(name: str) -> Any:
    # Jobs import torch and MONAI; loading them lazily keeps `import medcycle` and `--help` fast.
    if name in _JOBS or name in _FUNCTIONS:
        import importlib

        module = importlib.import_module(_JOBS.get(name) or _FUNCTIONS[name])
        return getattr(module, "run" if name in _JOBS else name)
    raise AttributeError(f"module 'medcycle' has no attribute {name!r}")


__all__ = ["__version__", *_JOBS, *_FUNCTIONS]
