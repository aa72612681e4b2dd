"""Full metrics of one model: the final models and the baselines (populations: population.py).

`evaluate` gives, on the evaluation examples, everything of `metrics.summarize`, plus
- `robustness`: mean accuracy over the lighting set (each perturbation of every image counts
  once), `robustness_by_kind` (mean per kind) and `robust_worst_group_accuracy`;
- `train_accuracy`, `generalization_gap` (group-fair) and `pooled_generalization_gap` on a
  held training subset, when given;
- `adversarial_accuracy` under an L∞ PGD attack (ε = 8/255, steps of 2/255: the defaults of
  `metrics.pgd_attack`) when `pgd_steps` > 0; batch b is attacked from key
  `fold_in(split(key(seed))[1], b)`;
- `bootstrap`: `metrics.bootstrap_intervals` of the clean predictions (key
  `split(key(seed))[0]`): {"accuracy", "group_accuracy", "disparity", "worst_group_accuracy"}
  each {"estimate", "low", "high"}.
The result is JSON-ready (`metrics.to_python`: lists, floats, None for NaN).

An `Evaluator` compiles one counting function per batch shape: the perturbation kind and
severity are traced (`lighting.perturb_indexed`), so the clean pass and all lighting passes share
it; the PGD attack is a second one. Counts accumulate on the device; only the clean
predictions come to the host (per batch), for the bootstrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moenas_jax import costs, loss, metrics, models
from moenas_jax.data import lighting, pipeline
from moenas_jax.search_space import Arch

# Shared by every Evaluator: compiled once per shape of the counts ([N, G] or [S, N, G]).
_summarize = jax.jit(metrics.summarize)


class Evaluator:
  """Jitted evaluation of one model (`graphdef`); `evaluate` runs it on any weights."""

  def __init__(self, graphdef: nnx.GraphDef, *, num_classes: int, num_groups: int,
               batch_size: int, lighting_set: Sequence[tuple[str, int]] = lighting.LIGHTING_SET,
               pgd_steps: int = 0):
    if batch_size < 1 or pgd_steps < 0:
      raise ValueError(f"need batch_size >= 1 and pgd_steps >= 0, got {batch_size}, "
                       f"{pgd_steps}")
    self.num_classes, self.num_groups, self.batch_size = num_classes, num_groups, batch_size
    self.lighting_set, self.pgd_steps = tuple(lighting_set), pgd_steps
    self._indexed = lighting.indexed(lighting_set)  # checks the kinds

    def logits(params, state, arch, images):
      return models.apply(graphdef, params, state, images, arch)[0]

    def counts(logits, batch, totals):
      return totals + metrics.batch_counts(logits, batch["label"], batch["group"],
                                           batch["mask"], num_groups, num_classes=num_classes)

    def perturbed_counts(params, state, arch, batch, kind, severity, totals):
      """(predictions [B], totals + the counts of the batch under perturbation `kind`)."""
      out = logits(params, state, arch, lighting.perturb_indexed(batch["image"], kind, severity))
      return out.argmax(-1), counts(out, batch, totals)

    def adversarial_counts(params, state, arch, batch, key, totals):
      def attacked_loss(images, labels):
        ce = loss.cross_entropy(logits(params, state, arch, images), labels)
        return (ce * batch["mask"]).sum()

      images = metrics.pgd_attack(attacked_loss, batch["image"], batch["label"], key=key,
                                  steps=pgd_steps)
      return counts(logits(params, state, arch, images), batch, totals)

    self._counts = jax.jit(perturbed_counts)
    self._adversarial_counts = jax.jit(adversarial_counts)

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
    if arch is not None:
      arch = jax.tree.map(lambda v: jnp.asarray(v, jnp.int32), arch)
    bootstrap_key, attack_key = _keys(seed)
    zeros = metrics.Counts.zeros(self.num_classes, self.num_groups)
    clean, perturbed, adversarial, predictions = zeros, [zeros] * len(self.lighting_set), zeros, []
    for b, batch in enumerate(pipeline.eval_batches(examples, self.batch_size)):
      batch_predictions, clean = self._counts(params, state, arch, batch, np.int32(0),
                                              np.float32(0), clean)
      predictions.append(np.asarray(batch_predictions)[batch["mask"]])
      perturbed = [self._counts(params, state, arch, batch, np.int32(index),
                                np.float32(severity), totals)[1]
                   for (index, severity), totals in zip(self._indexed, perturbed)]
      if self.pgd_steps:
        adversarial = self._adversarial_counts(params, state, arch, batch,
                                               jax.random.fold_in(attack_key, b), adversarial)
    result: dict[str, Any] = dict(_summarize(clean))
    if self.lighting_set:
      stacked = jax.tree.map(lambda *v: jnp.stack(v), *perturbed)  # [S, N, G]
      accuracies = _summarize(stacked)["accuracy"]  # [S]
      result["robustness"] = metrics.robustness(accuracies)
      result["robustness_by_kind"] = metrics.robustness_by_kind(accuracies, self.lighting_set)
      all_lighting = _summarize(jax.tree.map(lambda v: v.sum(0), stacked))
      result["robust_worst_group_accuracy"] = all_lighting["worst_group_accuracy"]
    if held_examples is not None:
      held = _summarize(self.counts(params, state, held_examples, arch))
      result["train_accuracy"] = held["accuracy"]
      result["generalization_gap"] = metrics.generalization_gap(held["group_accuracy"],
                                                                result["group_accuracy"])
      result["pooled_generalization_gap"] = metrics.pooled_generalization_gap(
          held["accuracy"], result["accuracy"])
    if self.pgd_steps:
      result["adversarial_accuracy"] = _summarize(adversarial)["accuracy"]
    if bootstrap_resamples:
      result["bootstrap"] = metrics.bootstrap_intervals(
          np.concatenate(predictions), examples["label"], examples["group"],
          num_classes=self.num_classes, num_groups=self.num_groups, key=bootstrap_key,
          num_resamples=bootstrap_resamples)
    if with_predictions:
      return metrics.to_python(result), np.concatenate(predictions)
    return metrics.to_python(result)

  def counts(self, params: nnx.State, state: nnx.State, examples: pipeline.Examples,
             arch: Arch | None = None) -> metrics.Counts:
    """Clean counts [N, G] of the examples."""
    totals = metrics.Counts.zeros(self.num_classes, self.num_groups)
    for batch in pipeline.eval_batches(examples, self.batch_size):
      totals = self._counts(params, state, arch, batch, np.int32(0), np.float32(0), totals)[1]
    return totals


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
             bootstrap_resamples: int = 1000, pgd_steps: int = 0, seed: int = 0,
             arch: Arch | None = None) -> dict[str, Any]:
  """Full metrics of one model (see the module docstring and `Evaluator.evaluate`)."""
  evaluator = Evaluator(graphdef, num_classes=num_classes, num_groups=num_groups,
                        batch_size=batch_size, lighting_set=lighting_set, pgd_steps=pgd_steps)
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
