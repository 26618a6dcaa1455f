"""Training-time series from ``metrics.jsonl``: categories, group homogeneity, reward / EM, validation.

Key names are those of docs/metrics.md. Everything here is a pure function of the series
(``{key: (steps, values)}`` from :func:`metric_series`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Series = tuple[np.ndarray, np.ndarray]

CATEGORY_KEYS = (
    "category/near_miss",
    "category/complete_failure",
    "category/success_without_retrieval",
    "category/complete_success",
)
HOMOGENEITY_KEYS = (
    "groups/all_wrong",
    "groups/all_right",
    "groups/outcome_homogeneous",
    "groups/zero_advantage",
)
REWARD_KEYS = ("reward/mean", "outcome/mean", "reward/std_in_group", "rollout/first_hit_rate")
SUMMARY_KEYS = (
    "reward/mean",
    "outcome/mean",
    *CATEGORY_KEYS,
    *HOMOGENEITY_KEYS,
    "reward/std_in_group",
    "rollout/searches_per_traj",
    "rollout/first_hit_rate",
    "rollout/response_length",
    "eval/em",
    "eval/f1",
    "val/all/em",
    "val/average/em",
)


def metric_series(records: Sequence[Mapping[str, Any]]) -> dict[str, Series]:
    """Numeric curves by key. When a step repeats for a key the last value wins (strings/nulls skipped)."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        step = record["step"]
        for key, value in record.items():
            if key in ("step", "time") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            by_key.setdefault(key, {})[step] = float(value)
    series = {}
    for key, points in by_key.items():
        steps = np.array(sorted(points), dtype=float)
        series[key] = (steps, np.array([points[int(s)] for s in steps], dtype=float))
    return series


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); ``weight`` 0 returns the input.

    s_t = weight * s_{t-1} + (1 - weight) * x_t, reported as s_t / (1 - weight^t) so early points are not
    pulled towards 0. Linear, so smoothed parts of a whole still sum to the smoothed whole.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    if weight == 0.0 or len(values) == 0:
        return values
    out = np.empty_like(values, dtype=float)
    running = 0.0
    for i, value in enumerate(values):
        running = weight * running + (1.0 - weight) * value
        out[i] = running / (1.0 - weight ** (i + 1))
    return out


def matching_keys(series: Mapping[str, Series], patterns: Sequence[str]) -> list[str]:
    """Keys of ``series`` matching any ``fnmatch`` pattern, in pattern order, each once."""
    keys: list[str] = []
    for pattern in patterns:
        keys.extend(k for k in sorted(series) if fnmatch.fnmatchcase(k, pattern) and k not in keys)
    return keys


@dataclass(frozen=True)
class CurveSummary:
    """First and last logged value of one key, with the extremes in between."""

    key: str
    first_step: int
    first: float
    last_step: int
    last: float
    minimum: float
    maximum: float
    points: int

    @property
    def change(self) -> float:
        return self.last - self.first


def summarize_curve(key: str, series: Series) -> CurveSummary:
    steps, values = series
    finite = np.isfinite(values)
    steps, values = steps[finite], values[finite]
    if len(values) == 0:
        raise ValueError(f"{key} has no finite value")
    return CurveSummary(
        key=key,
        first_step=int(steps[0]),
        first=float(values[0]),
        last_step=int(steps[-1]),
        last=float(values[-1]),
        minimum=float(values.min()),
        maximum=float(values.max()),
        points=len(values),
    )


def curve_summaries(series: Mapping[str, Series], keys: Sequence[str] = SUMMARY_KEYS) -> list[CurveSummary]:
    """:class:`CurveSummary` of each of ``keys`` that was logged with at least one finite value."""
    out = []
    for key in keys:
        if key in series and np.isfinite(series[key][1]).any():
            out.append(summarize_curve(key, series[key]))
    return out


def sample_steps(series: Mapping[str, Series], keys: Sequence[str], count: int = 6) -> list[int]:
    """Up to ``count`` steps spread evenly over the steps at which any of ``keys`` was logged
    (first and last always included)."""
    steps = sorted({int(s) for key in keys if key in series for s in series[key][0]})
    if len(steps) <= count:
        return steps
    positions = np.linspace(0, len(steps) - 1, count).round().astype(int)
    return [steps[i] for i in sorted(set(positions.tolist()))]


def value_at(series: Series, step: int) -> float | None:
    """The value logged at ``step`` (None when the key was not logged then)."""
    steps, values = series
    hits = np.nonzero(steps == step)[0]
    return float(values[hits[-1]]) if len(hits) else None


def validation_datasets(series: Mapping[str, Series], prefix: str = "val") -> list[str]:
    """Datasets with a ``<prefix>/<dataset>/em`` curve (``all`` / ``average`` excluded)."""
    names = set()
    for key in series:
        parts = key.split("/")
        if len(parts) == 3 and parts[0] == prefix and parts[2] == "em":
            names.add(parts[1])
    return sorted(names - {"all", "average", ""})
