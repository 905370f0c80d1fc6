"""Configuration as data: YAML files validated into typed dataclasses.

Every key has a default that follows the published CycleGAN (Zhu et al. 2017) where one exists.
An unknown key, a value of the wrong type or an impossible value is refused with a message that
names the key, e.g. ``config: train.lr must be > 0, got -1``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, Optional

import yaml

from medcycle.errors import UsageError


@dataclass
class DataConfig:
    """How volumes become tiles; stored in the cache and every checkpoint so conversion repeats it."""

    orientation: str = "RAS"
    spacing: tuple[float, float] = (1.0, 1.0)  # in-plane mm; the slice spacing is kept
    tile_size: int = 256
    context_slices: int = 1  # 2.5D: odd number of neighbouring axial slices given as channels
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    ct_window: tuple[float, float] = (-1024.0, 3000.0)  # SynthRAD2023; (-1024, 3071) for 2025
    # (HU, value) pairs inside the window: the window maps onto [-1, 1] piecewise linearly through them
    # (none: linearly), e.g. more of [-1, 1] for soft tissue, so its thin layers count for the networks
    ct_knots: tuple[tuple[float, float], ...] = ()
    min_body_fraction: float = 0.05  # slices whose tile holds less body than this are dropped
    val_cases: int = 1  # paired cases kept out of training for validation


@dataclass
class ModelConfig:
    """Generator (the CycleGAN ResNet generator) and discriminator (PatchGAN) sizes."""

    gen_width: int = 64
    gen_blocks: int = 9
    disc_width: int = 64
    disc_layers: int = 3


@dataclass
class LossConfig:
    """Loss weights; a weight of 0 switches a term off."""

    pairing: Literal["unpaired", "paired", "hybrid"] = "unpaired"
    adversarial: float = 1.0
    cycle: float = 10.0  # lambda of the cycle-consistency L1
    identity: float = 0.5  # times `cycle`, as in the reference implementation
    structure: float = 0.0  # MIND structure loss between MR and sCT (Yang et al. 2018)
    paired: float = 10.0  # L1 between sCT and registered CT when pairing is paired or hybrid


@dataclass
class TrainConfig:
    """Optimisation, schedule, logging and execution settings."""

    iterations: int = 20000
    max_minutes: Optional[float] = None  # stop on a wall-clock budget; the schedule follows it
    batch_size: int = 1
    lr: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    decay_from: float = 0.5  # fraction of the run after which the lr decays linearly to zero
    pool_size: int = 50
    amp: Literal["auto", "none", "bf16", "fp16"] = "auto"
    channels_last: bool = True
    compile: bool = False
    augment: bool = True
    mr_gamma: tuple[float, float] = (1.0, 1.0)  # range of the gamma bending each MR tile's contrast; (1, 1): off
    workers: int = 2
    seed: int = 0
    deterministic: bool = False
    log_every: int = 10
    image_every: int = 500
    val_every: int = 500
    checkpoint_every: int = 500
    val_max_tiles: int = 64


@dataclass
class Config:
    """The whole configuration of a medcycle run."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples as lists), suitable for YAML, JSON and checkpoints."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Config":
        """Validate a nested dict into a Config, refusing unknown keys and wrong types."""
        return _build(cls, values or {}, "")

    def validate(self) -> "Config":
        """Refuse impossible values with a message naming the key."""
        d, m, t, lo = self.data, self.model, self.train, self.loss
        _check(16 <= d.tile_size <= MAX_TILE_SIZE and d.tile_size % 4 == 0, "data.tile_size",
               f"must be a multiple of 4 in [16, {MAX_TILE_SIZE}]", d.tile_size)
        _check(d.context_slices >= 1 and d.context_slices % 2 == 1, "data.context_slices", "must be an odd number >= 1", d.context_slices)
        _check(all(s > 0 for s in d.spacing), "data.spacing", "must be > 0", list(d.spacing))
        _check(0 <= d.mr_percentiles[0] < d.mr_percentiles[1] <= 100, "data.mr_percentiles", "must be 0 <= low < high <= 100", list(d.mr_percentiles))
        _check(d.ct_window[0] < d.ct_window[1], "data.ct_window", "must be low < high", list(d.ct_window))
        hu = [d.ct_window[0], *(k[0] for k in d.ct_knots), d.ct_window[1]]
        values = [-1.0, *(k[1] for k in d.ct_knots), 1.0]
        _check(all(a < b for a, b in zip(hu, hu[1:])) and all(a < b for a, b in zip(values, values[1:])), "data.ct_knots",
               f"must be [HU, value] pairs with HU rising inside data.ct_window {list(d.ct_window)} and values rising "
               "inside (-1, 1)", [list(k) for k in d.ct_knots])
        _check(0 <= d.min_body_fraction < 1, "data.min_body_fraction", "must be in [0, 1)", d.min_body_fraction)
        _check(d.val_cases >= 0, "data.val_cases", "must be >= 0", d.val_cases)
        _check(_is_axis_codes(d.orientation), "data.orientation", "must be three axis codes, one each of L/R, A/P and S/I, "
               "such as RAS", d.orientation)
        _check(m.gen_width >= 1 and m.disc_width >= 1, "model.gen_width", "and model.disc_width must be >= 1", m.gen_width)
        _check(m.gen_blocks >= 0, "model.gen_blocks", "must be >= 0", m.gen_blocks)
        _check(m.disc_layers >= 1, "model.disc_layers", "must be >= 1", m.disc_layers)
        for name in ("adversarial", "cycle", "identity", "structure", "paired"):
            _check(getattr(lo, name) >= 0, f"loss.{name}", "must be >= 0", getattr(lo, name))
        _check(t.iterations >= 1, "train.iterations", "must be >= 1", t.iterations)
        _check(t.max_minutes is None or t.max_minutes > 0, "train.max_minutes", "must be > 0", t.max_minutes)
        _check(t.batch_size >= 1, "train.batch_size", "must be >= 1", t.batch_size)
        _check(0 < t.lr <= MAX_LR, "train.lr", f"must be in (0, {MAX_LR:g}] (the published CycleGAN uses 2e-4)", t.lr)
        _check(all(0 <= b < 1 for b in t.betas), "train.betas", "must be in [0, 1)", list(t.betas))
        _check(0 < t.mr_gamma[0] <= t.mr_gamma[1], "train.mr_gamma", "must be a range 0 < low <= high", list(t.mr_gamma))
        _check(0 <= t.decay_from <= 1, "train.decay_from", "must be in [0, 1]", t.decay_from)
        _check(t.pool_size >= 0, "train.pool_size", "must be >= 0", t.pool_size)
        _check(t.workers >= 0, "train.workers", "must be >= 0", t.workers)
        for name in ("log_every", "image_every", "val_every", "checkpoint_every", "val_max_tiles"):
            _check(getattr(t, name) >= 1, f"train.{name}", "must be >= 1", getattr(t, name))
        return self


#: keys deleted in medcycle 0.2, with the value that meant "off" (still accepted, so that the configs of
#: older runs and checkpoints load) and why each went
REMOVED_KEYS: dict[str, tuple[Any, str]] = {
    "model.generator": ("resnet", "the U-Net generator measured worse than the ResNet one"),
    "loss.cycle_noise": (0.0, "it measured no gain"),
    "loss.gradient": (0.0, "the gradient-consistency loss measured worse"),
    "loss.structure_sigma": (0.5, "MIND keeps the paper's 0.5 px; 1.0 measured no gain"),
    "loss.paired_ssim": (0.0, "no recipe used it and it had no measured gain"),
    "train.crop_size": (0, "crops measured worse than whole tiles"),
    "train.ema": (0.0, "the weight average measured no gain"),
}


def _drop_removed(values: dict[str, Any], names: set[str], section: str) -> dict[str, Any]:
    """`values` without the :data:`REMOVED_KEYS` of `section` that hold their old 'off' value; refuse other values."""
    kept = {}
    for name, value in values.items():
        key = f"{section}.{name}" if section else name
        if name in names or key not in REMOVED_KEYS:
            kept[name] = value
            continue
        off, why = REMOVED_KEYS[key]
        if value != off or type(value) is bool:
            raise UsageError(f"config: {key} was removed in medcycle 0.2 ({why}); this config sets {value!r}, "
                             f"only {off!r} can still be read")
    return kept


#: the largest tile side: 1024 px is 1 m at 1 mm, far beyond any body section
MAX_TILE_SIZE = 1024
#: the largest learning rate: Adam's steps are about lr in size, and weights live near 0.02
MAX_LR = 1.0
_AXIS = {"L": 0, "R": 0, "A": 1, "P": 1, "S": 2, "I": 2}


def _is_axis_codes(code: str) -> bool:
    """True for an orientation such as RAS or LPS: one code of each anatomical axis."""
    return len(code) == 3 and all(c in _AXIS for c in code) and sorted(_AXIS[c] for c in code) == [0, 1, 2]


def _check(ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        raise UsageError(f"config: {key} {rule}, got {value!r}")


def _build(kind: Any, value: Any, key: str) -> Any:
    """Convert `value` to the annotated type `kind`, naming `key` in every refusal."""
    origin = typing.get_origin(kind)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise UsageError(f"config: {key or 'the file'} must be a mapping, got {value!r}")
        hints = typing.get_type_hints(kind)
        names = {f.name for f in dataclasses.fields(kind)}
        value = _drop_removed(value, names, key)
        unknown = sorted(set(value) - names)
        if unknown:
            where = f"{key}." if key else ""
            raise UsageError(f"config: unknown key '{where}{unknown[0]}' (known: {', '.join(sorted(names))})")
        return kind(**{n: _build(hints[n], v, f"{key}.{n}" if key else n) for n, v in value.items()})
    if origin is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise UsageError(f"config: {key} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in typing.get_args(kind) if a is not type(None)][0]
        return _build(inner, value, key)
    if origin is tuple and typing.get_args(kind)[1:] == (Ellipsis,):  # tuple[X, ...]: any length
        if not isinstance(value, (list, tuple)):
            raise UsageError(f"config: {key} must be a list, got {value!r}")
        return tuple(_build(typing.get_args(kind)[0], v, key) for v in value)
    if origin is tuple:
        items = typing.get_args(kind)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise UsageError(f"config: {key} must be a list of {len(items)} values, got {value!r}")
        return tuple(_build(t, v, key) for t, v in zip(items, value))
    if kind is bool:
        if not isinstance(value, bool):
            raise UsageError(f"config: {key} must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"config: {key} must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"config: {key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UsageError(f"config: {key} must be a finite number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise UsageError(f"config: {key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {kind} for {key}")  # a programming error, not a user's


def _apply_override(tree: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects KEY=VALUE such as train.lr=1e-4, got {assignment!r}")
    parts = key.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"--set {key}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise UsageError(f"--set {key}: {text!r} is not valid YAML ({_yaml_problem(exc)})") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a mapping that names a key twice (SafeLoader keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: list[Any] = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<' merges may override keys on purpose
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a yaml error: its problem and where (line, column)."""
    if isinstance(exc, yaml.MarkedYAMLError) and exc.problem:
        mark = exc.problem_mark
        return f"{exc.problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else exc.problem
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


#: the configs shipped inside the package (``medcycle/configs/<name>.yaml``)
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


def builtin_configs() -> list[str]:
    """Names of the built-in configs, e.g. ``demo_cpu``."""
    return sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml"))


def find_config(name_or_path: str | Path) -> Path:
    """A config file: `name_or_path` itself when it is a file, else the built-in config of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if path.parent == Path(".") and builtin.is_file():
        return builtin
    raise UsageError(f"config file not found: {path} (built-in configs: {', '.join(builtin_configs())})")


def resolve_config(config: Config | str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """The validated config of a run: `config` (a :class:`Config`, a YAML path, a built-in name such as
    ``demo_cpu``, or None for the defaults) with ``KEY=VALUE`` `overrides` applied in order."""
    if isinstance(config, Config):
        tree = config.to_dict()
    elif config is None or isinstance(config, (str, Path)):
        tree = {} if config is None else _read_yaml(find_config(config))
    else:
        raise UsageError(f"config must be a Config, a YAML file or a built-in name, got {type(config).__name__}")
    for assignment in overrides:
        _apply_override(tree, assignment)
    return Config.from_dict(tree).validate()


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (a path or a built-in name; defaults when None), apply ``KEY=VALUE`` overrides, validate."""
    return resolve_config(path, overrides)


def _read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of sections in the YAML file `path`; refuse anything else in one line naming the file."""
    try:
        tree = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not a YAML config (not UTF-8 text; a binary file?)") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
    if not isinstance(tree, dict):
        raise UsageError(f"{path}: the top level must be a mapping of sections")
    return tree


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from medcycle.files import atomic_write

    with atomic_write(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def config_hash(section: Any) -> str:
    """A short stable hash of a config section (dataclass or dict), used to detect stale caches."""
    values = dataclasses.asdict(section) if dataclasses.is_dataclass(section) else section
    text = json.dumps(json.loads(json.dumps(values)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
