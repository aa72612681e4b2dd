"""Full metrics of one model: the final models and the baselines (populations: population.py).

`Evaluator` is the population evaluator at P = 1 (`population.PopulationEvaluator` with
`population=None` for a standalone model, or one candidate of a supernet) plus the
bootstrap. `evaluate` gives, on the evaluation examples, everything of `metrics.summarize`, plus
- `robustness`: mean accuracy over the lighting set (each perturbation of every image counts
  once), `robustness_by_kind` (mean per kind) and `robust_worst_group_accuracy`;
- `train_accuracy`, `generalization_gap` (group-fair) and `pooled_generalization_gap` on a
  held training subset, when given;
- with an `attack` (`adversarial.AttackSettings`, e.g. PGD-10, ε = 8/255, steps of 2/255,
  on the whole model, the router included): `adversarial_accuracy`,
  `adversarial_group_accuracy`, `adversarial_disparity`, `adversarial_worst_group_accuracy`;
  batch b is attacked from key `fold_in(split(key(seed))[1], b)`;
- `bootstrap`: `metrics.bootstrap_intervals` of the clean predictions (key
  `split(key(seed))[0]`): {"accuracy", "group_accuracy", "disparity", "worst_group_accuracy"}
  each {"estimate", "low", "high"}.
The result is JSON-ready (`metrics.to_python`: lists, floats, None for NaN).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moenas_jax import adversarial, costs, metrics, models, population, search_space
from moenas_jax.data import lighting, pipeline
from moenas_jax.search_space import Arch


class Evaluator:
  """Jitted evaluation of one model (`graphdef`); `evaluate` runs it on any weights."""

  def __init__(self, graphdef: nnx.GraphDef, *, num_classes: int, num_groups: int,
               batch_size: int, lighting_set: Sequence[tuple[str, int]] = lighting.LIGHTING_SET,
               attack: adversarial.AttackSettings | None = None):
    self.num_classes, self.num_groups = num_classes, num_groups
    self.lighting_set = tuple(lighting_set)
    self.population = population.PopulationEvaluator(
        graphdef, num_classes=num_classes, num_groups=num_groups, batch_size=batch_size,
        lighting_set=lighting_set, attack=attack)

  def evaluate(self, params: nnx.State, state: nnx.State, examples: pipeline.Examples, *,
               held_examples: pipeline.Examples | None = None, bootstrap_resamples: int = 1000,
               seed: int = 0, arch: Arch | None = None, with_predictions: bool = False) -> Any:
    """The metrics of the module docstring, as JSON-ready Python values.

    `arch`: a candidate ([L] arrays) when `graphdef` is a supernet, None for a standalone
    model (or a supernet's largest candidate). `bootstrap_resamples=0` skips the bootstrap.
    `with_predictions`: return (metrics, the clean predicted classes [n]), e.g. for
    `metrics.paired_bootstrap` against another model (same seed: same resamples).
    """
    if not len(examples["label"]):
      raise ValueError("evaluate needs at least one example, got none")
    if bootstrap_resamples < 0:
      raise ValueError(f"bootstrap_resamples must be >= 0, got {bootstrap_resamples}")
    bootstrap_key, attack_key = _keys(seed)
    scores = self.population.evaluate(
        params, state, None if arch is None else search_space.stack([arch]), examples,
        held_examples, attack_key=attack_key, with_predictions=True)
    result: dict[str, Any] = {name: values[0] for name, values in scores.items()}
    predictions = result.pop("predictions")
    if self.lighting_set:
      result["robustness_by_kind"] = metrics.robustness_by_kind(
          result.pop("perturbation_accuracy"), self.lighting_set)
    if bootstrap_resamples:
      result["bootstrap"] = metrics.bootstrap_intervals(
          predictions, examples["label"], examples["group"], num_classes=self.num_classes,
          num_groups=self.num_groups, key=bootstrap_key, num_resamples=bootstrap_resamples)
    if with_predictions:
      return metrics.to_python(result), predictions
    return metrics.to_python(result)


def _keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(bootstrap key, attack key) of an evaluation with `seed`."""
  return tuple(jax.random.split(jax.random.key(seed)))


def paired_comparison(predictions: np.ndarray, baseline_predictions: np.ndarray,
                      examples: pipeline.Examples, *, num_classes: int, num_groups: int,
                      seed: int, bootstrap_resamples: int) -> dict[str, Any]:
  """JSON-ready paired intervals of (model − baseline) on `examples`, from the resamples of
  `Evaluator.evaluate(..., seed=seed)` (`metrics.paired_bootstrap`)."""
  return metrics.to_python(metrics.paired_bootstrap(
      predictions, baseline_predictions, examples["label"], examples["group"],
      num_classes=num_classes, num_groups=num_groups, key=_keys(seed)[0],
      num_resamples=bootstrap_resamples))


def evaluate(graphdef: nnx.GraphDef, params: nnx.State, state: nnx.State,
             examples: pipeline.Examples, *, num_classes: int, num_groups: int, batch_size: int,
             held_examples: pipeline.Examples | None = None,
             lighting_set: Sequence[tuple[str, int]] = lighting.LIGHTING_SET,
             bootstrap_resamples: int = 1000,
             attack: adversarial.AttackSettings | None = None, seed: int = 0,
             arch: Arch | None = None) -> dict[str, Any]:
  """Full metrics of one model (see the module docstring and `Evaluator.evaluate`)."""
  evaluator = Evaluator(graphdef, num_classes=num_classes, num_groups=num_groups,
                        batch_size=batch_size, lighting_set=lighting_set, attack=attack)
  return evaluator.evaluate(params, state, examples, held_examples=held_examples,
                            bootstrap_resamples=bootstrap_resamples, seed=seed, arch=arch)


def model_costs(model: nnx.Module) -> dict[str, int]:
  """Stored parameters and MACs per image of a model, counted as the search counts them.

  An MoE model (one with `search_space()`: the supernet, or a candidate cut out of it by
  `export.standalone`, whose per-layer maxima are its arch) gets the analytic
  `SearchSpace.params` / `SearchSpace.macs` of its largest candidate, which for a standalone
  is the candidate itself: capacity padding (the empty slots of the experts' blocks) is not
  counted. A dense family has no padding: `costs.count_params` and `costs.count_macs`.
  """
  if callable(getattr(model, "search_space", None)):
    space = model.search_space()
    largest = space.largest()
    return {"params": int(space.params(largest)), "macs": int(space.macs(largest))}
  graphdef, params, state = models.split(model)  # also for an abstract model (eval_shape)
  image = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
  return {"params": costs.count_params(model),
          "macs": costs.count_macs(lambda p, s, x: models.apply(graphdef, p, s, x)[0], params,
                                   state, image)}
