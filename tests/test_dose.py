"""Dose metrics: plan geometry and metrics on dose arrays (numpy only), gamma (pymedphys), and the
engine (pyRadPlan) on a tiny synthetic head: CT against itself, bone set to soft tissue, 2 mm shift.

The engine tests need ``pip install "medcycle[dose]"`` and are skipped, saying so, without it.
"""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from scipy import ndimage

from helpers import tiny_head
from medcycle import dose

HAS_PYMEDPHYS = importlib.util.find_spec("pymedphys") is not None
HAS_ENGINE = dose.available()
needs_gamma = pytest.mark.skipif(not HAS_PYMEDPHYS, reason="pymedphys not installed (pip install 'medcycle[dose]')")
needs_engine = pytest.mark.skipif(not HAS_ENGINE, reason=f"dose extra not installed: {dose.unavailable_reason()}")

SPACING = (3.0, 3.0, 3.0)


# --------------------------------------------------------------------------------------------------
# settings, availability, plan geometry


def test_settings_defaults_and_validation():
    photon, proton = dose.PlanSettings("photon"), dose.PlanSettings("proton")
    assert photon.prescription_gy == proton.prescription_gy == 2.0
    assert photon.angles == (0.0, 72.0, 144.0, 216.0, 288.0)
    assert proton.angles == (90.0, 270.0)
    assert dose.PlanSettings("proton", gantry_angles=(0, 45, 90)).angles == (0.0, 45.0, 90.0)
    with pytest.raises(ValueError, match="modality"):
        dose.PlanSettings("carbon")
    with pytest.raises(ValueError, match="dose_grid_mm"):
        dose.PlanSettings("photon", dose_grid_mm=0.0)
    with pytest.raises(ValueError, match="max_iterations"):
        dose.PlanSettings("photon", max_iterations=0)


def test_availability_names_the_missing_packages(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyRadPlan" else real(name, *a))
    assert dose.available() is False
    reason = dose.unavailable_reason()
    assert "pyRadPlan" in reason and "medcycle[dose]" in reason
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    assert dose.available() is True and dose.unavailable_reason() == ""


def test_brain_region_is_inside_the_skull():
    hu = tiny_head()
    brain = dose.brain_region(hu, SPACING)
    assert brain.any()
    assert np.all(hu[brain] == 30.0)  # brain tissue only: no skull, scalp or sinus
    # most of the brain is found (the top and bottom slices of the skull may not close)
    assert brain.sum() > 0.8 * np.count_nonzero(hu == 30.0)


def test_default_target_is_a_30_mm_sphere_at_the_brain_centre():
    hu = tiny_head()
    target = dose.default_target(hu, SPACING)
    brain = dose.brain_region(hu, SPACING)
    assert not np.any(target & ~brain)
    centre = np.array(ndimage.center_of_mass(target))
    assert np.allclose(centre, ndimage.center_of_mass(brain), atol=0.6)
    volume = target.sum() * np.prod(SPACING)
    assert volume == pytest.approx(4 / 3 * math.pi * 15.0**3, rel=0.2)
    bigger = dose.default_target(hu, SPACING, diameter_mm=45.0)
    assert bigger.sum() > 2.5 * target.sum()


def test_default_target_without_a_skull_uses_the_body_and_refuses_an_empty_ct():
    hu = tiny_head()
    hu[hu >= 250] = 40.0  # no bone: no closed skull anywhere
    assert not dose.brain_region(hu, SPACING).any()
    target = dose.default_target(hu, SPACING)
    assert target.any() and np.all(hu[target] > -400)
    with pytest.raises(ValueError, match="no body"):
        dose.default_target(np.full((20, 20, 10), -1000.0), SPACING)
    with pytest.raises(ValueError, match="3D"):
        dose.default_target(np.zeros((20, 20)), SPACING)
    with pytest.raises(ValueError, match="spacing"):
        dose.default_target(hu, (3.0, 3.0))


def test_organ_at_risk_is_the_brain_outside_the_target_margin():
    hu = tiny_head()
    target = dose.default_target(hu, SPACING)
    oar = dose.organ_at_risk(hu, SPACING, target)
    brain = dose.brain_region(hu, SPACING)
    assert oar.any() and not np.any(oar & ~brain)
    distance = ndimage.distance_transform_edt(~target, sampling=SPACING)
    assert distance[oar].min() > 5.0
    assert np.all(oar[brain & (distance > 5.0)])


# --------------------------------------------------------------------------------------------------
# metrics on dose arrays


def test_high_dose_error_hand_computed():
    ref = np.array([2.0, 1.8, 1.79, 0.5, 2.2])  # >= 1.8 Gy (90 % of 2 Gy): first, second, last
    ev = np.array([2.1, 1.7, 0.0, 9.0, 2.2])
    assert dose.high_dose_error(ref, ev, 2.0) == pytest.approx(100 * (0.1 + 0.1 + 0.0) / 3 / 2.0)
    assert dose.high_dose_error(ref, ref, 2.0) == 0.0
    assert math.isnan(dose.high_dose_error(ref * 0.1, ref, 2.0))
    with pytest.raises(ValueError, match="shape"):
        dose.high_dose_error(ref, ref[:3], 2.0)


def test_dvh_metrics_hand_computed():
    values = np.arange(101, dtype=np.float64)  # 0..100 Gy
    target = np.ones(101, dtype=bool)
    oar = values >= 50  # 50..100
    out = dose.dvh_metrics(values, target, oar)
    assert out["target_d98"] == pytest.approx(2.0)  # 98 % of the volume gets at least 2 Gy
    assert out["oar_dmean"] == pytest.approx(75.0)
    assert out["oar_d2"] == pytest.approx(99.0)
    empty = dose.dvh_metrics(values, np.zeros(101, bool), np.zeros(101, bool))
    assert all(math.isnan(v) for v in empty.values())


def _synthetic_dose(shape=(40, 40, 20), spacing=(2.0, 2.0, 2.0), centre_shift_mm=0.0):
    """A 2 Gy plateau (30 mm radius) with a 10 mm wide sigmoid fall-off, (X, Y, Z)."""
    idx = np.indices(shape, dtype=np.float64)
    centre = [(n - 1) / 2 for n in shape]
    mm = [(i - c) * s for i, c, s in zip(idx, centre, spacing)]
    mm[0] = mm[0] - centre_shift_mm
    r = np.sqrt(sum(x**2 for x in mm))
    return 2.0 / (1.0 + np.exp((r - 18.0) / 2.0))


@needs_gamma
def test_gamma_of_identical_and_scaled_doses():
    ref = _synthetic_dose()
    assert dose.gamma_pass_rate(ref, ref, (2.0, 2.0, 2.0), 2.0) == 100.0
    assert dose.gamma_pass_rate(ref, ref * 1.015, (2.0, 2.0, 2.0), 2.0) == 100.0  # within 2 % of 2 Gy
    flat = np.full((12, 12, 6), 2.0)  # no gradient to hide in: the dose criterion alone decides
    assert dose.gamma_pass_rate(flat, flat * 1.015, (2.0, 2.0, 2.0), 2.0) == 100.0
    assert dose.gamma_pass_rate(flat, flat * 1.025, (2.0, 2.0, 2.0), 2.0) == 0.0
    # global: 2 % of the normalisation, not of the local dose
    assert dose.gamma_pass_rate(flat, flat * 1.025, (2.0, 2.0, 2.0), 4.0) == 100.0


@needs_gamma
def test_gamma_of_shifted_doses_follows_the_distance_criterion():
    ref = _synthetic_dose()
    one_mm = dose.gamma_pass_rate(ref, _synthetic_dose(centre_shift_mm=1.0), (2.0, 2.0, 2.0), 2.0)
    four_mm = dose.gamma_pass_rate(ref, _synthetic_dose(centre_shift_mm=4.0), (2.0, 2.0, 2.0), 2.0)
    assert one_mm == 100.0
    assert four_mm < 90.0


@needs_gamma
def test_gamma_scores_only_voxels_above_the_cutoff():
    ref = _synthetic_dose()
    ev = ref.copy()
    low = ref < 0.2  # below 10 % of 2 Gy: not scored, however wrong
    ev[low] = 1.9
    assert dose.gamma_pass_rate(ref, ev, (2.0, 2.0, 2.0), 2.0) == 100.0
    assert math.isnan(dose.gamma_pass_rate(ref * 0.01, ref, (2.0, 2.0, 2.0), 2.0))
    with pytest.raises(ValueError, match="shape"):
        dose.gamma_pass_rate(ref, ref[:-1], (2.0, 2.0, 2.0), 2.0)


@needs_gamma
def test_dose_metrics_of_identical_and_different_doses():
    ref = _synthetic_dose()
    target = ref >= 1.9
    oar = (ref < 1.0) & (ref > 0.3)
    same = dose.dose_metrics(ref, ref, (2.0, 2.0, 2.0), 2.0, target, oar)
    assert tuple(same) == dose.DOSE_METRIC_KEYS
    assert same == {"dose_error": 0.0, "gamma_pass": 100.0, "target_d98": 0.0, "oar_dmean": 0.0, "oar_d2": 0.0}
    hotter = dose.dose_metrics(ref, ref * 1.05, (2.0, 2.0, 2.0), 2.0, target, oar)
    assert hotter["dose_error"] == pytest.approx(100 * 0.05 * ref[ref >= 1.8].mean() / 2.0)
    d98 = np.percentile(ref[target], 2)
    assert hotter["target_d98"] == pytest.approx(100 * 0.05 * d98 / 2.0)
    assert hotter["oar_dmean"] > 0 and hotter["oar_d2"] > 0 and hotter["gamma_pass"] < 100.0


def test_dose_figure_is_written(tmp_path):
    ref = _synthetic_dose()
    target = ref >= 1.9
    result = dose.DoseResult(modality="proton", metrics={"dose_error": 1.0, "gamma_pass": 97.5, "target_d98": -0.5,
                                                         "oar_dmean": 0.1, "oar_d2": 0.2},
                             dose_ct=ref, dose_sct=ref * 1.02, dose_spacing=(2.0, 2.0, 2.0), target=target,
                             plan_seconds=1.0, recompute_seconds=1.0)
    path = dose.dose_figure(tmp_path / "case" / "dose_proton.png", result)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["dose_proton.png"]  # no temporary file left


# --------------------------------------------------------------------------------------------------
# the engine (pyRadPlan) on a tiny head


@pytest.fixture(scope="module")
def plans():
    """The photon and proton plans of the tiny head (made once: the engine takes seconds)."""
    hu = tiny_head()
    return hu, {m: dose.make_plan(hu, SPACING, dose.PlanSettings(m, max_iterations=40)) for m in dose.MODALITIES}


def _score(plan, sct):
    return dose.dose_metrics(plan.dose, dose.recompute(plan, sct), plan.dose_spacing, 2.0, plan.dose_target,
                             plan.dose_oar)


@needs_engine
@pytest.mark.parametrize("modality", dose.MODALITIES)
def test_a_plan_covers_its_target(plans, modality):
    hu, by_modality = plans
    plan = by_modality[modality]
    assert plan.dose_spacing == (3.0, 3.0, 3.0)
    in_target = plan.dose[plan.dose_target]
    assert in_target.mean() == pytest.approx(2.0, abs=0.05)
    assert np.percentile(in_target, 2) > 1.8  # D98 > 90 % of the prescription
    assert plan.dose[plan.dose_oar].mean() < 1.2
    assert plan.dose.max() < 2.4


@needs_engine
@pytest.mark.parametrize("modality", dose.MODALITIES)
def test_the_ct_against_itself_scores_perfectly(plans, modality):
    hu, by_modality = plans
    result = _score(by_modality[modality], hu.copy())
    assert result == {"dose_error": 0.0, "gamma_pass": 100.0, "target_d98": 0.0, "oar_dmean": 0.0, "oar_d2": 0.0}


@needs_engine
def test_bone_set_to_soft_tissue_shows_in_the_proton_dose(plans):
    hu, by_modality = plans
    no_bone = np.where(hu >= 250, 40.0, hu).astype(np.float32)
    proton = _score(by_modality["proton"], no_bone)
    photon = _score(by_modality["photon"], no_bone)
    assert proton["dose_error"] > 5.0  # measured 9.3 % (docs/results/dose.md)
    assert proton["gamma_pass"] < 97.0  # measured 94.2 %
    # photons barely notice (the observation: photon gamma saturates)
    assert photon["gamma_pass"] > proton["gamma_pass"]
    assert 0 < photon["dose_error"] < proton["dose_error"]


@needs_engine
def test_a_2_mm_shift_shows_in_the_proton_dose(plans):
    hu, by_modality = plans
    shifted = ndimage.shift(hu, (2.0 / SPACING[0], 0.0, 0.0), order=1, mode="nearest").astype(np.float32)
    proton = _score(by_modality["proton"], shifted)
    assert proton["dose_error"] > 1.5  # measured 2.9 %
    assert proton["gamma_pass"] < 99.0  # measured 97.4 %


@needs_engine
def test_make_plan_takes_a_given_target_and_refuses_bad_ones():
    hu = tiny_head()
    target = np.zeros(hu.shape, dtype=bool)
    target[24:29, 26:31, 9:13] = True
    plan = dose.make_plan(hu, SPACING, dose.PlanSettings("proton", max_iterations=20), target=target)
    assert np.array_equal(plan.target, target)
    with pytest.raises(ValueError, match="empty"):
        dose.make_plan(hu, SPACING, dose.PlanSettings("proton"), target=np.zeros(hu.shape))
    with pytest.raises(ValueError, match="shape"):
        dose.make_plan(hu, SPACING, dose.PlanSettings("proton"), target=target[:-1])
    with pytest.raises(ValueError, match="shape"):
        dose.recompute(plan, hu[:-1])
