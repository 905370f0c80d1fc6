"""The benchmark scripts run (in their quick modes) and print their tables with real numbers.

Their figures are measured by hand (README); these tests only keep the scripts from rotting, as
``bench_convert.py --quick`` once did when the demo tile outgrew its test volume.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True,
                            text=True, encoding="utf-8", errors="replace", env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def table_rows(text: str, first_cell: str) -> list[list[str]]:
    rows = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith(f"| {first_cell}")]
    return [[cell.strip() for cell in row] for row in rows]


def test_bench_convert_quick_times_both_models_and_compares_with_fp32():
    out = run_script("bench_convert.py", "--quick", "--rounds", "1", "--fit-seconds", "0", "--skip-large")
    rows = table_rows(out, "256-px") + table_rows(out, "demo")
    assert len(rows) == 2, out
    bf16 = re.search(r"CPU bf16 autocast: (yes|no)", out).group(1) == "yes"
    for row in rows:
        naive, fast, speedup, fp32 = float(row[2]), float(row[3]), float(row[4].rstrip("x")), float(row[5])
        assert naive > 0 and fast > 0 and fp32 > 0
        half = 0.05  # one round: the speed-up is the ratio of the two times, which the table rounds to 0.1 s
        assert (naive - half) / (fast + half) - 0.01 <= speedup <= (naive + half) / max(fast - half, 1e-9) + 0.01
        mae_fp32_body = float(row[8])
        if bf16:
            assert 0 < mae_fp32_body < 100  # bf16 against fp32 of the same windows: rounding, not another image
        else:
            assert mae_fp32_body == 0  # without native bf16 the fast path computes in fp32: the same image
    ensemble = table_rows(out, "one model") + table_rows(out, "ensemble of 3 + uncertainty")
    assert len(ensemble) == 2, out
    (one, one_cost), (three, cost) = [(float(row[1]), float(row[2].rstrip("x"))) for row in ensemble]
    assert one_cost == 1.0
    half = 0.05  # the table rounds times to 0.1 s
    assert (three - half) / (one + half) - 0.01 <= cost <= (three + half) / max(one - half, 1e-9) + 0.01
    assert cost > 1.2  # three generators and the spread cost more than one, whatever the machine's noise


def test_bench_train_quick_times_every_variant_against_the_reference():
    out = run_script("bench_train.py", "--quick", "--no-compile", "--rounds", "1", "--sizes", "64")
    rows = table_rows(out, "64 px")
    native_bf16 = "bf16 not native" not in out
    expected = ["reference", "medcycle-fp32", "medcycle-bf16", "medcycle-bf16-cl"] if native_bf16 else \
        ["reference", "medcycle-fp32", "medcycle-fp32-cl"]
    assert [row[1] for row in rows] == expected, out
    assert rows[0][4] == "1.00x"
    gflop = {float(row[5]) for row in rows}
    assert len({round(g) for g in gflop}) == 1  # the same network and step size in every variant
    assert all(float(row[2]) > 0 and float(row[6]) > 0 for row in rows)
    assert re.search(r"matmul peak fp32 \d+ GFLOP/s, bf16 (\d+ GFLOP/s|not native)", out)


def test_bench_preprocess_quick_compares_with_the_baseline_and_workers():
    out = run_script("bench_preprocess.py", "--quick")
    baseline, medcycle = table_rows(out, "baseline")[0], table_rows(out, "medcycle preprocess")[0]
    ratio = float(re.search(r"\| ratio medcycle / baseline \| ([\d.]+)x", out).group(1))
    (m, b), half = (float(medcycle[1]), float(baseline[1])), 0.005  # the table rounds times to 2 decimals
    assert (m - half) / (b + half) <= ratio <= (m + half) / max(b - half, 1e-9)
    workers = [row for row in (table_rows(out, "1") + table_rows(out, "2")) if len(row) == 4]
    assert len(workers) == 2 and all(float(row[1]) > 0 for row in workers)
    assert re.search(r"\| speed-up \| [\d.]+x", out)


def test_bench_quality_floors_cost_nothing_on_the_input_grid_and_something_on_a_coarser_one(tmp_path):
    """The rows no recipe can beat: the grid floors vanish when the model grid is the input grid."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality
    import medcycle.jobs.phantom

    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    cases = medcycle.jobs.phantom.run(out=tmp_path / "phantom", cases=4, seed=3, size="small")  # 3 x 3 mm in-plane
    train_dir.mkdir()
    test_dir.mkdir()
    for case in cases[:3]:
        case.rename(train_dir / case.name)
    cases[3].rename(test_dir / cases[3].name)  # index 3: a straight (not oblique) affine

    native = {row["recipe"]: row for row in bench_quality.floors(train_dir, test_dir, ["data.spacing=[3.0,3.0]"])}
    coarse = {row["recipe"]: row for row in bench_quality.floors(train_dir, test_dir, ["data.spacing=[6.0,6.0]"])}
    assert set(native) == {"floor: model grid", "floor: tissue oracle", "floor: tissue oracle, model grid"}
    assert native["floor: model grid"]["mae"] < 1.0  # same grid: nothing resampled
    assert coarse["floor: model grid"]["mae"] > 20.0  # thin bone cannot survive 6 mm
    oracle = native["floor: tissue oracle"]
    assert oracle == coarse["floor: tissue oracle"]  # the oracle does not depend on the model grid
    assert 5.0 < oracle["mae"] < 300.0 and oracle["mae_bone"] > oracle["mae"]  # per-case tissue values: not zero
    # the oracle through the model grid: unchanged on the input grid, worse than both floors on a coarser one
    assert abs(native["floor: tissue oracle, model grid"]["mae"] - oracle["mae"]) < 1.0
    coarse_oracle = coarse["floor: tissue oracle, model grid"]
    assert coarse_oracle["mae"] > max(oracle["mae"], coarse["floor: model grid"]["mae"]) + 5.0


def test_bench_quality_validation_cases_are_the_caches_val_split_and_the_table_shows_both_val_columns(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_quality

    train_dir, cache = tmp_path / "train", tmp_path / "cache"
    for case in ("a", "b", "c"):
        (train_dir / case).mkdir(parents=True)
    cache.mkdir()
    splits = {"a": "train", "b": "val", "c": "val"}
    (cache / "manifest.json").write_text(json.dumps({"cases": {k: {"split": v} for k, v in splits.items()}}))
    val_dir = bench_quality.validation_cases(cache, train_dir, tmp_path / "val")
    assert sorted(p.name for p in val_dir.iterdir()) == ["b", "c"]
    assert (val_dir / "b").resolve() == (train_dir / "b").resolve()
    assert bench_quality.validation_cases(cache, train_dir, tmp_path / "val") == val_dir  # again: the links stay

    row = {"recipe": "demo", "what": "x", "iterations": 10, "val_mae": 181.2, "val_volume_mae": 151.6,
           "mae": 143.4, "mae_bone": 386.0, "mae_air": None, "psnr": 23.5, "ssim": 0.786}
    cells = table_rows(bench_quality.markdown([row]), "demo")[0]
    assert cells[2:6] == ["10", "181", "152", "143"] and cells[7] == "-"


def test_bench_export_quick_gives_the_run_s_sct_and_an_onnx_sct_within_1_hu():
    out = run_script("bench_export.py", "--quick")
    cells = {row[0]: row[1] for row in table_rows(out, "") if len(row) == 3}
    assert cells["sCT from the model folder == sCT from the run"] == "identical", out
    assert float(cells["model folder size (weights + ONNX + configs)"].split()[0]) <= 10.0
    assert float(cells["ONNX sCT against medcycle's, body MAE"].split()[0]) <= 1.0
