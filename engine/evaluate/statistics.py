"""95% confidence intervals of a cell's mean score.

Scores that are all 0 or 1 (an exact match per example) get the Wilson score interval, which
stays inside [0, 1] and is sound for few samples and for means near 0 or 1. Fractional scores
(RULER's string_match_all over several gold values) get a percentile bootstrap over the
examples (2,000 resamples, seeded, so a report is reproducible). Each interval says its method.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float
    method: str  # "wilson" | "bootstrap"
    samples: int

    def describe(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def wilson_interval(successes: float, samples: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion successes / samples."""
    if samples <= 0:
        raise ValueError("a confidence interval needs at least one sample")
    p = successes / samples
    denominator = 1 + z * z / samples
    centre = (p + z * z / (2 * samples)) / denominator
    half = z * math.sqrt(p * (1 - p) / samples + z * z / (4 * samples * samples)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(scores: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap (2.5th and 97.5th) of the mean of `scores`."""
    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("a confidence interval needs at least one sample")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def confidence_interval(scores: Sequence[float]) -> Interval:
    """The 95% interval of the mean of per-example scores in [0, 1]."""
    values = [float(s) for s in scores]
    mean = sum(values) / len(values) if values else float("nan")
    if not values:
        raise ValueError("a confidence interval needs at least one sample")
    if all(v in (0.0, 1.0) for v in values):
        low, high = wilson_interval(sum(values), len(values))
        return Interval(mean, low, high, "wilson", len(values))
    low, high = bootstrap_interval(values)
    return Interval(mean, low, high, "bootstrap", len(values))
