"""The run's report, under `workdir/results/`: summary.json, report.md and the plots.

- `write_report` writes `summary.json`, `report.md` and the figures of `plots`
  (`pareto.png`, `group_accuracy.png`, `search_progress.png`), each atomically
  (`checkpoint.write_atomic`).
- `results_table`: the compact text table the launcher prints at the end.

The candidates come from the candidate log (`candidate_log`). Metrics are fractions in the
files (accuracy 0.873); the tables and plots show percentages (accuracy, robustness) and
percentage points (disparity, gap). Missing values (None; NaN is stored as None) print as "–".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from moenas_jax import metrics as metrics_lib
from moenas_jax import plots
from moenas_jax.checkpoint import write_atomic, write_json_atomic

# summary["final"] keys, in table order, with their row names.
FINAL_MODELS = (("trained", "found (pruned, trained)"),
                ("before_pruning", "found, supernet weights"),
                ("after_pruning", "found, pruned, supernet weights"))
MISSING = "–"
# The paired comparisons' metrics (`metrics.PAIRED`), in table order.
PAIRED_METRICS = metrics_lib.PAIRED


def write_report(results_dir: str | os.PathLike, summary: Mapping[str, Any],
                 candidates: Sequence[Mapping[str, Any]],
                 group_names: Sequence[str] | None = None) -> dict[str, Path]:
  """Writes summary.json, report.md and the plots that have data; returns {name: path}.

  `summary` holds `best` (a candidate record), `pareto` (candidate records), `final` ({trained,
  before_pruning, after_pruning}: test metrics of the found model trained stand-alone, and on the
  supernet's weights before and after expert pruning), `baselines` (a list of {name, metrics}),
  optionally `comparison` (a list of {baseline, found_minus_baseline}: paired intervals),
  `group_counts` ({split: examples per group}, shown next to the per-group accuracy),
  `timing` ({stage: seconds}) and `compilations` ({function: count}); test metrics may hold
  `bootstrap` (`metrics.bootstrap_intervals` output) for the disparity interval. `candidates` are
  the records of candidates.jsonl; `group_names` label the groups (default "group 0", ...). Arrays
  become lists and NaN None (`metrics.to_python`); every file is replaced atomically.
  """
  results_dir = Path(results_dir)
  summary = metrics_lib.to_python(summary)
  candidates = [metrics_lib.to_python(record) for record in candidates]
  names = _group_names(summary, group_names)
  paths = {"summary.json": results_dir / "summary.json"}
  write_json_atomic(paths["summary.json"], summary)
  models = _models(summary)
  figures = {"pareto.png": plots.pareto(candidates, summary.get("pareto") or [], models),
             "group_accuracy.png": plots.group_accuracy(models, names),
             "search_progress.png": plots.search_progress(candidates)}
  for name, figure in figures.items():
    if figure is not None:
      paths[name] = results_dir / name
      write_atomic(paths[name], plots.png(figure))
  paths["report.md"] = results_dir / "report.md"
  write_atomic(paths["report.md"], _markdown(summary, candidates, names, paths))
  return paths


def results_table(summary: Mapping[str, Any]) -> str:
  """Found model vs baselines as fixed-width text, plus the stage times, for the terminal."""
  summary = metrics_lib.to_python(summary)
  header = ["model", "accuracy %", "disparity pts", "worst group %", "robustness %", "params",
            "MACs"]
  rows = [[name, _pct(m.get("accuracy")), _disparity(m), _pct(m.get("worst_group_accuracy")),
           _pct(m.get("robustness")), _count(m.get("params")), _count(m.get("macs"))]
          for name, m in _models(summary)]
  if not rows:
    return "no final or baseline metrics in the summary"
  widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                     for i, (cell, w) in enumerate(zip(row, widths))) for row in [header, *rows]]
  for comparison in summary.get("comparison") or []:
    differences = comparison.get("found_minus_baseline") or {}
    lines.append(f"found − {comparison['baseline']} (paired 95%): " + ", ".join(
        f"{name.replace('_', ' ')} {_difference(differences.get(name))}"
        for name in PAIRED_METRICS))
  timing = summary.get("timing") or {}
  if timing:
    lines.append("time: " + ", ".join(f"{stage} {_duration(seconds)}"
                                      for stage, seconds in timing.items()))
  return "\n".join(lines)


def _models(summary: Mapping[str, Any]) -> list[tuple[str, dict]]:
  """(row name, test metrics) of the found model (before/after pruning) and the baselines."""
  final = summary.get("final") or {}
  models = [(name, final[key]) for key, name in FINAL_MODELS if final.get(key)]
  return models + [(b["name"], b.get("metrics") or {}) for b in summary.get("baselines") or []]


def _group_names(summary: Mapping[str, Any], group_names: Sequence[str] | None) -> list[str]:
  sizes = {len(m["group_accuracy"]) for _, m in _models(summary) if m.get("group_accuracy")}
  if len(sizes) > 1:
    raise ValueError(f"the models in the summary report different numbers of groups {sizes}")
  size = sizes.pop() if sizes else len(group_names or ())
  if group_names is None:
    return [f"group {g}" for g in range(size)]
  if len(group_names) != size:
    raise ValueError(f"{len(group_names)} group names {list(group_names)} for metrics of "
                     f"{size} groups; pass one name per group")
  return list(group_names)


# Cell formatting: every function takes a value that may be None and returns text.

def _pct(value: float | None) -> str:
  return MISSING if value is None else f"{100 * value:.1f}"


def _disparity(metrics: Mapping[str, Any]) -> str:
  """Disparity in points, with its interval from `metrics["bootstrap"]` if present.

  `bootstrap` is `metrics.bootstrap_intervals(...)` as Python values:
  {name: {"estimate", "low", "high"}}.
  """
  value = metrics.get("disparity")
  interval = ((metrics.get("bootstrap") or {}).get("disparity") or {})
  low, high = interval.get("low"), interval.get("high")
  if value is None:
    return MISSING
  if low is None or high is None:
    return _pct(value)
  return f"{_pct(value)} [{_pct(low)}, {_pct(high)}]"


def _difference(interval: Mapping[str, Any] | None) -> str:
  """A paired difference in points with its interval: "-8.1 [-11.9, -4.2]"."""
  if not interval or interval.get("estimate") is None:
    return MISSING
  text = f"{100 * interval['estimate']:+.1f}"
  if interval.get("low") is None or interval.get("high") is None:
    return text
  return f"{text} [{100 * interval['low']:+.1f}, {100 * interval['high']:+.1f}]"


def _count(value: float | None) -> str:
  if value is None:
    return MISSING
  for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
    if abs(value) >= scale:
      return f"{value / scale:.3g}{suffix}"  # 3 significant digits: 1.23M, 12.3M, 120k
  return f"{value:.0f}"


def _number(value: float | None, digits: int = 3) -> str:
  return MISSING if value is None else f"{value:.{digits}f}"


def _duration(seconds: float | None) -> str:
  if seconds is None:
    return MISSING
  if seconds < 60:
    return f"{seconds:.1f} s"
  minutes, seconds = divmod(round(seconds), 60)
  if minutes < 60:
    return f"{minutes} min {seconds:02d} s"
  return f"{minutes // 60} h {minutes % 60:02d} min"


def _arch(arch: Mapping[str, Sequence[int]] | None) -> list[str]:
  """One compact cell per arch field: experts [8, 4, 1] -> "8-4-1"."""
  return [MISSING if values is None else "-".join(str(v) for v in values)
          for values in (arch or {}).values()]


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric_from: int = 1) -> str:
  align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
  return "\n".join("| " + " | ".join(row) + " |" for row in [header, align, *rows]) + "\n"


def _candidate_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[str]]]:
  arch_names = list((records[0].get("arch") or {}) if records else ())
  labels = {"num_experts": "experts", "top_k": "top-k"}
  header = ["reward", "accuracy %", "disparity pts", "worst group %", "params", "MACs",
            *(labels.get(name, name) for name in arch_names), "cycle"]
  rows = []
  for record in records:
    m = record.get("metrics") or {}
    rows.append([_number(record.get("reward")), _pct(m.get("accuracy")), _disparity(m),
                 _pct(m.get("worst_group_accuracy")), _count(m.get("params")),
                 _count(m.get("macs")), *_arch(record.get("arch")),
                 MISSING if record.get("cycle") is None else str(record["cycle"])])
  return header, rows


def _markdown(summary: Mapping[str, Any], candidates: Sequence[Mapping[str, Any]],
              group_names: Sequence[str], paths: Mapping[str, Path]) -> str:
  out = ["# Search report\n",
         ("Accuracy, robustness: % on the test split; disparity (max − min group accuracy, "
          "with its bootstrap interval where computed) and generalization gap (group by group, "
          "train − test accuracy, averaged over the groups): percentage points. "
          f"{MISSING}: not measured.\n")]
  models = _models(summary)
  out.append("## Found model vs baselines\n")
  if models:
    out.append(_table(
        ["model", "accuracy", "disparity", "worst group", "worst cell", "robustness", "gap",
         "params", "MACs"],
        ([name, _pct(m.get("accuracy")), _disparity(m), _pct(m.get("worst_group_accuracy")),
          _pct(m.get("worst_cell_accuracy")), _pct(m.get("robustness")),
          _pct(m.get("generalization_gap")), _count(m.get("params")), _count(m.get("macs"))]
         for name, m in models)))
  else:
    out.append("No final or baseline metrics in the summary.\n")

  comparisons = summary.get("comparison") or []
  if comparisons:
    out.append("## Found model minus each baseline (paired)\n")
    out.append("Differences on the same test images, with 95% paired bootstrap intervals (both "
               "models scored on each of the same resamples); an interval that excludes 0 is a "
               "difference beyond resampling noise of the test split. It does not cover the "
               "spread between training seeds (`benchmarks/seeds.py`), and the found model was "
               "picked as the best of many on validation (winner's curse): its search score "
               "is optimistic, its test score is not.\n")
    out.append(_table(["baseline", "accuracy", "disparity", "worst group"],
                      ([c["baseline"], *(_difference((c.get("found_minus_baseline") or {})
                                                     .get(name)) for name in PAIRED_METRICS)]
                       for c in comparisons)))

  grouped = [(name, m["group_accuracy"]) for name, m in models if m.get("group_accuracy")]
  if grouped:
    out.append("## Accuracy per group (%)\n")
    counts = summary.get("group_counts") or {}
    splits = [split for split in ("train", "test") if counts.get(split)]
    out.append(_table(["group", *(f"{split} n" for split in splits),
                       *(name for name, _ in grouped)],
                      ([group, *(str(counts[split][g]) for split in splits),
                        *(_pct(values[g]) for _, values in grouped)]
                       for g, group in enumerate(group_names))))

  best = summary.get("best")
  out.append("## Search\n")
  if best:
    arch = " · ".join(f"{name} {cell}" for name, cell in zip(best.get("arch") or {},
                                                              _arch(best.get("arch"))))
    cycle = MISSING if best.get("cycle") is None else best["cycle"]
    out.append(f"{len(candidates)} candidates scored; best reward {_number(best.get('reward'))}"
               f" (cycle {cycle}): {arch}.\n")
  else:
    out.append(f"{len(candidates)} candidates scored.\n")
  ranked = sorted((r for r in candidates if r.get("reward") is not None),
                  key=lambda r: -r["reward"])[:10]
  if ranked:
    header, rows = _candidate_rows(ranked)
    out.append("### Top 10 candidates by reward (search metrics, validation split)\n")
    out.append(_table(["rank", *header], ([str(i + 1), *row] for i, row in enumerate(rows))))
  pareto = sorted(summary.get("pareto") or [],
                  key=lambda r: -((r.get("metrics") or {}).get("accuracy") or 0.0))
  if pareto:
    header, rows = _candidate_rows(pareto)
    out.append(f"### Pareto set ({len(pareto)} candidates)\n")
    out.append(_table(header, rows, numeric_from=0))

  timing, compilations = summary.get("timing") or {}, summary.get("compilations") or {}
  if timing:
    out.append("## Timing\n")
    out.append(_table(["stage", "time"], ([stage, _duration(s)] for stage, s in timing.items())))
  if compilations:
    out.append("## XLA compilations\n")
    out.append(_table(["stage", "function", "compilations"],
                      ([stage, name, str(count)] for stage, counts in compilations.items()
                       for name, count in counts.items())))
  titles = {"pareto.png": "Accuracy vs disparity", "group_accuracy.png": "Accuracy per group",
            "search_progress.png": "Search progress"}
  figures = [f"![{title}]({name})\n" for name, title in titles.items() if name in paths]
  if figures:
    out.append("## Plots\n")
    out.extend(figures)
  return "\n".join(out)
