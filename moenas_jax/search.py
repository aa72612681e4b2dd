"""`run_search(config, workdir)`: the whole pipeline, resumable at every stage.

data → supernet training → the controller's search (population evaluator, reward, Pareto
archive) → expert pruning of the winner → final training of the winner and the baselines
(the same recipe) → test evaluation → export (`workdir/final/`) → report
(`workdir/results/`). Each stage checkpoints under `workdir/checkpoints/<stage>/`; running
the same command again continues from the last completed step of the stage it was in and
ends with the same results as an uninterrupted run (every key comes from `config.seed`).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import io
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from moenas_jax import (
  checkpoint,
  controllers,
  evaluate,
  export,
  metrics,
  models,
  objectives,
  population,
  proxy,
  prune,
  report,
  reward,
  search_space,
  supernet,
  train,
)
from moenas_jax.compilation import count_compilations
from moenas_jax.data import lighting, open_dataset, pipeline

# Config keys a later `run_baselines` may change in a finished workdir.
_BASELINE_KEYS = (*checkpoint.IGNORED_CONFIG_KEYS, "baselines", "baseline_options")
# The jitted functions whose compilations the summary reports.
_COMPILED = ("supernet_step", "proxy_step", "bn_recalibrate", "population_counts",
             "train_step", "perturbed_counts", "usage_counts")
# The suffix of the dense reference baseline trained with ERM when config.train.objective is not.
_ERM = "_erm"
# Test predictions of the found model ("found") and of each baseline, for paired comparisons.
_PREDICTIONS = "test_predictions.npz"


@dataclasses.dataclass
class Data:
  """The splits a search reads, in memory, and the dataset's names."""

  train: pipeline.Examples
  held: pipeline.Examples
  search: pipeline.Examples
  robust: pipeline.Examples  # the part of the search split scored under lighting changes
  test: pipeline.Examples
  class_names: tuple[str, ...]
  group_names: tuple[str, ...]
  image_shape: tuple[int, int, int]


def load_data(config: Any, workdir: Path) -> Data:
  """Prepares (once) and reads the dataset named by `config.data`."""
  cfg = config.data
  dataset = open_dataset(cfg.name, cfg.data_dir or workdir / "data",
                         manual_dir=cfg.manual_dir or None, **dict(cfg.options))
  classes, groups = len(dataset.class_names), len(dataset.group_names)
  missing = {"train", cfg.search_split, cfg.test_split} - set(dataset.splits)
  if missing:
    raise ValueError(f"dataset {cfg.name!r} has no split(s) {sorted(missing)}; it has "
                     f"{sorted(dataset.splits)}: set config.data.search_split / test_split")
  read = {name: pipeline.read_split(dataset.splits[name], classes, groups, name)
          for name in {"train", cfg.search_split, cfg.test_split}}
  train, search, test = read["train"], read[cfg.search_split], read[cfg.test_split]
  if cfg.train_size:
    train = pipeline.held_train_subset(train, cfg.train_size, config.seed + 1)
  if cfg.eval_size:
    search = pipeline.held_train_subset(search, cfg.eval_size, config.seed + 2)
    test = pipeline.held_train_subset(test, cfg.eval_size, config.seed + 3)
  return Data(train=train,
              held=pipeline.held_train_subset(train, cfg.held_train_size, config.seed),
              search=search, test=test,
              robust=pipeline.held_train_subset(search, config.search.robustness_size,
                                                config.seed + 4),
              class_names=dataset.class_names, group_names=dataset.group_names,
              image_shape=dataset.image_shape)


def check_data(config: Any, data: Data) -> None:
  """Checks the settings that depend on the data, before anything compiles."""
  size, needed = len(data.train["label"]), config.search.bn_batches * config.supernet.batch_size
  if needed > size:
    raise ValueError(f"config.search.bn_batches={config.search.bn_batches} batches of "
                     f"config.supernet.batch_size={config.supernet.batch_size} need {needed} "
                     f"distinct training examples, but the training split has {size}; lower "
                     f"search.bn_batches to at most {size // config.supernet.batch_size}")
  _check_objectives(config, data, ("supernet", "train"))


def _check_objectives(config: Any, data: Data, sections: tuple[str, ...]) -> None:
  """Builds each section's objective on the training split, so a group that cannot be
  balanced is named before anything compiles."""
  for section in sections:
    try:
      _objective(config, section, data)
    except ValueError as error:
      raise ValueError(f"config.{section}.objective: {error}") from None


def _objective(config: Any, section: str, data: Data, name: str | None = None
               ) -> objectives.Objective:
  """The training objective of `config.<section>.objective` (its `name` replaced if given)."""
  settings = objectives.ObjectiveSettings.from_config(config[section].objective)
  if name is not None:
    settings = dataclasses.replace(settings, name=name)
  return objectives.Objective.from_examples(settings, data.train, len(data.class_names),
                                            data.group_names, data.class_names)


def build_supernet(config: Any, data: Data) -> nnx.Module:
  height, width, channels = data.image_shape
  return models.build(config.model.name, rngs=nnx.Rngs(config.seed),
                      num_classes=len(data.class_names), image_size=(height, width),
                      channels=channels, **_model_options(config))


def _model_options(config: Any) -> dict[str, Any]:
  options = {key: value for key, value in config.model.items() if key != "name"}
  options["moe_settings"] = dict(options.get("moe_settings") or {})
  return options


def validate(config: Any) -> None:
  """Checks the settings that fail late otherwise; raises ValueError naming the field."""
  for name in ("supernet", "train"):
    try:
      objectives.ObjectiveSettings.from_config(config[name].objective)
    except ValueError as error:
      raise ValueError(f"config.{name}.objective: {error}") from None
  if config.search.controller not in controllers.NAMES:
    raise ValueError(f"config.search.controller={config.search.controller!r} is unknown; use "
                     f"one of {', '.join(controllers.NAMES)}")
  try:
    controllers.settings(config.search.controller, **_controller_sizes(config))
  except ValueError as error:
    raise ValueError(f"config.search: {error}") from None
  checks = [("supernet.steps", config.supernet.steps, 1),
            ("search.bn_batches", config.search.bn_batches, 0),
            ("search.candidates", config.search.candidates, config.search.batch_size),
            ("search.proxy_steps", config.search.proxy_steps, 0),
            ("search.proxy_batch_size", config.search.proxy_batch_size, 1),
            ("search.chunk_size", config.search.chunk_size, 0),
            ("train.epochs", config.train.epochs, 1),
            ("data.held_train_size", config.data.held_train_size, 1)]
  for name, value, minimum in checks:
    if value < minimum:
      raise ValueError(f"config.{name}={value} must be at least {minimum}")
  if not config.search.proxy_learning_rate > 0:
    raise ValueError(f"config.search.proxy_learning_rate={config.search.proxy_learning_rate} "
                     f"must be positive")
  if config.supernet.batch_size % jax.device_count():
    raise ValueError(f"config.supernet.batch_size={config.supernet.batch_size} must be a "
                     f"multiple of the {jax.device_count()} devices (data parallel)")
  if config.search.candidates % config.search.batch_size:
    raise ValueError(f"config.search.candidates={config.search.candidates} must be a multiple "
                     f"of config.search.batch_size={config.search.batch_size} (one evaluator "
                     f"call scores a batch)")
  for name in ("search", "evaluation"):
    bad = [s for s in config[name].lighting_severities if s not in lighting.SEVERITIES]
    if bad:
      raise ValueError(f"config.{name}.lighting_severities has {bad}; use values in "
                       f"{lighting.SEVERITIES}")
  unknown = [name for name in config.baselines if name not in models.MODELS]
  if unknown:
    raise ValueError(f"config.baselines has unknown models {unknown}; known: "
                     f"{', '.join(sorted(models.MODELS))}")
  stray = sorted(set(config.get("baseline_options", {})) - set(config.baselines))
  if stray:
    raise ValueError(f"config.baseline_options has options for {stray}, which are not in "
                     f"config.baselines {tuple(config.baselines)}; add them there or drop them")


class _Progress:
  """Periodic progress lines with rate and ETA."""

  def __init__(self, stage: str, total: int, log: Callable[[str], None],
               start: int | None = 0):
    """`start`: where this invocation began (None: one before the first call's `done`)."""
    self.stage, self.total, self.log, self.start = stage, total, log, start
    self.began = time.perf_counter()

  def __call__(self, done: int, extra: str = "") -> None:
    if self.start is None:
      self.start = done - 1
    seconds = time.perf_counter() - self.began
    rate = (done - self.start) / seconds if seconds > 0 and done > self.start else 0.0
    eta = f", ETA {(self.total - done) / rate:.0f} s" if rate else ""
    self.log(f"[{self.stage}] {done}/{self.total} ({100 * done / self.total:.0f}%)"
             f"{eta}{' · ' + extra if extra else ''}")


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), tree)


# ---------------------------------------------------------------------------------------------
# Stage 1: supernet training.

def train_supernet(config: Any, supernet_model: nnx.Module, data: Data, workdir: Path,
                   log: Callable[[str], None]) -> tuple[Any, Any]:
  """Trains the supernet's shared weights (resumes from checkpoints); returns (params, state)."""
  cfg = config.supernet
  graphdef, params, state = models.split(supernet_model)
  trainer = supernet.SupernetTrainer(
      graphdef, supernet_model.search_space(), archs_per_step=cfg.archs_per_step,
      optimizer=supernet.OptimizerSettings(learning_rate=cfg.learning_rate,
                                           weight_decay=cfg.weight_decay,
                                           warmup_steps=min(cfg.warmup_steps, cfg.steps),
                                           total_steps=cfg.steps),
      mesh=population.make_mesh(data_parallel=jax.device_count())
      if jax.device_count() > 1 else None, objective=_objective(config, "supernet", data))
  tree = {"params": params, "state": state, "opt_state": trainer.init(params)}
  with checkpoint.Checkpointer(workdir / "checkpoints" / "supernet") as checkpoints:
    step = checkpoints.latest_step() or 0
    if step:
      tree, _ = checkpoints.restore(step, like=_abstract(tree))
      log(f"[supernet] resumed at step {step}/{cfg.steps}")
    if step >= cfg.steps:
      return tree["params"], tree["state"]
    size = len(data.train["label"])
    per_epoch = size // cfg.batch_size
    if per_epoch < 1:
      raise ValueError(f"config.supernet.batch_size={cfg.batch_size} exceeds the {size} "
                       f"training examples")
    base_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    progress = _Progress("supernet", cfg.steps, log, start=step)
    params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
    epoch, skip = divmod(step, per_epoch)
    while step < cfg.steps:
      for batch in pipeline.train_batches(data.train, cfg.batch_size, config.seed, epoch):
        if skip:
          skip -= 1
          continue
        params, state, opt_state, logs = trainer.step(params, state, opt_state, batch,
                                                      jax.random.fold_in(base_key, step))
        step += 1
        if step % config.log_every == 0 or step == cfg.steps:
          supernet.check_finite(logs, step)
          progress(step, f"loss {float(logs['loss']):.3f}, accuracy largest "
                         f"{float(logs['accuracy_largest']):.3f} smallest "
                         f"{float(logs['accuracy_smallest']):.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
          supernet.check_finite(logs, step)
          checkpoints.save(step, {"params": params, "state": state, "opt_state": opt_state},
                           {"step": step})
        if step == cfg.steps:
          break
      epoch += 1
  return params, state


# ---------------------------------------------------------------------------------------------
# Stage 2: the search.

def _lighting_set(severities) -> list[tuple[str, int]]:
  return [(kind, severity) for kind in lighting.KINDS for severity in severities]


def _reward_settings(config: Any) -> dict[str, Any]:
  cfg = config.reward
  return dict(weights=reward.RewardWeights(disparity=cfg.disparity, robustness=cfg.robustness,
                                           gap=cfg.gap, worst_cell=cfg.worst_cell),
              param_budget=cfg.param_budget, mac_budget=cfg.mac_budget)


def _controller_sizes(config: Any) -> dict[str, int]:
  cfg = config.search
  return dict(population_size=cfg.population_size, tournament_size=cfg.tournament_size,
              batch_size=cfg.batch_size, seed=config.seed)


def _recalibration_images(config: Any, data: Data) -> np.ndarray | None:
  """`search.bn_batches` training batches [NB, B, H, W, C] (None at 0), from the seed."""
  if not config.search.bn_batches:
    return None
  batches = pipeline.sampled_batches(data.train, config.supernet.batch_size,
                                     config.search.bn_batches, [config.seed, 5])
  return np.stack([batch["image"] for batch in batches])


def population_evaluator(config: Any, graphdef: nnx.GraphDef, data: Data, *,
                         per_candidate_weights: bool = False) -> population.PopulationEvaluator:
  """The search's evaluator: its lighting set, chunks, mesh and batch-norm recalibration."""
  return population.PopulationEvaluator(
      graphdef, num_classes=len(data.class_names), num_groups=len(data.group_names),
      batch_size=config.data.eval_batch_size,
      lighting_set=_lighting_set(config.search.lighting_severities),
      mesh=population.make_mesh() if jax.device_count() > 1 else None,
      per_candidate_weights=per_candidate_weights, chunk_size=config.search.chunk_size or None,
      recalibration_images=_recalibration_images(config, data))


def candidate_scorer(config: Any, evaluator: population.PopulationEvaluator, params: Any,
                     state: Any, space: search_space.SearchSpace, data: Data, *,
                     tuner: proxy.ProxyTuner | None = None,
                     log: Callable[[str], None] = logging.info) -> controllers.Score:
  """The search's `score(archs, todo, cycle)`: validation metrics and reward of a batch."""
  rewards_of = _reward_settings(config)
  proxy_key = jax.random.fold_in(jax.random.key(config.seed), 2)

  def score(archs: search_space.Arch, todo: np.ndarray, cycle: int) -> list[dict]:
    weights = (params, state)
    if tuner is not None:
      *weights, logs = tuner.tune(params, state, archs, data.train,
                                  jax.random.fold_in(proxy_key, cycle))
      log(f"[search] cycle {cycle}: proxy loss {logs['loss'][0].mean():.3f} → "
          f"{logs['loss'][-1].mean():.3f}")
    scores = evaluator.evaluate(*weights, archs, data.search, data.held, data.robust)
    scores["params"], scores["macs"] = space.params(archs), space.macs(archs)
    rewards = np.asarray(reward.reward(scores, scores["params"], scores["macs"], **rewards_of),
                         np.float64)
    return [{"metrics": metrics.to_python({k: v[i] for k, v in scores.items()}),
             "reward": float(rewards[i])} for i in todo]

  return score


def run_controller(config: Any, graphdef: nnx.GraphDef, params: Any, state: Any,
                   space: search_space.SearchSpace, data: Data, workdir: Path,
                   log: Callable[[str], None],
                   evaluator: population.PopulationEvaluator | None = None) -> list[dict]:
  """The search: `config.search.controller` driven by `controllers.run`, every batch scored
  by the population evaluator (`population_evaluator` unless given); returns the candidate
  records.

  With `search.proxy_steps` > 0, each cycle's candidates are scored on their own proxy
  fine-tuned weight copies (`proxy.ProxyTuner`, key `fold_in(fold_in(key(seed), 2), cycle)`).
  """
  cfg = config.search
  controller = controllers.make(cfg.controller, space, **_controller_sizes(config))
  tuner = proxy.ProxyTuner(graphdef, proxy.ProxySettings(
      steps=cfg.proxy_steps, batch_size=cfg.proxy_batch_size,
      learning_rate=cfg.proxy_learning_rate),
      _objective(config, "supernet", data)) if cfg.proxy_steps else None
  if evaluator is None:
    evaluator = population_evaluator(config, graphdef, data,
                                     per_candidate_weights=tuner is not None)
  score = candidate_scorer(config, evaluator, params, state, space, data, tuner=tuner, log=log)
  return controllers.run(controller, space, score, cycles=cfg.candidates // cfg.batch_size,
                         checkpoint_dir=workdir / "checkpoints" / "search",
                         log_path=workdir / "results" / "candidates.jsonl",
                         progress=_Progress("search", cfg.candidates // cfg.batch_size, log,
                                            start=None), log=log)


# ---------------------------------------------------------------------------------------------
# Stages 3-5: pruning, final training, baselines, export.

def _train_settings(config: Any) -> train.TrainSettings:
  cfg = config.train
  return train.TrainSettings(epochs=cfg.epochs, batch_size=cfg.batch_size,
                             learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay,
                             warmup_fraction=cfg.warmup_fraction)


def _test_evaluator(config: Any, graphdef: nnx.GraphDef, data: Data) -> evaluate.Evaluator:
  """Full test metrics of one model: every lighting perturbation, optional PGD."""
  return evaluate.Evaluator(graphdef, num_classes=len(data.class_names),
                            num_groups=len(data.group_names),
                            batch_size=config.data.eval_batch_size,
                            lighting_set=_lighting_set(config.evaluation.lighting_severities),
                            pgd_steps=config.evaluation.pgd_steps)


def _evaluate(config: Any, evaluator: evaluate.Evaluator, params: Any, state: Any, data: Data,
              arch: Any = None) -> dict[str, Any]:
  return evaluator.evaluate(params, state, data.test, held_examples=data.held,
                            bootstrap_resamples=config.evaluation.bootstrap_resamples,
                            seed=config.seed, arch=arch)


def _train_and_evaluate(config: Any, name: str, model: nnx.Module, data: Data, workdir: Path,
                        log: Callable[[str], None], objective: str | None = None
                        ) -> tuple[nnx.Module, dict[str, Any], np.ndarray]:
  """Trains a standalone model with the shared recipe (resumable) and evaluates it on test.

  `objective` replaces the name of `config.train.objective` (e.g. "erm" for the reference).
  Returns (model, test metrics, test predictions).
  """
  graphdef, params, state = models.split(model)
  with checkpoint.Checkpointer(workdir / "checkpoints" / name) as checkpoints:
    params, state, _ = train.train(graphdef, params, state, data.train,
                                   settings=_train_settings(config), seed=config.seed,
                                   checkpointer=checkpoints, log=log,
                                   objective=_objective(config, "train", data, objective))
  nnx.update(model, params, state)
  results, predictions = _test_evaluator(config, graphdef, data).evaluate(
      params, state, data.test, held_examples=data.held,
      bootstrap_resamples=config.evaluation.bootstrap_resamples, seed=config.seed,
      with_predictions=True)
  results.update(evaluate.model_costs(model))
  return model, results, predictions


def _baseline(config: Any, name: str, supernet_model: nnx.Module | None,
              data: Data) -> nnx.Module:
  """A dense baseline: the supernet's own dense candidate, or another family built with its
  `config.baseline_options[name]` (e.g. {"width_multiplier": 0.5})."""
  if name == f"{config.model.name}_dense" and supernet_model is not None:
    return export.standalone(supernet_model, supernet_model.search_space().dense())
  height, width, channels = data.image_shape
  options = dict(config.get("baseline_options", {}).get(name, {}))
  return models.build(name, rngs=nnx.Rngs(config.seed), num_classes=len(data.class_names),
                      image_size=(height, width), channels=channels, **options)


def baseline_specs(config: Any) -> list[tuple[str, str, str]]:
  """(row name, model, objective) of every baseline: `config.baselines` trained with
  `config.train.objective`, and when that is not ERM, the supernet's dense model trained
  with ERM too (row `<model>_dense_erm`), the reference a user starts from."""
  objective = config.train.objective.name
  specs = [(name, name, objective) for name in config.baselines]
  if objective != "erm":
    dense = f"{config.model.name}_dense"
    specs.append((dense + _ERM, dense, "erm"))
  return specs


def _baselines(config: Any, supernet_model: nnx.Module, data: Data, workdir: Path,
               log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
  """Trains and tests every baseline (`baseline_specs`); returns (rows, test predictions)."""
  results, predictions = [], {}
  for name, model_name, objective in baseline_specs(config):
    log(f"[baselines] {name} ({objective})")
    _, metrics_of, predictions[name] = _train_and_evaluate(
        config, f"baseline_{name}", _baseline(config, model_name, supernet_model, data), data,
        workdir, log, objective)
    results.append({"name": name, "objective": objective, "metrics": metrics_of})
  return results, predictions


def _comparisons(config: Any, data: Data, predictions: dict[str, np.ndarray],
                 baselines: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per baseline: paired bootstrap intervals of found − baseline on the test split."""
  return [{"baseline": row["name"], "found_minus_baseline": evaluate.paired_comparison(
              predictions["found"], predictions[row["name"]], data.test,
              num_classes=len(data.class_names), num_groups=len(data.group_names),
              seed=config.seed, bootstrap_resamples=config.evaluation.bootstrap_resamples)}
          for row in baselines if row["name"] in predictions and "found" in predictions
          and config.evaluation.bootstrap_resamples]


def _save_predictions(path: Path, predictions: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **predictions)
  checkpoint.write_atomic(path, buffer.getvalue())


def _load_predictions(path: Path) -> dict[str, np.ndarray]:
  if not path.exists():
    return {}
  with np.load(path) as saved:
    return {name: saved[name] for name in saved.files}


def run_baselines(config: Any, workdir: str | os.PathLike,
                  log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Trains and tests the baselines for a finished search and rewrites its report.

  Baselines already in the summary under the same name are replaced; others are kept. The
  paired comparisons with the found model are recomputed for every baseline.
  """
  workdir = Path(workdir)
  validate(config)
  summary_path = workdir / "results" / "summary.json"
  if not summary_path.exists():
    raise FileNotFoundError(f"{summary_path} does not exist: run the search in {workdir} first "
                            f"(python -m launch.search --workdir={workdir})")
  checkpoint.check_config(workdir, config.to_dict(),
                          override=config.override_workdir, ignore=_BASELINE_KEYS)
  data = load_data(config, workdir)
  check_data(config, data)
  supernet_model = build_supernet(config, data)
  nnx.update(supernet_model, *train_supernet(config, supernet_model, data, workdir, log))
  new, new_predictions = _baselines(config, supernet_model, data, workdir, log)
  predictions_path = workdir / "results" / _PREDICTIONS
  predictions = {**_load_predictions(predictions_path), **new_predictions}
  _save_predictions(predictions_path, predictions)
  summary = checkpoint.read_json(summary_path)
  names = {b["name"] for b in new}
  summary["baselines"] = [b for b in summary["baselines"] if b["name"] not in names] + new
  summary["comparison"] = _comparisons(config, data, predictions, summary["baselines"])
  report.write_report(workdir / "results", summary,
                      report.read_candidates(workdir / "results" / "candidates.jsonl"),
                      data.group_names)
  log("\n" + report.results_table(summary))
  return summary


def _pruning_rows(config: Any, graphdef: nnx.GraphDef, params: Any, state: Any,
                  space: search_space.SearchSpace, found: search_space.Arch, data: Data,
                  evaluator: population.PopulationEvaluator
                  ) -> tuple[search_space.Arch, Any, list[dict], dict, dict]:
  """Prunes the found candidate; test metrics on the supernet's weights before and after,
  each with the candidate's own recalibrated batch-norm state (when the search has one),
  which also routes the calibration split that counts expert usage.

  Returns (pruned arch, pruned params, per-layer pruning, before, after).
  """
  def own_state(weights: Any, arch: search_space.Arch) -> Any:
    if evaluator.recalibration_images is None:
      return state
    copies = search_space.stack([arch] * config.search.batch_size)  # the compiled size P
    return jax.tree.map(lambda v: v[0], evaluator.recalibrate(weights, state, copies))

  test_evaluator = _test_evaluator(config, graphdef, data)

  def row(weights: Any, arch: search_space.Arch, arch_state: Any) -> dict[str, Any]:
    results = _evaluate(config, test_evaluator, weights, arch_state, data, arch=arch)
    results.update(params=int(space.params(arch)), macs=int(space.macs(arch)))
    return results

  found_state = own_state(params, found)
  usage = prune.expert_usage(graphdef, params, found_state, found, data.search,
                             batch_size=config.data.eval_batch_size)
  pruned_params, pruned_arch, pruning = prune.prune(params, found, usage,
                                                    min_fraction=config.prune.min_fraction)
  before = row(params, found, found_state)
  removed = any(layer["removed"] for layer in pruning)
  # Nothing removed: the same weights and arch, so the same results.
  after = (row(pruned_params, pruned_arch, own_state(pruned_params, pruned_arch)) if removed
           else copy.deepcopy(before))
  return pruned_arch, pruned_params, pruning, before, after


def run_search(config: Any, workdir: str | os.PathLike,
               log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Runs (or resumes) the whole search; returns the summary also written to results/."""
  workdir = Path(workdir)
  validate(config)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.check_config(workdir, config.to_dict(), override=config.override_workdir)
  timing: dict[str, float] = {}
  clock = time.perf_counter()

  def lap(stage: str) -> None:
    nonlocal clock
    now = time.perf_counter()
    timing[stage] = round(now - clock, 2)
    clock = now

  with count_compilations() as compiled:
    data = load_data(config, workdir)
    log(f"[data] {config.data.name}: {len(data.train['label'])} train, "
        f"{len(data.search['label'])} {config.data.search_split}, {len(data.test['label'])} "
        f"{config.data.test_split}; groups {', '.join(data.group_names)}")
    if config.search.proxy_steps and config.search.proxy_batch_size > len(data.train["label"]):
      raise ValueError(f"config.search.proxy_batch_size={config.search.proxy_batch_size} "
                       f"exceeds the {len(data.train['label'])} training examples")
    check_data(config, data)
    supernet_model = build_supernet(config, data)
    space = supernet_model.search_space()
    reward.check_budget(space, config.reward.param_budget, config.reward.mac_budget)
    lap("data_and_model")

    params, state = train_supernet(config, supernet_model, data, workdir, log)
    nnx.update(supernet_model, params, state)
    lap("supernet")

    graphdef = models.split(supernet_model)[0]
    evaluator = population_evaluator(config, graphdef, data)
    candidates = run_controller(config, graphdef, params, state, space, data, workdir, log,
                                evaluator=None if config.search.proxy_steps else evaluator)
    best = max(candidates, key=lambda record: record["reward"])
    archive = reward.ParetoArchive()
    for record in candidates:
      archive.add(record)
    lap("search")

    found = search_space.from_json(best["arch"])
    pruned_arch, pruned_params, pruning, before, after = _pruning_rows(
        config, graphdef, params, state, space, found, data, evaluator)
    log(f"[prune] {search_space.to_dict(found)} → {search_space.to_dict(pruned_arch)}: params "
        f"{before['params']:,} → {after['params']:,}")
    lap("prune")

    pruned_supernet = nnx.merge(graphdef, pruned_params, state)
    found_model, trained, found_predictions = _train_and_evaluate(
        config, "final", export.standalone(pruned_supernet, pruned_arch), data, workdir, log)
    # Sizes as the search counts them (no capacity padding), like the rows above.
    trained.update(params=after["params"], macs=after["macs"])
    lap("final")
    baselines, predictions = _baselines(config, supernet_model, data, workdir, log)
    predictions["found"] = found_predictions
    _save_predictions(workdir / "results" / _PREDICTIONS, predictions)
    lap("baselines")

    export.save(workdir / "final", found_model, model_name=config.model.name,
                arch=pruned_arch, class_names=data.class_names, group_names=data.group_names)
  counts = collections.Counter(compiled.names)
  summary = {
      "best": best, "pareto": archive.front,
      "final": {"trained": trained, "before_pruning": before, "after_pruning": after,
                "arch": search_space.to_dict(pruned_arch), "pruning": pruning,
                "objective": config.train.objective.name},
      "baselines": baselines,
      "comparison": _comparisons(config, data, predictions, baselines),
      "group_counts": {split: np.bincount(examples["group"], minlength=len(data.group_names))
                       for split, examples in (("train", data.train), ("test", data.test))},
      "timing": timing,
      "compilations": {name: counts[f"jit({name})"] + counts[name] for name in _COMPILED},
  }
  report.write_report(workdir / "results", summary, candidates, data.group_names)
  log("\n" + report.results_table(summary))
  return metrics.to_python(summary)


def _train_evaluate_export(config: Any, model: nnx.Module, model_name: str, arch: Any,
                           data: Data, workdir: Path, stage: str,
                           log: Callable[[str], None]) -> dict[str, Any]:
  """Trains (resumably) and tests a standalone model, exports it to workdir/final."""
  model, results, _ = _train_and_evaluate(config, stage, model, data, workdir, log)
  export.save(workdir / "final", model, model_name=model_name, arch=arch,
              class_names=data.class_names, group_names=data.group_names)
  checkpoint.write_json_atomic(workdir / "results" / f"{stage}.json",
                               metrics.to_python({"model": model_name, "metrics": results}))
  log("\n" + report.results_table({"baselines": [{"name": model_name, "metrics": results}]}))
  return results


def run_train(config: Any, workdir: str | os.PathLike, model_name: str, arch: Any = None,
              log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Trains one model from scratch with `config.train` and exports it to workdir/final.

  `model_name` is a family of `models.MODELS` at its defaults, or, with `arch`, the
  supernet of `config.model` cut to that candidate (`export.standalone`).
  """
  workdir = Path(workdir)
  validate(config)
  if model_name not in models.MODELS:
    raise ValueError(f"unknown model {model_name!r}; valid names: {sorted(models.MODELS)}")
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.check_config(workdir, {**config.to_dict(), "train_model": model_name,
                                    "train_arch": arch and search_space.to_dict(arch)},
                          override=config.override_workdir)
  data = load_data(config, workdir)
  _check_objectives(config, data, ("train",))
  if arch is not None:
    supernet_model = build_supernet(config, data)
    model = export.standalone(supernet_model, supernet_model.search_space().validate(arch))
    model_name = config.model.name
  else:
    model = _baseline(config, model_name, None, data)
  return _train_evaluate_export(config, model, model_name, arch, data, workdir, "train", log)


def run_finetune(config: Any, workdir: str | os.PathLike, source: str | os.PathLike,
                 log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Fine-tunes an exported model on `config.data` (a new head if the classes differ)."""
  workdir = Path(workdir)
  validate(config)
  exported = export.load(source)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.check_config(workdir, {**config.to_dict(), "finetune_from": str(source)},
                          override=config.override_workdir)
  data = load_data(config, workdir)
  _check_objectives(config, data, ("train",))
  if tuple(exported.metadata["input_shape"]) != tuple(data.image_shape):
    raise ValueError(f"the model in {source} takes images {exported.metadata['input_shape']} "
                     f"but dataset {config.data.name!r} has {list(data.image_shape)}; set the "
                     f"dataset's image size (e.g. --config.data.options.image_size=...)")
  model = exported.model
  if model.config["num_classes"] != len(data.class_names):
    log(f"[finetune] new head: {model.config['num_classes']} → {len(data.class_names)} classes")
    model = train.replace_head(model, len(data.class_names), rngs=nnx.Rngs(config.seed))
  arch = exported.metadata["arch"] and search_space.from_json(exported.metadata["arch"])
  return _train_evaluate_export(config, model, exported.metadata["model"], arch, data, workdir,
                                "finetune", log)
