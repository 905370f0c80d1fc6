"""Configuration: YAML validated into dataclasses, refusals name the key, overrides apply."""
from pathlib import Path

import pytest
import yaml

from medcycle.config import REMOVED_KEYS, Config, config_hash, load_config, save_config
from medcycle.errors import UsageError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_follow_the_published_cyclegan():
    config = load_config()
    assert config.train.lr == 2e-4 and config.train.betas == (0.5, 0.999)
    assert config.loss.cycle == 10.0 and config.loss.identity == 0.5
    assert config.train.pool_size == 50 and config.loss.pairing == "unpaired"
    assert config.data.ct_window == (-1024.0, 3000.0)


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_shipped_configs_are_valid(name):
    """Valid, and listing every key of today's schema and no removed one: a user reads a built-in config as the
    whole list of what can be set."""
    import dataclasses

    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)
    listed = {f"{section}.{key}" for section, values in yaml.safe_load((CONFIGS / name).read_text()).items()
              for key in values}
    schema = {f"{section.name}.{field.name}" for section in dataclasses.fields(Config)
              for field in dataclasses.fields(getattr(config, section.name))}
    assert listed == schema, (sorted(listed - schema), sorted(schema - listed))


def test_overrides_apply_with_yaml_types():
    config = load_config(None, ["train.lr=1e-4", "data.spacing=[2, 2.5]", "train.max_minutes=3", "train.compile=true"])
    assert config.train.lr == 1e-4
    assert config.data.spacing == (2.0, 2.5)
    assert config.train.max_minutes == 3.0 and config.train.compile is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("trian.lr=1", "unknown key 'trian'"),
        ("train.lr=abc", "train.lr must be a number"),
        ("train.batch_size=2.5", "train.batch_size must be an integer"),
        ("data.tile_size=30", "data.tile_size must be a multiple of 4"),
        ("data.context_slices=2", "data.context_slices must be an odd number"),
        ("loss.pairing=both", "loss.pairing must be one of unpaired, paired, hybrid"),
        ("train.lr=-1", r"train.lr must be in \(0, 1\]"),
        ("data.ct_window=[3000, -1024]", "data.ct_window must be low < high"),
        ("data.ct_knots=[[200, -0.3], [-200, -0.85]]", "data.ct_knots must be .HU, value. pairs with HU rising"),
        ("data.ct_knots=[[-200, -0.3], [200, -0.85]]", "data.ct_knots must be .HU, value. pairs .* values rising"),
        ("data.ct_knots=[[3000, 0.5]]", "data.ct_knots must be .* inside data.ct_window"),
        ("data.ct_knots=[[0, 1.0]]", "data.ct_knots must be .* inside .-1, 1."),
        ("data.ct_knots=[[0, 0.1, 2]]", "data.ct_knots must be a list of 2 values"),
        ("data.ct_knots=5", "data.ct_knots must be a list"),
        ("train.augment=3", "train.augment must be true or false"),
        ("data.spacing=[1]", "data.spacing must be a list of 2 values"),
        ("nokey", "--set expects KEY=VALUE"),
    ],
)
def test_bad_values_are_refused_naming_the_key(override, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[")):
        load_config(None, [override])


def test_ct_knots_take_any_number_of_pairs():
    assert load_config(None).data.ct_knots == ()
    config = load_config(None, ["data.ct_knots=[[-200, -0.85], [200, -0.3]]"])
    assert config.data.ct_knots == ((-200.0, -0.85), (200.0, -0.3))
    assert Config.from_dict(config.to_dict()) == config


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UsageError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(UsageError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_save_and_reload_round_trip(tmp_path):
    config = load_config(None, ["model.gen_width=8", "loss.structure=0.5"])
    save_config(config, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["gen_width"] == 8
    assert load_config(tmp_path / "config.yaml") == config
    assert Config.from_dict(config.to_dict()) == config


def test_config_hash_tracks_values():
    a, b = load_config(), load_config(None, ["data.tile_size=128"])
    assert config_hash(a.data) == config_hash(load_config().data)
    assert config_hash(a.data) != config_hash(b.data)
    assert config_hash(a.data) == config_hash(a.to_dict()["data"])


def test_removed_keys_are_read_when_off_and_refused_otherwise():
    """Runs and checkpoints of medcycle 0.1 hold the keys deleted in 0.2: their 'off' values still load."""
    old = Config().to_dict()
    for key, (off, _) in REMOVED_KEYS.items():
        section, name = key.split(".")
        old[section][name] = off
    assert Config.from_dict(old) == Config()
    with pytest.raises(UsageError, match=r"^config: loss.cycle_noise was removed in medcycle 0.2 \(it measured no gain\); "
                                         r"this config sets 0.1, only 0.0 can still be read$"):
        Config.from_dict({**old, "loss": {**old["loss"], "cycle_noise": 0.1}})
    for assignment in ("model.generator=unet", "train.ema=0.999", "train.crop_size=64", "loss.gradient=1",
                       "loss.paired_ssim=1", "loss.structure_sigma=1.0", "train.ema=false"):
        with pytest.raises(UsageError, match=f"config: {assignment.split('=')[0]} was removed in medcycle 0.2"):
            load_config(None, [assignment])
    assert load_config(None, ["train.crop_size=0", "model.generator=resnet"]) == Config()


def test_resolve_config_takes_a_config_a_path_a_builtin_name_or_nothing(tmp_path):
    from medcycle.config import find_config, resolve_config

    base = resolve_config(None, ["model.gen_width=8"])
    assert base == load_config(None, ["model.gen_width=8"])
    derived = resolve_config(base, ["train.lr=1e-3"])
    assert derived.model.gen_width == 8 and derived.train.lr == 1e-3 and base.train.lr == 2e-4  # base unchanged
    assert resolve_config("demo_cpu") == load_config(find_config("demo_cpu"))
    save_config(derived, tmp_path / "run.yaml")
    assert resolve_config(tmp_path / "run.yaml") == derived and resolve_config(str(tmp_path / "run.yaml")) == derived
    with pytest.raises(UsageError, match=r"train.lr must be in \(0, 1\]"):
        resolve_config(base, ["train.lr=0"])
    with pytest.raises(UsageError, match="config must be a Config, a YAML file or a built-in name, got dict"):
        resolve_config({"train": {}})
