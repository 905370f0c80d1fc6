"""The package as a user installs it: a wheel that holds medcycle (jobs and built-in configs) and nothing else."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from medcycle.config import BUILTIN_CONFIGS, find_config, load_config
from medcycle.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "medcycle", source / "medcycle", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("medcycle-*.whl")
    return zipfile.ZipFile(built)


def test_wheel_installs_medcycle_alone_with_its_jobs_and_configs(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"medcycle"}  # no generic 'pipelines', no tests
    for job in ("phantom", "preprocess", "train", "convert", "export", "evaluate", "demo"):
        assert f"medcycle/jobs/{job}.py" in names
    shipped = {Path(n).name for n in names if n.startswith("medcycle/configs/")}
    assert shipped == {p.name for p in BUILTIN_CONFIGS.glob("*.yaml")} and "demo_cpu.yaml" in shipped
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "medcycle = medcycle.cli:main" in wheel.read(entry_points).decode()


def test_builtin_configs_by_name_and_by_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder: nothing of the checkout around
    by_name = load_config("demo_cpu")
    assert find_config("demo_cpu.yaml") == BUILTIN_CONFIGS / "demo_cpu.yaml"
    assert by_name == load_config(BUILTIN_CONFIGS / "demo_cpu.yaml")
    assert by_name.data.tile_size == 112
    with pytest.raises(UsageError, match="config file not found: nonsense .*demo_cpu"):
        load_config("nonsense")
    local = tmp_path / "demo_cpu"  # a file of that name in the working folder wins over the built-in
    local.write_text("data:\n  tile_size: 64\n")
    assert load_config("demo_cpu").data.tile_size == 64
