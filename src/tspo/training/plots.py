"""PNG plots of a run's metrics.jsonl (DESIGN section 8), and overlays of several runs.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it is safe
to call from a training process, a notebook or a headless server. Key names are those of
docs/metrics.md; missing keys are skipped, figures without any data are not written.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tspo.training.metrics import read_metrics

Series = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step


@dataclass(frozen=True)
class Panel:
    """One subplot: the keys it draws (``fnmatch`` patterns allowed) and how."""

    title: str
    keys: tuple[str, ...]
    ylabel: str
    stacked: bool = False  # stacked areas (parts of a whole: categories, time split)
    smooth: bool = True  # False for sparse series such as evaluations


CATEGORY_KEYS = (
    "category/complete_failure",
    "category/near_miss",
    "category/complete_success",
    "category/success_without_retrieval",
)
TIME_KEYS = ("time/generate", "time/retrieve", "time/score", "time/update", "time/other")

FIGURES: dict[str, tuple[Panel, ...]] = {
    "curves.png": (
        Panel("Reward", ("reward/mean",), "mean reward"),
        Panel("Train EM (outcome)", ("outcome/mean",), "fraction correct"),
        # Greedy and sampled (runs before both were logged have eval/em only).
        Panel("Held-out EM", ("eval/greedy/em", "eval/sampled/em", "eval/*/em"), "exact match", smooth=False),
        Panel("Searches per trajectory", ("rollout/searches_per_traj",), "searches"),
        Panel("Response length", ("rollout/response_length",), "tokens"),
        Panel(
            "Group homogeneity",
            ("groups/all_wrong", "groups/all_right", "groups/zero_advantage"),
            "fraction of groups",
        ),
    ),
    "actor.png": (
        Panel("KL to reference", ("actor/kl",), "KL (nats/token)"),
        Panel("Entropy", ("actor/entropy",), "nats/token"),
        Panel("Clip fraction", ("actor/clip_fraction",), "fraction of tokens"),
        Panel("Gradient norm", ("actor/grad_norm",), "L2 norm (before clipping)"),
    ),
    "categories.png": (
        Panel("Trajectory categories", CATEGORY_KEYS, "fraction of trajectories", stacked=True),
    ),
    "timing.png": (
        Panel("Step time split", TIME_KEYS, "seconds", stacked=True),
        Panel("Throughput", ("perf/tokens_per_second",), "generated tokens / s"),
    ),
}

DEFAULT_COMPARE_KEYS = (
    "reward/mean",
    "outcome/mean",
    "eval/em",
    "rollout/searches_per_traj",
    "rollout/response_length",
    "groups/all_wrong",
    "groups/zero_advantage",
    "actor/kl",
    "actor/entropy",
    "actor/clip_fraction",
    "actor/grad_norm",
    "time/step",
)


# --------------------------------------------------------------------------------------------- data
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


def _panel_keys(panel: Panel, available: Mapping[str, Series]) -> list[str]:
    keys: list[str] = []
    for pattern in panel.keys:
        keys.extend(k for k in sorted(available) if fnmatch.fnmatchcase(k, pattern) and k not in keys)
    return keys


# --------------------------------------------------------------------------------------------- drawing
def _new_figure(n_panels: int, ncols: int = 3, extra_width: float = 0.0) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, n_panels))
    nrows = -(-n_panels // ncols)
    fig = Figure(figsize=(4.6 * ncols + extra_width, 3.4 * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for extra in axes[n_panels:]:
        extra.set_visible(False)
    return fig, axes[:n_panels]


def _line(
    ax: Any, steps: np.ndarray, values: np.ndarray, *, label: str, smooth: float, color: Any = None
) -> None:
    marker = "o" if len(steps) <= 20 else None
    if smooth > 0 and len(steps) > 1:
        (raw,) = ax.plot(steps, values, alpha=0.25, linewidth=1.0, color=color)
        ax.plot(
            steps, ema(values, smooth), label=label, color=raw.get_color(), linewidth=1.8, marker=marker, ms=3
        )
    else:
        ax.plot(steps, values, label=label, color=color, linewidth=1.6, marker=marker, ms=3)


def _stacked(ax: Any, keys: list[str], series: Mapping[str, Series], smooth: float) -> None:
    steps = np.array(sorted({float(s) for key in keys for s in series[key][0]}))
    layers = []
    for key in keys:
        lookup = dict(zip(series[key][0].tolist(), series[key][1].tolist(), strict=True))
        layer = np.array([lookup.get(s, 0.0) for s in steps.tolist()])
        layers.append(ema(layer, smooth) if smooth > 0 else layer)
    ax.stackplot(steps, *layers, labels=[key.split("/", 1)[-1] for key in keys], alpha=0.85)


def _draw_panel(ax: Any, panel: Panel, keys: list[str], series: Mapping[str, Series], smooth: float) -> None:
    weight = smooth if panel.smooth else 0.0
    if panel.stacked:
        _stacked(ax, keys, series, weight)
    else:
        for key in keys:
            _line(ax, *series[key], label=key, smooth=weight)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.stacked:  # areas fill the axes: keep the legend beside them
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), reverse=True)
    elif len(keys) > 1:
        ax.legend(fontsize="small", loc="best")


def save_png(fig: Figure, path: Path) -> Path:
    """Write the PNG atomically (a reader never sees half an image)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None, smooth: float = 0.6) -> list[Path]:
    """Write the main curves of one run as PNG files; returns the paths written.

    Figures (each only if some of its keys were logged): ``curves.png`` (reward, train EM, held-out EM,
    searches, response length, group homogeneity), ``actor.png`` (KL, entropy, clip fraction, grad norm),
    ``warmstart.png`` (the supervised warm start's loss per SFT step),
    ``categories.png`` (stacked category fractions), ``timing.png`` (stacked time split, tokens/s).

    Args:
        run_dir: a run directory holding ``metrics.jsonl``.
        out_dir: where to write (default ``RUN_DIR/plots``).
        smooth: EMA weight in [0, 1) for the bold curves (raw values are drawn faintly); 0 disables.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    series = metric_series(records)
    if not any(k.startswith("eval/greedy/") for k in series) and "eval/em" in series:
        series["eval/greedy/em"] = series["eval/em"]
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    written: list[Path] = []
    warm = [(r["warmstart/step"], r["warmstart/loss"]) for r in records if "warmstart/loss" in r]
    if warm:
        # The warm start is logged at RL step 0, one line per SFT step: its own x axis.
        fig, (ax,) = _new_figure(1)
        steps, losses = (np.array(column, dtype=float) for column in zip(*sorted(warm), strict=True))
        _line(ax, steps, losses, label="warmstart/loss", smooth=smooth)
        ax.set(title="Warm start (supervised)", xlabel="SFT step", ylabel="loss (nats/token)")
        ax.grid(alpha=0.3)
        written.append(save_png(fig, out / "warmstart.png"))
    for filename, panels in FIGURES.items():
        drawable = [(panel, keys) for panel in panels if (keys := _panel_keys(panel, series))]
        if not drawable:
            continue
        # Stacked panels carry their legend outside the axes: give it room.
        fig, axes = _new_figure(len(drawable), extra_width=2.2 * any(panel.stacked for panel, _ in drawable))
        for ax, (panel, keys) in zip(axes, drawable, strict=True):
            _draw_panel(ax, panel, keys, series, smooth)
        fig.suptitle(f"{run_dir.resolve().name} — {filename.removesuffix('.png')}")
        written.append(save_png(fig, out / filename))
    return written


def plot_runs(
    run_dirs: Sequence[str | Path],
    out_path: str | Path,
    keys: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    smooth: float = 0.6,
) -> Path:
    """Overlay several runs' curves, one panel per key, into one PNG; returns ``out_path``.

    Args:
        keys: metric keys to draw (default: the main curves any run has logged). A key no run has
            logged is an error listing the keys that exist.
        labels: legend entries, one per run (default: the run directory names).
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    paths = [Path(d) for d in run_dirs]
    if labels is None:
        names = [p.resolve().name for p in paths]
        labels = [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names, strict=True)]
    elif len(labels) != len(paths):
        raise ValueError(f"{len(labels)} labels given for {len(paths)} runs")
    runs = [metric_series(read_metrics(p)) for p in paths]
    available = sorted(set().union(*runs))
    if keys is None:
        keys = [key for key in DEFAULT_COMPARE_KEYS if key in available]
        if not keys:
            raise ValueError(f"none of the default keys was logged; pass keys from: {', '.join(available)}")
    else:
        unknown = [key for key in keys if key not in available]
        if unknown:
            raise ValueError(f"key(s) {unknown} not logged by any run; available: {', '.join(available)}")
    fig, axes = _new_figure(len(keys), ncols=min(3, len(keys)))
    colors = [f"C{i % 10}" for i in range(len(paths))]
    for ax, key in zip(axes, keys, strict=True):
        weight = 0.0 if key.startswith("eval/") else smooth
        for series, label, color in zip(runs, labels, colors, strict=True):
            if key in series:
                _line(ax, *series[key], label=label, smooth=weight, color=color)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles, legend_labels = [], []
    for ax in axes:  # one shared legend, every run once, even if the first panel misses a run
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in legend_labels:
                handles.append(handle)
                legend_labels.append(label)
    fig.legend(handles, legend_labels, loc="outside lower center", ncols=min(len(legend_labels), 4))
    return save_png(fig, Path(out_path))
