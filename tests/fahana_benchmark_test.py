"""Tests of benchmarks/fahana.py: its configs, and the figures of hand-made summaries."""

import numpy as np
import pytest

from benchmarks import fahana


def _summary(found_accuracy, base_accuracy, disparity_low, found_params=100):
  metrics = {"disparity": 0.1, "worst_group_accuracy": 0.4, "group_count": [60, 40]}
  interval = {"estimate": -0.01, "low": disparity_low, "high": disparity_low + 0.05}
  return {
      "final": {"arch": {"num_experts": [1]},
                "trained": {**metrics, "accuracy": found_accuracy, "params": found_params,
                            "macs": 1000}},
      "baselines": [{"name": "mobilenet_v2_dense_erm", "metrics": {}},
                    {"name": "mobilenet_v2", "metrics": {**metrics, "accuracy": base_accuracy,
                                                          "params": 400, "macs": 5000}}],
      "comparison": [{"baseline": "other", "found_minus_baseline": {}},
                     {"baseline": "mobilenet_v2", "found_minus_baseline": {
                         "accuracy": {"estimate": found_accuracy - base_accuracy},
                         "disparity": interval}}]}


def test_compare_takes_ratios_against_mobilenet_and_checks_the_targets():
  row = fahana.compare(_summary(0.72, 0.70, -0.03), np.array([2.0, 5.0]))
  assert row["size_ratio"] == 4.0 and row["mac_ratio"] == 5.0
  assert row["latency_ratio"] == 2.5
  assert row["accuracy_delta"] == pytest.approx(0.02)
  assert row["disparity_delta_interval"]["low"] == -0.03
  assert row["group_counts"] == [60, 40]
  assert row["target"] == {"size": True, "latency": True, "accuracy": True, "disparity": True}
  # 400 / 200 = 2x smaller, 1.5x faster, 1 point less accurate, disparity interval above 0.
  row = fahana.compare(_summary(0.69, 0.70, 0.01, found_params=200), np.array([2.0, 3.0]))
  assert row["target"] == {"size": False, "latency": False, "accuracy": False,
                           "disparity": False}


def _scratch(accuracy, disparity_estimate):
  return {"epochs": 3, "metrics": {"accuracy": accuracy, "disparity": 0.2},
          "baseline_metrics": {"accuracy": 0.70, "disparity": 0.1},
          "found_minus_baseline": {"accuracy": {"estimate": accuracy - 0.70},
                                   "disparity": {"estimate": disparity_estimate, "low": -0.1,
                                                 "high": 0.1}}}


def test_the_scratch_control_is_compared_with_the_same_mobilenet():
  row = fahana.compare(_summary(0.72, 0.70, -0.03), np.array([2.0, 5.0]), _scratch(0.66, 0.04))
  assert row["from_scratch"]["accuracy_delta"] == pytest.approx(-0.04)
  assert row["from_scratch"]["disparity_delta_interval"]["estimate"] == 0.04
  assert row["accuracy_delta"] == pytest.approx(0.02)  # the found model's own, unchanged
  rows = [row, fahana.compare(_summary(0.72, 0.70, -0.03), np.array([2.0, 5.0]),
                              _scratch(0.70, 0.00))]
  result = fahana.over_seeds(rows)
  assert result["from_scratch"]["accuracy_delta"]["mean"] == pytest.approx(-0.02)
  assert result["from_scratch"]["disparity_delta"]["per_seed"] == [0.04, 0.0]
  assert "from_scratch" not in fahana.over_seeds([fahana.compare(
      _summary(0.72, 0.70, -0.03), np.array([2.0, 5.0]))])


def test_over_seeds_needs_the_means_and_every_seed_disparity():
  rows = [fahana.compare(_summary(0.72, 0.70, -0.03), np.array([2.0, 5.0])),
          fahana.compare(_summary(0.70, 0.70, -0.01), np.array([2.0, 7.0]))]
  result = fahana.over_seeds(rows)
  assert result["latency_ratio"]["mean"] == pytest.approx(3.0)
  # accuracy deltas 0.02 and 0.00: mean 0.01, sd 0.01414, t(0.975, 1) = 12.706.
  assert result["accuracy_delta"]["low"] == pytest.approx(0.01 - 12.706 * 0.01, abs=1e-4)
  assert result["disparity_delta"]["per_seed"] == [-0.01, -0.01]
  assert result["target_met"]
  rows.append(fahana.compare(_summary(0.72, 0.70, 0.02), np.array([2.0, 5.0])))
  assert not fahana.over_seeds(rows)["target_met"]


def test_configs_search_under_a_third_of_mobilenet_at_the_closest_published_width(tmp_path):
  config = fahana.config_for("fashion_tones", 2, "", ["train.epochs=1"])
  assert config.seed == 2 and config.train.epochs == 1
  assert config.model.width_choices == (0.5, 0.75, 1.0) and config.model.search_depth
  assert config.baselines == ("mobilenet_v2",)
  # Supernet width 0.25: MobileNetV2 0.35, 408,938 parameters for 10 classes at 28 px.
  assert dict(config.baseline_options["mobilenet_v2"]) == {"width_multiplier": 0.35}
  assert config.reward.param_budget == 408_938 // 3
  config = fahana.config_for("fashion_tones", 0, "", ["reward.param_budget=None"])
  assert config.reward.param_budget is None
  (tmp_path / "UTKFace.tar.gz").touch()  # described, not read
  config = fahana.config_for("utkface", 0, str(tmp_path), [])
  assert config.data.manual_dir == str(tmp_path) and config.model.width_multiplier == 0.25
  # 2 classes at 32 px: 1280 · 8 fewer head weights and biases.
  assert config.reward.param_budget == (408_938 - 8 * 1281) // 3
  with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
    fahana.config_for("cifar", 0, "", [])
