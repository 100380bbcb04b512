"""Calibrated intervals (SegQCLib.calibration): finite-sample conformal ranks, coverage on fresh data,
conditioning on the predicted score and the domain, distances, cards, and the intervals in results."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from SegQCLib.calibration import (Calibration, Pairs, ScoreCalibration, annotate_result, conformal_bounds,
                                  cross_fitted_coverage, fit_calibration)
from SegQCLib.qc import QCResult


def _heteroscedastic(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Predicted DSC uniform in [0, 1]; the truth scatters 0.02 around low predictions and 0.2 around high ones."""
    pred = rng.uniform(0, 1, n)
    true = np.clip(pred + rng.normal(0, 0.02 + 0.2 * pred), 0, 1)
    return pred, true


def test_conformal_ranks_are_the_finite_sample_ones():
    r = np.arange(19, dtype=float)  # 19 residuals: 90 % needs the extreme ranks (n + 1 = 20)
    assert conformal_bounds(r, 0.9) == (0.0, 18.0)
    lo, hi = conformal_bounds(np.arange(10, dtype=float), 0.9)  # too few to promise 95 % on each side
    assert math.isinf(lo) and math.isinf(hi)
    lo, hi = conformal_bounds(np.arange(199, dtype=float), 0.9)
    assert (lo, hi) == (9.0, 189.0)  # ranks floor(200 * 0.05) = 10 and ceil(200 * 0.95) = 190


def test_intervals_cover_fresh_exchangeable_data_in_every_score_bin():
    rng = np.random.default_rng(0)
    cal = ScoreCalibration.fit("dsc", *_heteroscedastic(3000, rng))
    pred, true = _heteroscedastic(40000, rng)
    lo, hi = cal.interval(pred)
    inside = (true >= lo) & (true <= hi)
    assert 0.88 <= inside.mean() <= 0.93
    for part in (pred < 0.3, pred > 0.7):  # Mondrian bins: coverage holds where errors are small and large
        assert 0.86 <= inside[part].mean() <= 0.95
    assert np.all((lo >= 0) & (hi <= 1))
    assert np.median((hi - lo)[pred < 0.2]) < 0.5 * np.median((hi - lo)[pred > 0.8])


def test_one_pooled_bin_undercovers_where_errors_are_large():
    """Why the calibration is conditioned on the predicted score: a single bin misses the noisy range."""
    rng = np.random.default_rng(1)
    fit_pred, fit_true = _heteroscedastic(3000, rng)
    pred, true = _heteroscedastic(40000, rng)
    high = pred > 0.8
    coverage = {}
    for bins in (1, 5):
        lo, hi = ScoreCalibration.fit("dsc", fit_pred, fit_true, max_bins=bins).interval(pred)
        coverage[bins] = ((true >= lo) & (true <= hi))[high].mean()
    assert coverage[1] < 0.87 <= coverage[5]


def test_out_of_domain_inputs_get_their_own_wider_interval():
    rng = np.random.default_rng(2)
    pred = rng.uniform(0, 1, 2000)
    domain = np.where(np.arange(2000) % 2 == 0, "in", "out")
    true = np.clip(pred + rng.normal(0, np.where(domain == "in", 0.03, 0.25)), 0, 1)
    cal = Calibration(0.9, {"volume": {"dsc": ScoreCalibration.fit("dsc", pred, true, domain)}})
    lo_in, hi_in = cal.interval("volume", "dsc", 0.5, "in")
    lo_out, hi_out = cal.interval("volume", "dsc", 0.5, "out")
    assert (hi_out - lo_out) > 3 * (hi_in - lo_in)
    assert cal.has_domain("out") and not cal.has_domain("ct")
    result = QCResult("m", "Brain", {"dsc": 0.5}, [])
    annotate_result(result, cal, "ct")  # a domain never calibrated: the pooled interval, and it says so
    assert result.extra["interval"]["domain_calibrated"] is False
    assert result.volume["dsc_lo"] <= 0.5 <= result.volume["dsc_hi"]


def test_distance_intervals_are_non_negative_and_widen_with_the_distance():
    rng = np.random.default_rng(3)
    pred = rng.uniform(1, 40, 3000)
    true = pred * np.exp(rng.normal(0, 0.3, pred.size))  # multiplicative error, as distances err
    cal = ScoreCalibration.fit("hd95", pred, true)
    lo, hi = cal.interval(np.array([2.0, 30.0]))
    assert lo[0] >= 0 and hi[1] - lo[1] > 5 * (hi[0] - lo[0])
    fresh_pred = rng.uniform(1, 40, 20000)
    fresh_true = fresh_pred * np.exp(rng.normal(0, 0.3, fresh_pred.size))
    lo, hi = cal.interval(fresh_pred)
    assert 0.87 <= np.mean((fresh_true >= lo) & (fresh_true <= hi)) <= 0.93


def test_a_card_round_trips_through_json_with_unbounded_sides():
    rng = np.random.default_rng(4)
    pred, true = _heteroscedastic(500, rng)
    cal = Calibration(0.9, {"volume": {"dsc": ScoreCalibration.fit("dsc", pred, true)},
                            "slice": {"dsc": ScoreCalibration.fit("dsc", pred[:15], true[:15], min_per_bin=5)}})
    text = json.dumps(cal.to_dict())  # plain JSON: no Infinity tokens
    assert "Infinity" not in text
    back = Calibration.from_dict(json.loads(text))
    for level in ("volume", "slice"):
        np.testing.assert_allclose(back.interval(level, "dsc", pred[:50])[0], cal.interval(level, "dsc", pred[:50])[0])
    assert Calibration.from_dict(None) is None and Calibration.from_dict({}) is None


def test_annotate_puts_bounds_beside_every_calibrated_score():
    rng = np.random.default_rng(5)
    pred, true = _heteroscedastic(1000, rng)
    cal = Calibration(0.9, {"volume": {"dsc": ScoreCalibration.fit("dsc", pred, true)},
                            "slice": {"dsc": ScoreCalibration.fit("dsc", pred, true)}})
    result = QCResult.from_slice_scores("m", "Brain", {"dsc": 0.7, "hd95": 3.0},
                                        [{"index": 3, "dsc": 0.2, "hd95": 9.0}, {"index": 4, "dsc": 0.9}])
    annotate_result(result, cal, "in")
    assert result.volume["dsc_lo"] <= 0.7 <= result.volume["dsc_hi"]
    assert "hd95_lo" not in result.volume  # not calibrated: no interval made up
    for row in result.slices:
        assert row["dsc_lo"] <= row["dsc"] <= row["dsc_hi"]
    data = result.to_json_dict()
    assert data["extra"]["interval"] == {"coverage": 0.9, "domain": "in", "method": cal.method,
                                         "domain_calibrated": True}
    uncalibrated = QCResult("m", "Brain", {"dsc": 0.7}, [])
    annotate_result(uncalibrated, None)
    assert uncalibrated.volume == {"dsc": 0.7} and "interval" not in uncalibrated.extra


def test_cross_fitting_measures_coverage_on_cases_it_did_not_fit():
    rng = np.random.default_rng(6)
    pred, true = _heteroscedastic(1200, rng)
    structure = np.array([f"s{i % 12}" for i in range(pred.size)])
    split = np.where(np.arange(pred.size) < 600, "a", "b")
    pairs = Pairs.from_lists(pred, true, ["in"] * pred.size, split, np.arange(pred.size), structure)
    report = cross_fitted_coverage("dsc", pairs)
    assert set(report) == {"all", "a", "b"}
    for entry in report.values():
        assert 0.85 <= entry["coverage"] <= 0.95 and entry["mean_width"] > 0
    calibration, measured = fit_calibration({"volume": {"dsc": pairs}})
    assert set(measured["volume"]["dsc"]) == {"case", "structure"}
    assert calibration.scores["volume"]["dsc"].groups["all"]["n"][0] >= 40
