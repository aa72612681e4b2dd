"""End to end: the shared smoke search (tests/conftest.py) follows the documented schema, its
export predicts as evaluated, baselines join it later, and bad workdirs are refused.

Killed-and-resumed runs end to end: tests/multihost_test.py (a killed and resumed one-process
run equals an uninterrupted two-process one).
"""

import json
import shutil

import numpy as np
import pytest
from flax import nnx

from configs import smoke
from moenas_jax import candidate_log, costs, export, models, search, settings
from moenas_jax.stages import data as data_stage
from moenas_jax.data import fashion_tones


def test_results_follow_the_documented_schema(smoke_workdir):
  workdir = smoke_workdir
  config = smoke.get_config()
  candidates = candidate_log.read(workdir / "results" / "candidates.jsonl")
  assert len(candidates) <= config.search.candidates
  for record in candidates:
    assert set(record) >= set(candidate_log.RECORD_KEYS)
    assert set(record["metrics"]) >= set(candidate_log.METRIC_KEYS)
    assert len(record["metrics"]["group_accuracy"]) == 2
  summary = json.loads((workdir / "results" / "summary.json").read_text())
  assert set(summary) >= {"best", "pareto", "final", "baselines", "timing", "compilations"}
  assert summary["best"]["reward"] == max(r["reward"] for r in candidates)
  trained = summary["final"]["trained"]
  assert 0.2 < trained["accuracy"] <= 1  # above chance (10 classes) after a short training
  low, high = (trained["bootstrap"]["disparity"][k] for k in ("low", "high"))
  assert low <= high
  # One compile per stage; recalibration: one more, shared by the search and pruning's rows.
  compilations = summary["compilations"]
  assert compilations["supernet"] == {"supernet_step": 1}
  assert compilations["search"] == {"bn_recalibrate": 1, "population_counts": 1}
  assert "bn_recalibrate" not in compilations["prune"]
  # Trained group-balanced (the default); the dense model also with ERM, as the reference.
  assert summary["final"]["objective"] == "group_balanced"
  assert [(b["name"], b["objective"]) for b in summary["baselines"]] == [
      ("mobilevit_v2_dense", "group_balanced"), ("mobilevit_v2_dense_erm", "erm")]
  # Paired intervals of found − baseline, for every baseline, from the saved predictions.
  assert [c["baseline"] for c in summary["comparison"]] == [b["name"]
                                                            for b in summary["baselines"]]
  predictions = np.load(workdir / "results" / "test_predictions.npz")
  labels = data_stage.load_data(config, workdir).test["label"]
  for comparison in summary["comparison"]:
    difference = comparison["found_minus_baseline"]["accuracy"]
    baseline = predictions[comparison["baseline"]]
    np.testing.assert_allclose(difference["estimate"], (predictions["found"] == labels).mean()
                               - (baseline == labels).mean(), atol=1e-6)
    assert difference["low"] <= difference["estimate"] <= difference["high"]
  assert (predictions["found"] == labels).mean() == pytest.approx(trained["accuracy"], abs=1e-6)
  for name in ("report.md", "pareto.png", "group_accuracy.png", "search_progress.png"):
    assert (workdir / "results" / name).stat().st_size > 100


def test_the_exported_model_loads_and_predicts_as_evaluated(smoke_workdir):
  workdir = smoke_workdir
  model = export.load(workdir / "final")
  assert model.metadata["class_names"] == list(fashion_tones.CLASS_NAMES)
  assert model.metadata["input_shape"] == [28, 28, 3]
  test = data_stage.load_data(smoke.get_config(), workdir).test  # the examples the run tested
  logits = np.asarray(model.predict(test["image"] / 255.0))
  assert logits.shape == (len(test["label"]), 10)
  summary = json.loads((workdir / "results" / "summary.json").read_text())
  accuracy = (logits.argmax(-1) == test["label"]).mean()
  np.testing.assert_allclose(accuracy, summary["final"]["trained"]["accuracy"], atol=1e-6)


def test_more_baselines_join_the_report_with_their_paired_comparisons(smoke_workdir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(smoke_workdir, workdir)  # the other tests read the original
  config = smoke.get_config()
  config.baselines = ("mobilevit_v2_dense", "resnet")
  config.baseline_options = {"resnet": {"depth": 8, "width_multiplier": 0.5}}
  summary = search.run_baselines(config, workdir, log=print)
  names = ["mobilevit_v2_dense", "mobilevit_v2_dense_erm", "resnet"]
  assert sorted(b["name"] for b in summary["baselines"]) == names
  assert sorted(c["baseline"] for c in summary["comparison"]) == names
  predictions = np.load(workdir / "results" / "test_predictions.npz")
  assert sorted(predictions.files) == ["found", *names]
  resnet = next(c for c in summary["comparison"] if c["baseline"] == "resnet")
  metrics_of = next(b for b in summary["baselines"] if b["name"] == "resnet")["metrics"]
  np.testing.assert_allclose(resnet["found_minus_baseline"]["accuracy"]["estimate"],
                             summary["final"]["trained"]["accuracy"] - metrics_of["accuracy"],
                             atol=1e-6)
  assert "| resnet |" in (workdir / "results" / "report.md").read_text()
  # ResNet-8 at half width (8, 16, 32 channels), built from config.baseline_options.
  resnet_8 = models.build("resnet", rngs=nnx.Rngs(0), num_classes=10, image_size=(28, 28),
                          channels=3, depth=8, width_multiplier=0.5)
  assert metrics_of["params"] == costs.count_params(resnet_8)


def test_a_workdir_with_another_config_is_refused(smoke_workdir):
  config = smoke.get_config()
  config.search.tournament_size = 2
  with pytest.raises(ValueError, match="search.tournament_size: 3 -> 2"):
    search.run_search(config, smoke_workdir)


def test_a_group_absent_from_training_is_named_under_group_balanced(tmp_path):
  # Your own data: group "dark" only in validation and test.
  rng = np.random.default_rng(0)
  split = np.repeat([0, 1, 2], [200, 50, 50])
  (tmp_path / "mine").mkdir()
  np.savez(tmp_path / "mine" / "data.npz", images=rng.integers(0, 256, (300, 28, 28, 3),
                                                               dtype=np.uint8),
           labels=rng.integers(0, 10, 300), groups=np.where(split == 0, 0, rng.integers(0, 2, 300)),
           split=split, group_names=["light", "dark"])
  config = smoke.get_config()
  config.data.update(name="npz", manual_dir=str(tmp_path / "mine"), train_size=0, eval_size=0)
  config.search.bn_batches = 0
  with pytest.raises(settings.ConfigError, match=r"config.train.objective=.*: objective "
                                                r"group_balanced: group\(s\) \['dark'\] have no "
                                                r"training example"):
    search.run_search(config, tmp_path / "run")
  assert not (tmp_path / "run" / "checkpoints").exists()
