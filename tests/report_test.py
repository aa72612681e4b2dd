"""Tests of the report: summary.json, report.md, the plots and the terminal table."""

import json
import struct

import pytest

from moenas_jax import report
from moenas_jax.candidate_log import METRIC_KEYS

GROUPS = ["light", "medium", "dark"]


def _metrics(accuracy, disparity, params, **extra):
  return {"accuracy": accuracy, "group_accuracy": [accuracy, accuracy - disparity / 2,
                                                   accuracy - disparity],
          "disparity": disparity, "worst_group_accuracy": accuracy - disparity,
          "worst_cell_accuracy": accuracy - 2 * disparity, "robustness": accuracy - 0.1,
          "generalization_gap": 0.02, "params": params, "macs": 10 * params, **extra}


def _record(i):
  """Candidate i: reward i / 100, accuracy 0.5 + i / 100, disparity 0.2 - i / 100."""
  return {"arch": {"num_experts": [8, 4, 1 + i % 2], "top_k": [1, 2, 1]},
          "metrics": _metrics(0.5 + i / 100, 0.2 - i / 100, 1000 * (i + 1)),
          "reward": i / 100, "cycle": i // 4}


def _summary(candidates):
  return {
      "best": candidates[11], "pareto": candidates[9:],
      "final": {"before_pruning": _metrics(0.88, 0.05, 1_500_000),
                "after_pruning": _metrics(0.873, 0.041, 1_230_000, bootstrap={
                    "disparity": {"estimate": 0.041, "low": 0.020, "high": 0.063}})},
      "baselines": [{"name": "mobilenet_v2",
                     "metrics": {**_metrics(0.85, 0.098, 2_200_000), "robustness": None,
                                 "params": float("nan")}}],
      "comparison": [{"baseline": "mobilenet_v2", "found_minus_baseline": {
          "accuracy": {"estimate": 0.023, "low": -0.004, "high": 0.051},
          "disparity": {"estimate": -0.057, "low": -0.091, "high": -0.022},
          "worst_group_accuracy": {"estimate": 0.08, "low": None, "high": None}}}],
      "group_counts": {"train": [600, 300, 100], "test": [60, 30, 10]},
      "timing": {"supernet": 12.34, "search": 125.0, "final": 4000.0},
      "compilations": {"supernet": {"supernet_step": 1},
                       "search": {"bn_recalibrate": 1, "population_counts": 1}},
  }


def test_write_report(tmp_path):
  candidates = [_record(i) for i in range(12)]
  summary = _summary(candidates)
  paths = report.write_report(tmp_path / "results", summary, candidates, GROUPS)
  assert sorted(p.name for p in (tmp_path / "results").iterdir()) == sorted(paths) == [
      "group_accuracy.png", "pareto.png", "report.md", "search_progress.png", "summary.json"]

  written = json.loads(paths["summary.json"].read_text())
  assert written["final"]["after_pruning"]["bootstrap"]["disparity"]["high"] == 0.063
  assert written["baselines"][0]["metrics"]["params"] is None  # NaN stored as null
  assert written["pareto"] == candidates[9:]

  text = paths["report.md"].read_text()
  # accuracy 87.3, disparity 4.1 [2.0, 6.3], worst group 0.873 - 0.041, worst cell
  # 0.873 - 0.082, robustness 0.873 - 0.1, gap 2.0 points, 1.23M params, 12.3M MACs.
  assert ("| found, pruned, supernet weights | 87.3 | 4.1 [2.0, 6.3] | 83.2 | 79.1 | 77.3 | 2.0 "
          "| 1.23M | 12.3M |") in text
  assert "| found, supernet weights | 88.0 | 5.0 | 83.0 | 78.0 | 78.0 | 2.0 | 1.5M | 15M |" in text
  assert "| mobilenet_v2 | 85.0 | 9.8 | 75.2 | 65.4 | – | 2.0 | – | 22M |" in text
  assert ("| group | train n | test n | found, supernet weights | found, pruned, supernet "
          "weights | mobilenet_v2 |" in text)
  assert "| dark | 100 | 10 | 83.0 | 83.2 | 75.2 |" in text  # accuracy - disparity of each
  # Top 10 by reward: candidates 11 down to 2; candidate 11 has experts 8-4-2.
  assert "| 1 | 0.110 | 61.0 | 9.0 | 52.0 | 12k | 120k | 8-4-2 | 1-2-1 | 2 |" in text
  assert "| 10 | 0.020 |" in text and "| 11 |" not in text
  assert "### Pareto set (3 candidates)" in text
  assert "| supernet | 12.3 s |" in text and "| search | 2 min 05 s |" in text
  assert "| final | 1 h 06 min |" in text
  assert "| search | population_counts | 1 |" in text
  assert "12 candidates scored; best reward 0.110 (cycle 2): num_experts 8-4-2 · top_k 1-2-1" \
      in text
  assert "![Accuracy vs disparity](pareto.png)" in text
  assert "## Found model minus each baseline (paired)" in text
  assert "| mobilenet_v2 | +2.3 [-0.4, +5.1] | -5.7 [-9.1, -2.2] | +8.0 |" in text

  for name in ("pareto.png", "group_accuracy.png", "search_progress.png"):
    data = paths[name].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert width > 400 and height > 300 and len(data) > 10_000


def test_missing_values_and_absent_sections(tmp_path):
  candidates = [{**_record(0), "reward": None,
                 "metrics": {key: None for key in METRIC_KEYS}}]
  summary = {"best": None, "pareto": [], "final": {"after_pruning": {
      **{key: None for key in METRIC_KEYS}, "disparity": 0.05,
      "bootstrap": {"disparity": {"estimate": 0.05, "low": None, "high": None}}}},
      "baselines": [], "timing": {}, "compilations": {}}
  paths = report.write_report(tmp_path, summary, candidates)
  assert sorted(paths) == ["report.md", "summary.json"]  # no plottable values
  text = paths["report.md"].read_text()
  assert "| found, pruned, supernet weights | – | 5.0 | – | – | – | – | – | – |" in text
  assert "1 candidates scored." in text
  for absent in ("Top 10", "Pareto set", "Timing", "per group", "Plots"):
    assert absent not in text


def test_group_names_must_match_the_metrics(tmp_path):
  candidates = [_record(0)]
  with pytest.raises(ValueError, match=r"2 group names \['a', 'b'\] for metrics of 3 groups"):
    report.write_report(tmp_path, _summary(candidates * 12), candidates, ["a", "b"])


def test_results_table():
  candidates = [_record(i) for i in range(12)]
  lines = report.results_table(_summary(candidates)).splitlines()
  assert lines[0].split() == ["model", "accuracy", "%", "disparity", "pts", "worst", "group",
                              "%", "robustness", "%", "params", "MACs"]
  assert lines[2].split() == ["found,", "pruned,", "supernet", "weights", "87.3", "4.1", "[2.0,",
                              "6.3]", "83.2", "77.3", "1.23M", "12.3M"]
  assert lines[3].split() == ["mobilenet_v2", "85.0", "9.8", "75.2", "–", "–", "22M"]
  assert len({len(line) for line in lines[:4]}) == 1  # aligned columns
  assert lines[4] == ("found − mobilenet_v2 (paired 95%): accuracy +2.3 [-0.4, +5.1], "
                      "disparity -5.7 [-9.1, -2.2], worst group accuracy +8.0")
  assert lines[5] == "time: supernet 12.3 s, search 2 min 05 s, final 1 h 06 min"
