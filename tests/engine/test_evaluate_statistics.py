"""Confidence intervals of a cell's score: Wilson for exact-match scores (checked against the
textbook values), a seeded percentile bootstrap for fractional ones."""
import pytest

from engine.evaluate.statistics import confidence_interval, wilson_interval


def test_wilson_interval_matches_published_values():
    # 8 of 10: [0.4902, 0.9433]; 0 of 10: [0, 0.2775]; 50 of 100: [0.4038, 0.5962].
    assert wilson_interval(8, 10) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_cell_interval_picks_its_method_and_narrows_with_samples():
    exact = confidence_interval([1.0] * 8 + [0.0] * 2)
    assert exact.method == "wilson" and exact.mean == pytest.approx(0.8)
    assert (exact.low, exact.high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    fractional = confidence_interval([1.0, 0.5, 0.75, 1.0] * 25)
    assert fractional.method == "bootstrap" and fractional.mean == pytest.approx(0.8125)
    assert fractional.low < 0.8125 < fractional.high
    # The mean's standard error is 0.2073 / 10: the bootstrap interval is about +-1.96 of it.
    assert fractional.high - fractional.low == pytest.approx(2 * 1.96 * 0.02073, rel=0.15)
    assert confidence_interval([1.0, 0.5, 0.75, 1.0] * 25) == fractional  # seeded
    with pytest.raises(ValueError):
        confidence_interval([])
