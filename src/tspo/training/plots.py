"""Moved to :mod:`tspo.analysis.plots` (one plotting module); kept so old imports keep working."""

from tspo.analysis.curves import ema, metric_series
from tspo.analysis.plots import plot_run, plot_runs, save_png

__all__ = ["ema", "metric_series", "plot_run", "plot_runs", "save_png"]
