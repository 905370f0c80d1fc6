"""The exported model folder: what conversion needs from a training run and nothing else.

It follows the MONAI bundle layout, so MONAI users recognise it::

    MODEL/configs/metadata.json    MONAI bundle metadata (task, network_data_format, versions) and, under
                                   "medcycle", the format marker and provenance: medcycle version, iteration,
                                   validation figures, hashes of the training data (never images)
    MODEL/configs/inference.json   the preprocessing (``data``), the network (``model``, ``network_def``)
                                   and the inference precision (``amp``)
    MODEL/models/model.safetensors the MR-to-CT generator's weights (float32, safetensors format)
    MODEL/models/model.onnx        the same generator as an ONNX graph, (N, k, H, W) -> (N, k, H, W) in
                                   [-1, 1]; its weights are read from model.safetensors (ONNX external data)
    MODEL/docs/README.md           how to run it, with or without medcycle

The weights are stored once, in the safetensors format (a JSON header, then the raw little-endian
arrays), written and read here with numpy: loading a model folder never unpickles anything. The
ONNX graph points at the same bytes, so the folder is barely larger than the weights.
"""
from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medcycle.config import Config
from medcycle.errors import InputError, UsageError

FORMAT = "medcycle-model"
VERSION = 1
METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
WEIGHTS = Path("models/model.safetensors")
ONNX = Path("models/model.onnx")
README = Path("docs/README.md")
ONNX_OPSET = 17
_HEADER_LIMIT = 1 << 24  # bytes of a safetensors header; a generator's is a few kB


def is_model_folder(path: str | Path) -> bool:
    """True for a folder holding ``configs/metadata.json`` (an exported model, or something posing as one)."""
    return (Path(path) / METADATA).is_file()


# --------------------------------------------------------------------------------------------------
# weights: the safetensors format, float32 only


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Write float32 `tensors` in the safetensors format; returns each one's (offset, length) in the file."""
    header: dict[str, Any] = {}
    blobs, position = [], 0
    for name, tensor in tensors.items():
        blob = tensor.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4", copy=False).tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [position, position + len(blob)]}
        blobs.append(blob)
        position += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % 64)  # the arrays start aligned, as safetensors pads its header
    start = 8 + len(encoded)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for blob in blobs:
            handle.write(blob)
    return {name: (start + entry["data_offsets"][0], entry["data_offsets"][1] - entry["data_offsets"][0])
            for name, entry in header.items()}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The float32 tensors of a safetensors file; anything malformed is refused in one line."""
    data = path.read_bytes()
    try:
        size = int.from_bytes(data[:8], "little")
        if len(data) < 8 or not 0 < size <= min(_HEADER_LIMIT, len(data) - 8):
            raise ValueError("bad header size")
        header = json.loads(data[8:8 + size])
        body = memoryview(data)[8 + size:]
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            if entry["dtype"] != "F32":
                raise ValueError(f"{name} is {entry['dtype']}, not F32")
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = [int(v) for v in entry["shape"]]
            if not 0 <= begin <= end <= len(body) or end - begin != 4 * int(np.prod(shape)):
                raise ValueError(f"{name} lies outside the file or does not match its shape")
            tensors[name] = torch.from_numpy(np.frombuffer(body[begin:end], dtype="<f4").astype(np.float32).reshape(shape))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a readable safetensors weights file ({exc})") from None
    return tensors


# --------------------------------------------------------------------------------------------------
# writing


def write_model_folder(folder: Path, generator: torch.nn.Module, config: Config, provenance: Mapping[str, Any],
                       onnx: bool = True) -> None:
    """Write an exported model into the (new, empty) `folder`."""
    data, model = config.data, config.model
    for sub in (METADATA, WEIGHTS, README):
        (folder / sub).parent.mkdir(parents=True, exist_ok=True)
    ranges = write_safetensors(folder / WEIGHTS, generator.state_dict())
    if onnx:
        (folder / ONNX).write_bytes(_onnx_graph(generator, data.context_slices, data.tile_size, ranges))
    inference = {
        "network_def": {"_target_": "medcycle.networks.build_generator", "channels": data.context_slices,
                        "width": model.gen_width, "n_blocks": model.gen_blocks},
        "data": config.to_dict()["data"],
        "model": config.to_dict()["model"],
        "amp": config.train.amp,
    }
    _write_json(folder / INFERENCE, inference)
    _write_json(folder / METADATA, _metadata(config, provenance, onnx))
    (folder / README).write_text(_readme(config, onnx))


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _onnx_graph(generator: torch.nn.Module, k: int, tile: int, ranges: Mapping[str, tuple[int, int]]) -> bytes:
    """The generator as ONNX, its weights external data in ``model.safetensors`` beside it."""
    import onnx  # checked by the export job before any work

    buffer = io.BytesIO()
    axes = {0: "batch", 2: "height", 3: "width"}
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        # The TorchScript-based exporter (in every torch medcycle supports) needs only `onnx`; the
        # dynamo one also needs onnxscript and takes ~35 s even for a tiny generator.
        torch.onnx.export(generator.cpu().eval(), (torch.zeros(1, k, tile, tile),), buffer, dynamo=False,
                          opset_version=ONNX_OPSET, input_names=["mr"], output_names=["ct"],
                          dynamic_axes={"mr": axes, "ct": axes})
    graph = onnx.load_from_string(buffer.getvalue())
    weights = generator.state_dict()
    for initializer in graph.graph.initializer:
        if initializer.name not in ranges:  # a constant of the graph itself: stays inline
            continue
        if not np.array_equal(onnx.numpy_helper.to_array(initializer), weights[initializer.name].cpu().numpy()):
            raise RuntimeError(f"ONNX export changed the weight {initializer.name}")  # never: they are parameters
        offset, length = ranges[initializer.name]
        initializer.ClearField("raw_data")
        initializer.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS.name), ("offset", str(offset)), ("length", str(length))):
            entry = initializer.external_data.add()
            entry.key, entry.value = key, value
    return graph.SerializeToString()


def _channels(k: int, what: str) -> dict[str, str]:
    return {str(c): f"{what}, axial slice z{c - k // 2:+d}" if k > 1 else what for c in range(k)}


def _metadata(config: Config, provenance: Mapping[str, Any], onnx: bool) -> dict[str, Any]:
    import monai

    from medcycle import __version__

    data = config.data
    k, tile = data.context_slices, data.tile_size
    tensor = {"type": "image", "num_channels": k, "spatial_shape": [tile, tile], "dtype": "float32",
              "value_range": [-1, 1], "is_patch_data": True}
    return {
        "version": "1.0.0",
        "changelog": {"1.0.0": f"exported by medcycle {__version__} from iteration {provenance.get('iteration')}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medcycle": __version__},
        "name": "medcycle MR-to-CT generator",
        "task": "MRI to synthetic CT (Hounsfield units), unpaired CycleGAN, 2.5D axial slices",
        "description": "The MR-to-CT generator of a medcycle training run; convert with "
                       "'medcycle convert -i mr.nii.gz -o sct.nii.gz --model MODEL'. See docs/README.md.",
        "authors": "medcycle",
        "copyright": "see the training data's terms",
        "intended_use": "research; not a medical device",
        "network_data_format": {
            "inputs": {"image": {**tensor, "format": "magnitude", "modality": "MR",
                                 "channel_def": _channels(k, "MR normalised to [-1, 1]")}},
            "outputs": {"pred": {**tensor, "format": "hounsfield", "modality": "CT",
                                 "channel_def": _channels(k, "CT in [-1, 1]; HU via the inverse of data.ct_window and data.ct_knots")}},
        },
        "medcycle": {"format": FORMAT, "version": VERSION, "medcycle_version": __version__,
                     "files": {"weights": str(WEIGHTS), **({"onnx": str(ONNX)} if onnx else {})}, **provenance},
    }


def _readme(config: Config, onnx: bool) -> str:
    data = config.data
    knots = ", ".join(f"{hu:g} HU -> {value:g}" for hu, value in data.ct_knots) or "none (linear)"
    lines = [
        "# medcycle MR-to-CT generator",
        "",
        "Convert with medcycle: `medcycle convert -i mr.nii.gz -o sct.nii.gz --model THIS_FOLDER`.",
        "",
        "Provenance and validation figures: `configs/metadata.json` (key `medcycle`); the preprocessing: "
        "`configs/inference.json` (key `data`).",
    ]
    if onnx:
        lines += [
            "",
            "## Without medcycle: `models/model.onnx`",
            "",
            "Input `mr` and output `ct` are float32 `(N, k, H, W)` in [-1, 1] (H, W multiples of 4), with "
            f"k = {data.context_slices} neighbouring axial slices as channels; keep the centre output channel. "
            "Its weights are read from `models/model.safetensors` beside it. What medcycle does around it:",
            "",
            f"1. reorient the MRI to {data.orientation}, resample in-plane to {data.spacing[0]:g} x {data.spacing[1]:g} mm "
            "(slices kept);",
            f"2. map the MR linearly from its {data.mr_percentiles[0]:g}th..{data.mr_percentiles[1]:g}th percentiles "
            "inside the body mask onto [-1, 1], clipped;",
            f"3. run {data.tile_size} x {data.tile_size} windows over each axial slice's body region (gaussian-blended, "
            "25 % overlap; medcycle also averages the four in-plane mirrorings);",
            f"4. decode to HU: [-1, 1] onto the window {data.ct_window[0]:g}..{data.ct_window[1]:g} HU piecewise "
            f"linearly through the knots {knots}; resample back onto the input grid.",
            "",
            "```python",
            "import onnxruntime",
            "session = onnxruntime.InferenceSession('models/model.onnx')",
            "ct = session.run(None, {'mr': mr_windows})[0]  # mr_windows: float32 (N, k, H, W) in [-1, 1]",
            "```",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# reading


def load_model_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict[str, Any]]:
    """The generator of an exported model folder, in eval mode, with its config and metadata.

    Reads JSON and the safetensors weights only: nothing is unpickled.
    """
    from medcycle.networks import build_generator

    folder = Path(path)
    metadata = _read_json(folder / METADATA)
    mark = metadata.get("medcycle") if isinstance(metadata, dict) else None
    if not isinstance(mark, dict) or mark.get("format") != FORMAT:
        raise InputError(f"{folder / METADATA}: not a medcycle model folder (no medcycle format marker)")
    if not isinstance(mark.get("version"), int) or mark["version"] > VERSION:
        raise InputError(f"{folder}: written by a newer medcycle (model folder version {mark.get('version')})")
    inference = _read_json(folder / INFERENCE)
    try:
        config = Config.from_dict({"data": inference["data"], "model": inference["model"],
                                   "train": {"amp": inference["amp"]}}).validate()
    except (KeyError, TypeError) as exc:
        raise InputError(f"{folder / INFERENCE}: lacks {exc}") from None
    except UsageError as exc:
        raise InputError(f"{folder / INFERENCE}: {exc}") from None
    if not (folder / WEIGHTS).is_file():
        raise InputError(f"{folder}: no weights ({WEIGHTS})")
    generator = build_generator(config.data.context_slices, config.model.gen_width, config.model.gen_blocks)
    try:
        generator.load_state_dict(read_safetensors(folder / WEIGHTS))
    except RuntimeError as exc:
        reason = str(exc).splitlines()[0][:160]
        raise InputError(f"{folder / WEIGHTS}: weights do not match the config ({reason})") from None
    return generator.to(device).eval(), config, metadata


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; not a complete medcycle model folder") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not readable JSON ({exc})") from None


def onnx_available() -> bool:
    """Whether the ``onnx`` package, needed to write ``model.onnx``, is installed."""
    import importlib.util

    return importlib.util.find_spec("onnx") is not None


__all__ = ["FORMAT", "INFERENCE", "METADATA", "ONNX", "WEIGHTS", "is_model_folder", "load_model_folder",
           "read_safetensors", "write_model_folder", "write_safetensors"]
