"""Stages 3-5: pruning of the winner, final training of it and of the baselines, test metrics.

Every model (the found one and each baseline) is trained with the one recipe of
`config.train` (resumable, `checkpoints/<name>`) and tested with the same evaluator; the test
predictions give paired bootstrap comparisons of found − baseline.
"""

from __future__ import annotations

import copy
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from moenas_jax import (
  checkpoint,
  evaluate,
  export,
  loss,
  models,
  population,
  prune,
  search_space,
  settings,
  train,
)
from moenas_jax.stages.data import Data, objective

# The suffix of the dense reference baseline trained with ERM when config.train.objective is not.
_ERM = "_erm"
# Test predictions of the found model ("found") and of each baseline, for paired comparisons.
PREDICTIONS = "test_predictions.npz"


def test_evaluator(config: Any, graphdef: nnx.GraphDef, data: Data) -> evaluate.Evaluator:
  """Full test metrics of one model: every lighting perturbation, optional PGD (end to
  end, the router included)."""
  return evaluate.Evaluator(graphdef, num_classes=len(data.class_names),
                            num_groups=len(data.group_names),
                            batch_size=config.data.eval_batch_size,
                            lighting_set=settings.lighting_set(
                                config.evaluation.lighting_severities),
                            attack=settings.attack_settings(config, "evaluation.pgd_steps"))


def _test_metrics(config: Any, evaluator: evaluate.Evaluator, params: Any, state: Any,
                  data: Data, arch: Any = None, **options: Any) -> Any:
  return evaluator.evaluate(params, state, data.test, held_examples=data.held,
                            bootstrap_resamples=config.evaluation.bootstrap_resamples,
                            seed=config.seed, arch=arch, **options)


def train_and_evaluate(config: Any, name: str, model: nnx.Module, data: Data, workdir: Path,
                       log: Callable[[str], None], objective_name: str | None = None,
                       features: Data | None = None
                       ) -> tuple[nnx.Module, dict[str, Any], np.ndarray]:
  """Trains a standalone model with the shared recipe (resumable) and evaluates it on test.

  `objective_name` replaces the name of `config.train.objective` (e.g. "erm" for the
  reference). Under AdvMoE, a model without an image router (a dense baseline) trains with
  TRADES, AdvMoE's backbone step. With `features` (a frozen trunk's, `stages.trunk`), only
  the tail trains, on them; the trunk stays as it is. The test runs the whole model on
  images. Returns (model, test metrics, test predictions).
  """
  if features is not None:
    model.freeze_trunk(config.supernet.frozen_stages)
  graphdef, params, state = models.split(model)
  recipe = settings.train_settings(config)
  if recipe.adversarial.method == "advmoe" and not loss.has_router(params):
    log(f"[{name}] no image router: TRADES instead of AdvMoE")
    recipe = dataclasses.replace(recipe, adversarial=dataclasses.replace(
        recipe.adversarial, method="trades"))
  with checkpoint.Checkpointer(workdir / "checkpoints" / name) as checkpoints:
    params, state, _ = train.train(graphdef, params, state, (features or data).train,
                                   settings=recipe, seed=config.seed,
                                   checkpointer=checkpoints, log=log, name=name,
                                   objective=objective(config, "train", data, objective_name),
                                   frozen=() if features is None else model.frozen_names())
  nnx.update(model, params, state)
  if features is not None:
    model.freeze_trunk(0)
    graphdef = models.split(model)[0]
  results, predictions = _test_metrics(config, test_evaluator(config, graphdef, data), params,
                                       state, data, with_predictions=True)
  results.update(evaluate.model_costs(model))
  return model, results, predictions


def baseline(config: Any, name: str, supernet_model: nnx.Module | None,
             data: Data) -> nnx.Module:
  """A dense baseline: the supernet's own dense candidate (built afresh from `config.model`
  without a supernet), or another family built with its `config.baseline_options[name]`
  (e.g. {"width_multiplier": 0.5})."""
  if name == f"{config.model.name}_dense" and supernet_model is not None:
    return export.standalone(supernet_model, supernet_model.search_space().dense())
  height, width, channels = data.image_shape
  options = dict(config.get("baseline_options", {}).get(name, {}))
  if name == f"{config.model.name}_dense":
    options = {**settings.model_options(config), **options}
  return models.build(name, rngs=nnx.Rngs(config.seed), num_classes=len(data.class_names),
                      image_size=(height, width), channels=channels, **options)


def baseline_specs(config: Any) -> list[tuple[str, str, str]]:
  """(row name, model, objective) of every baseline: `config.baselines` trained with
  `config.train.objective`, and when that is not ERM, the supernet's dense model trained
  with ERM too (row `<model>_dense_erm`), the reference a user starts from."""
  name_of_objective = config.train.objective.name
  specs = [(name, name, name_of_objective) for name in config.baselines]
  if name_of_objective != "erm":
    dense = f"{config.model.name}_dense"
    specs.append((dense + _ERM, dense, "erm"))
  return specs


def train_baselines(config: Any, supernet_model: nnx.Module, data: Data, workdir: Path,
                    log: Callable[[str], None]
                    ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
  """Trains and tests every baseline (`baseline_specs`); returns (rows, test predictions)."""
  results, predictions = [], {}
  for name, model_name, objective_name in baseline_specs(config):
    log(f"[baselines] {name} ({objective_name})")
    _, metrics_of, predictions[name] = train_and_evaluate(
        config, f"baseline_{name}", baseline(config, model_name, supernet_model, data), data,
        workdir, log, objective_name)
    results.append({"name": name, "objective": objective_name, "metrics": metrics_of})
  return results, predictions


def comparisons(config: Any, data: Data, predictions: dict[str, np.ndarray],
                baselines: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per baseline: paired bootstrap intervals of found − baseline on the test split."""
  return [{"baseline": row["name"], "found_minus_baseline": evaluate.paired_comparison(
              predictions["found"], predictions[row["name"]], data.test,
              num_classes=len(data.class_names), num_groups=len(data.group_names),
              seed=config.seed, bootstrap_resamples=config.evaluation.bootstrap_resamples)}
          for row in baselines if row["name"] in predictions and "found" in predictions
          and config.evaluation.bootstrap_resamples]


def save_predictions(path: Path, predictions: dict[str, np.ndarray]) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **predictions)
  checkpoint.write_atomic(path, buffer.getvalue())


def load_predictions(path: Path) -> dict[str, np.ndarray]:
  if not path.exists():
    return {}
  with np.load(path) as saved:
    return {name: saved[name] for name in saved.files}


def prune_found(config: Any, graphdef: nnx.GraphDef, params: Any, state: Any,
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

  tester = test_evaluator(config, graphdef, data)

  def row(weights: Any, arch: search_space.Arch, arch_state: Any) -> dict[str, Any]:
    results = _test_metrics(config, tester, weights, arch_state, data, arch=arch)
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
