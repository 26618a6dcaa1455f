"""Statistics and figures shared by both modes of ``benchmarks/learning.py``.

Every comparison is paired: two algorithms that started from the same weights are scored on the same
held-out questions, so the per-question difference removes question difficulty from the noise. The
interval is a percentile bootstrap over questions (seeded, so a rerun prints the same interval).
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

BOOTSTRAP_SAMPLES = 2000


def paired_difference(
    ours: Mapping[str, float], baseline: Mapping[str, float], seed: int
) -> dict[str, float]:
    """Mean of ``ours[q] - baseline[q]`` over the shared questions, with a bootstrap 95 % interval."""
    questions = sorted(set(ours) & set(baseline))
    if not questions:
        raise ValueError("the two runs share no held-out question")
    diffs = np.array([ours[q] - baseline[q] for q in questions])
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(BOOTSTRAP_SAMPLES, len(diffs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return {"diff": float(diffs.mean()), "low": float(low), "high": float(high), "questions": len(questions)}


def pooled_difference(
    runs: Sequence[tuple[Mapping[str, float], Mapping[str, float]]], seed: int
) -> dict[str, float]:
    """Mean over seeds of the paired difference, with a bootstrap interval that resamples questions
    within every seed (the seeds are the fixed design, the questions the sample)."""
    diffs = []
    for ours, baseline in runs:
        shared = sorted(set(ours) & set(baseline))
        diffs.append(np.array([ours[q] - baseline[q] for q in shared]))
    rng = np.random.default_rng(seed)
    boot = np.mean(
        [d[rng.integers(0, len(d), size=(BOOTSTRAP_SAMPLES, len(d)))].mean(axis=1) for d in diffs], axis=0
    )
    low, high = np.percentile(boot, [2.5, 97.5])
    return {
        "diff": float(np.mean([d.mean() for d in diffs])),
        "low": float(low),
        "high": float(high),
        "seeds": len(diffs),
    }


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot_curves_with_band(
    curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]], path: Path, ylabel: str, title: str
) -> Path:
    """One line per algorithm: the mean over seeds of ``(step, value)`` curves, with a min-max band.

    Curves of one algorithm must share their steps (every seed is evaluated at the same steps).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for name, seeds in curves.items():
        steps = [step for step, _ in seeds[0]]
        values = np.array([[value for _, value in curve] for curve in seeds])
        ax.plot(steps, values.mean(axis=0), marker="o", label=f"{name} (n={len(seeds)})")
        ax.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.15)
    ax.set_xlabel("RL step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
