"""Tests of benchmarks/advmoe.py: the summary by hand, and a smoke run once resnet_moe exists."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import advmoe
from moenas_jax import models


def _row(model, training, seed, robust, seconds):
  return {"dataset": "fashion_tones", "model": model, "training": training, "seed": seed,
          "clean_accuracy": 0.5, "robust_accuracy": robust, "disparity": 0.1,
          "robust_disparity": None if model == "dense" and training == "standard" else 0.2,
          "robust_worst_group_accuracy": 0.0, "macs": 100 if model == "dense" else 40,
          "seconds_per_epoch": seconds}


def test_summary_pairs_the_seeds_with_t_intervals():
  rows = [_row("dense", "standard", s, 0.0, 1.0) for s in (0, 1)]
  rows += [_row("dense", "trades", 0, 0.30, 5.0), _row("dense", "trades", 1, 0.20, 5.0),
           _row("moe", "trades", 0, 0.35, 3.0), _row("moe", "trades", 1, 0.25, 3.0),
           _row("moe", "advmoe", 0, 0.40, 6.0), _row("moe", "advmoe", 1, 0.50, 6.0)]
  summary = advmoe.summarize(rows)["fashion_tones"]
  assert summary["means"]["moe/advmoe"]["robust_accuracy"] == pytest.approx(0.45)
  assert summary["means"]["dense/standard"]["robust_disparity"] is None
  # advmoe − dense per seed: 0.10, 0.30: mean 0.2, sd 0.1414; t(0.975, 1) = 12.706, so the
  # half width is 12.706 · 0.1414 / √2 = 1.2706.
  difference = summary["paired"]["advmoe_minus_dense"]["robust_accuracy"]
  assert difference["per_seed"] == pytest.approx([0.1, 0.3])
  np.testing.assert_allclose([difference["low"], difference["high"]], [-1.0706, 1.4706],
                             atol=1e-4)
  # advmoe − trades MoE: 0.05 and 0.25.
  assert summary["paired"]["advmoe_minus_trades_moe"]["robust_accuracy"]["mean"] == \
      pytest.approx(0.15)
  assert summary["seconds_per_epoch"]["dense"]["trades"]["vs_standard"] == pytest.approx(5.0)
  assert "moe" not in summary["seconds_per_epoch"]  # no standard MoE run to compare with


def test_expert_share_per_group_by_hand():
  chosen, groups = np.array([0, 1, 1, 1, 0, 2]), np.array([0, 0, 0, 0, 1, 1])
  assert advmoe.expert_share(chosen, groups, 3, 3) == [
      [0.25, 0.75, 0.0], [0.5, 0.0, 0.5], [None, None, None]]


@pytest.mark.skipif("resnet_moe" not in models.MODELS,
                    reason="the resnet_moe model is not in this checkout")
def test_smoke_run_prints_every_row_and_the_summary(tmp_path):
  root = Path(__file__).parents[1]
  out = subprocess.run([sys.executable, "-m", "benchmarks.advmoe", "--smoke", "--seeds", "0",
                        "--workdir", str(tmp_path)], cwd=root, check=True,
                       capture_output=True, text=True).stdout
  result = json.loads(out)
  assert [(r["model"], r["training"]) for r in result["results"]] == list(advmoe.RUNS)
  for row in result["results"]:
    assert 0 <= row["robust_accuracy"] <= 1 and len(row["robust_group_accuracy"]) == 2
    if row["model"] == "moe":  # each group's images over the 2 experts
      assert all(sum(shares) == pytest.approx(1) for shares in row["expert_share"])
    else:
      assert row["expert_share"] is None
  assert result["objective"] == "erm"
  dense, moe = result["results"][0]["macs"], result["results"][1]["macs"]
  assert moe <= dense / 2
  summary = result["summary"]["fashion_tones"]
  assert set(summary["paired"]) == {"advmoe_minus_dense", "advmoe_minus_trades_moe"}
  assert summary["seconds_per_epoch"]["moe"]["advmoe"]["vs_standard"] > 1
