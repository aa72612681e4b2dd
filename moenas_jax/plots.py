"""The report's figures: accuracy vs disparity, accuracy per group, search progress.

Each function returns a matplotlib `Figure`, or None when there is nothing to plot; `png`
renders one. `models` are (name, test metrics) pairs, in legend order; candidates are records
of the candidate log. Metrics are fractions; the axes show percentages and points.

The object-oriented API (`Figure`, no pyplot) touches no global backend or figure registry,
so nothing leaks into a notebook or into other threads.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

Models = Sequence[tuple[str, Mapping[str, Any]]]


def png(figure: Figure) -> bytes:
  """The figure as PNG bytes (120 dpi)."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  return buffer.getvalue()


def _metric(records: Iterable[Mapping[str, Any]], key: str) -> np.ndarray:
  """One metric of each record as floats, NaN where missing."""
  values = [(r.get("metrics") or {}).get(key) for r in records]
  return np.array([np.nan if v is None else v for v in values], dtype=float)


def pareto(candidates: Sequence[Mapping[str, Any]], pareto_set: Sequence[Mapping[str, Any]],
           models: Models) -> Figure | None:
  """Accuracy vs disparity of every candidate (colour: params), the Pareto set, the models."""
  accuracy, disparity = _metric(candidates, "accuracy"), _metric(candidates, "disparity")
  if not np.isfinite(accuracy + disparity).any():
    return None
  figure = Figure(figsize=(7, 5))
  axes = figure.add_subplot()
  points = axes.scatter(100 * disparity, 100 * accuracy, c=_metric(candidates, "params"), s=18,
                        cmap="viridis", plotnonfinite=True, label="candidates (search)")
  figure.colorbar(points, ax=axes, label="params")
  if pareto_set:
    axes.scatter(100 * _metric(pareto_set, "disparity"), 100 * _metric(pareto_set, "accuracy"),
                 s=90, facecolors="none", edgecolors="crimson", linewidths=1.5,
                 label="Pareto set")
  for (name, metrics), marker in zip(models, "*sDv^<>ph"):
    if metrics.get("accuracy") is not None and metrics.get("disparity") is not None:
      axes.scatter(100 * metrics["disparity"], 100 * metrics["accuracy"], marker=marker, s=140,
                   edgecolors="black", label=f"{name} (test)")
  axes.set_xlabel("disparity: max − min group accuracy (points)")
  axes.set_ylabel("accuracy (%)")
  axes.set_title("Accuracy vs disparity")
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")
  return figure


def group_accuracy(models: Models, group_names: Sequence[str]) -> Figure | None:
  """Grouped bars: one group of bars per demographic group, one bar per model that has them."""
  models = [(name, m["group_accuracy"]) for name, m in models if m.get("group_accuracy")]
  if not models:
    return None
  figure = Figure(figsize=(min(14.0, max(6.0, 0.35 * len(group_names) * len(models) + 2)), 4.5))
  axes = figure.add_subplot()
  positions, width = np.arange(len(group_names)), 0.8 / len(models)
  for i, (name, values) in enumerate(models):
    heights = [np.nan if v is None else 100 * v for v in values]
    axes.bar(positions + (i - (len(models) - 1) / 2) * width, heights, width, label=name)
  axes.set_xticks(positions, group_names, rotation=30 if len(group_names) > 6 else 0,
                  ha="right" if len(group_names) > 6 else "center")
  axes.set_ylabel("accuracy (%)")
  axes.set_title("Test accuracy per group")
  axes.grid(axis="y", alpha=0.3)
  axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
  return figure


def search_progress(candidates: Sequence[Mapping[str, Any]]) -> Figure | None:
  """Reward of each scored candidate (dots) and the best reward so far (line)."""
  rewards = np.array([np.nan if r.get("reward") is None else r["reward"] for r in candidates],
                     dtype=float)
  if not np.isfinite(rewards).any():
    return None
  scored = np.arange(1, len(rewards) + 1)
  figure = Figure(figsize=(7, 4))
  axes = figure.add_subplot()
  axes.scatter(scored, rewards, s=8, alpha=0.5, label="candidate reward")
  axes.plot(scored, np.fmax.accumulate(rewards), color="crimson", label="best so far")
  axes.set_xlabel("candidates scored")
  axes.set_ylabel("reward")
  axes.set_title("Search progress")
  axes.grid(alpha=0.3)
  axes.legend(fontsize="small")
  return figure
