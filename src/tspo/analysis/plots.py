"""PNG figures, the one plotting module: a run's curves (``plots/`` after training, ``tspo plot``),
overlays of several runs, and ``tspo analyze``'s categories, group homogeneity, reward / EM curves and
per-dataset bars of an evaluation.

matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so it is safe to call
from a training process, a notebook or a headless server. Key names are those of docs/metrics.md;
missing keys are skipped, and a figure whose keys were never logged is not written.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from tspo.analysis.categories import CATEGORY_ORDER
from tspo.analysis.curves import (
    CATEGORY_KEYS,
    HOMOGENEITY_KEYS,
    Series,
    ema,
    matching_keys,
    metric_series,
)
from tspo.evaluation.summary import ALL, MACRO_AVERAGE, dataset_title
from tspo.files import atomic_path
from tspo.runs import RunDir, read_metrics

_CATEGORY_COLORS = {
    "near_miss": "#f28e2b",
    "complete_failure": "#e15759",
    "success_without_retrieval": "#76b7b2",
    "complete_success": "#59a14f",
}


@dataclass(frozen=True)
class Panel:
    """One subplot: the keys it draws (``fnmatch`` patterns allowed) and how."""

    title: str
    keys: tuple[str, ...]
    ylabel: str
    stacked: bool = False  # stacked areas (parts of a whole: categories, time split)
    smooth: bool = True  # False for sparse series such as evaluations


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


def _panel_keys(panel: Panel, available: Mapping[str, Series]) -> list[str]:
    keys: list[str] = []
    for pattern in panel.keys:
        keys.extend(k for k in sorted(available) if fnmatch.fnmatchcase(k, pattern) and k not in keys)
    return keys


# --------------------------------------------------------------------------------------------- drawing
def _axes(
    n: int, ncols: int = 3, width: float = 4.6, height: float = 3.4, extra_width: float = 0.0
) -> tuple[Figure, list[Any]]:
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(width * ncols + extra_width, height * nrows), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for extra in axes[n:]:
        extra.set_visible(False)
    return fig, axes[:n]


def save_png(fig: Figure, path: Path) -> Path:
    """Write the PNG atomically (a reader never sees half an image)."""
    with atomic_path(path) as temporary:
        fig.savefig(temporary, format="png", dpi=100)
    return path


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


def _stacked(ax: Any, keys: Sequence[str], series: Mapping[str, Series], smooth: float) -> None:
    steps = np.array(sorted({float(s) for key in keys for s in series[key][0]}))
    layers = []
    for key in keys:
        lookup = dict(zip(series[key][0].tolist(), series[key][1].tolist(), strict=True))
        layer = np.array([lookup.get(s, 0.0) for s in steps.tolist()])
        layers.append(ema(layer, smooth) if smooth > 0 else layer)
    names = [key.split("/", 1)[-1] for key in keys]
    colors = [_CATEGORY_COLORS[n] for n in names] if all(n in _CATEGORY_COLORS for n in names) else None
    ax.stackplot(steps, *layers, labels=names, colors=colors, alpha=0.85)


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


def _lines(ax: Any, series: Mapping[str, Series], keys: Sequence[str], smooth: float) -> None:
    for key in keys:
        _line(ax, *series[key], label=key, smooth=smooth)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if keys:
        ax.legend(fontsize="small", loc="best")


# --------------------------------------------------------------------------------------------- one run, several runs
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
    out = Path(out_dir) if out_dir is not None else RunDir(run_dir).plots
    written: list[Path] = []
    warm = [(r["warmstart/step"], r["warmstart/loss"]) for r in records if "warmstart/loss" in r]
    if warm:
        # The warm start is logged at RL step 0, one line per SFT step: its own x axis.
        fig, (ax,) = _axes(1)
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
        fig, axes = _axes(len(drawable), extra_width=2.2 * any(panel.stacked for panel, _ in drawable))
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
    fig, axes = _axes(len(keys), ncols=min(3, len(keys)))
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


# --------------------------------------------------------------------------------------------- tspo analyze
def plot_categories(series: Mapping[str, Series], path: Path, smooth: float = 0.6) -> Path | None:
    """Stacked training category fractions, plus held-out category curves when logged."""
    train_keys = [k for k in CATEGORY_KEYS if k in series]
    heldout_keys = matching_keys(series, [f"{p}/{c}" for p in ("eval", "val/all") for c in CATEGORY_ORDER])
    panels = [bool(train_keys), bool(heldout_keys)]
    if not any(panels):
        return None
    fig, axes = _axes(sum(panels), ncols=2, width=6.0, height=3.6)
    position = 0
    if train_keys:
        ax = axes[position]
        _stacked(ax, train_keys, series, smooth)
        ax.set(title="Rollout categories during training", xlabel="step", ylabel="fraction of trajectories")
        ax.set_ylim(0, 1)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), reverse=True)
        position += 1
    if heldout_keys:
        _lines(axes[position], series, heldout_keys, 0.0)
        axes[position].set_title("Held-out categories (greedy)")
        axes[position].set_ylabel("fraction of questions")
    return save_png(fig, path)


def plot_homogeneity(series: Mapping[str, Series], path: Path, smooth: float = 0.6) -> Path | None:
    """Fractions of outcome-homogeneous and zero-advantage groups, and the reward spread within groups."""
    panels = [
        ("Group homogeneity", [k for k in HOMOGENEITY_KEYS if k in series], "fraction of groups"),
        ("Reward spread in groups", [k for k in ("reward/std_in_group",) if k in series], "std"),
    ]
    panels = [panel for panel in panels if panel[1]]
    if not panels:
        return None
    fig, axes = _axes(len(panels), ncols=2, width=6.0, height=3.6)
    for ax, (title, keys, ylabel) in zip(axes, panels, strict=True):
        _lines(ax, series, keys, smooth)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    return save_png(fig, path)


def plot_rewards(series: Mapping[str, Series], path: Path, smooth: float = 0.6) -> Path | None:
    """Reward and train EM (outcome), held-out / validation EM per dataset, first-hit rate."""
    groups = [
        ("Reward and train EM", ["reward/mean", "outcome/mean"], "mean per trajectory", smooth),
        (
            "Held-out EM (greedy)",
            matching_keys(series, ["eval/em", "eval/*/em", "val/*/em"]),
            "exact match",
            0.0,
        ),
        ("Answer retrieved (FOLR hit)", ["rollout/first_hit_rate"], "fraction of trajectories", smooth),
    ]
    drawable = [(t, [k for k in keys if k in series], y, s) for t, keys, y, s in groups]
    drawable = [item for item in drawable if item[1]]
    if not drawable:
        return None
    fig, axes = _axes(len(drawable), width=5.0, height=3.6)
    for ax, (title, keys, ylabel, weight) in zip(axes, drawable, strict=True):
        _lines(ax, series, keys, weight)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
    return save_png(fig, path)


def plot_eval_datasets(table: Mapping[str, Mapping[str, float]], path: Path) -> Path | None:
    """Per-dataset EM / sub-EM / F1 bars and stacked category bars of one evaluation."""
    names = [name for name in table if name not in (ALL, MACRO_AVERAGE)]
    if not names or not table[names[0]].get("n"):
        return None
    if len(names) > 1:
        names.append(ALL)
    labels = [dataset_title(name) for name in names]
    fig, axes = _axes(2, ncols=2, width=max(6.0, 1.1 * len(names) + 2), height=3.6)
    x = np.arange(len(names))
    width = 0.27
    for offset, (key, label) in enumerate((("em", "EM"), ("sub_em", "sub-EM"), ("f1", "F1"))):
        axes[0].bar(x + (offset - 1) * width, [table[n].get(key, 0.0) for n in names], width, label=label)
    axes[0].set_title("Answer scores by dataset")
    axes[1].set_title("Trajectory categories by dataset")
    bottom = np.zeros(len(names))
    for category in CATEGORY_ORDER:
        values = np.array([table[n].get(category, 0.0) for n in names])
        axes[1].bar(x, values, 0.6, bottom=bottom, label=category, color=_CATEGORY_COLORS[category])
        bottom += values
    for ax in axes:
        ax.set_xticks(x, labels, rotation=30, ha="right")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize="small")
    axes[1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), reverse=True)
    return save_png(fig, path)
