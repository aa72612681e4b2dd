"""Evaluation metrics: accuracy, per-group accuracy, the disparity family, robustness, gap.

Everything that runs per candidate is pure JAX with static numbers of classes N and groups G,
so the population evaluator can `jit(vmap(...))` it over P candidates and nothing reaches the
host per candidate. Evaluation accumulates `Counts` (float32 sums per (class, group) cell)
over batches with `batch_counts`; `summarize` turns them into the metrics:

- accuracy: top-1 over all (unmasked) examples.
- group_accuracy a_g [G]: accuracy over the examples of group g; NaN for a group with no
  examples (reported, not dropped). group_count [G]: examples per group.
- disparity: max_g a_g − min_g a_g over non-empty groups (0 with one non-empty group).
- worst_group_accuracy: min_g a_g; group_accuracy_std: population std of a_g (non-empty g).
- cell_accuracy [N, G]: accuracy over the examples of class n in group g (the recall of n
  in g), NaN for empty cells; worst_cell_accuracy: its min over non-empty cells.
- equalized_odds_difference: one-vs-rest per class n, TPR_{n,g} = recall of n in group g and
  FPR_{n,g} = share of group g's examples of other classes predicted as n; per class, the
  larger of the TPR range and the FPR range over the groups where each is defined (a rate
  defined in one group only gives a range of 0); the result is the max over classes. With
  two classes this is exactly the textbook max(TPR gap, FPR gap) of the positive class (class
  0's TPR is class 1's 1 − FPR and vice versa).

Scalars that combine several evaluations: `generalization_gap` (group-fair: per group, held
training subset accuracy minus evaluation accuracy, averaged over the groups present in
both), `pooled_generalization_gap` (the same over all examples pooled, which also counts a
shift of group shares between the splits) and `robustness` (mean accuracy over
`lighting.LIGHTING_SET`).
`bootstrap_intervals` (host, final models and baselines) gives percentile intervals, and
`paired_bootstrap` the paired intervals of one model's metrics minus another's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moenas_jax.data import lighting


@struct.dataclass
class Counts:
  """Float32 sums over evaluation examples per (true class n, group g) cell, each [..., N, G].

  `correct`: examples of class n in group g predicted n. `count`: examples of class n in
  group g. `predicted`: examples of group g (any true class) predicted as class n. Float32
  sums stay exact integers up to 2^24 examples per cell.
  """

  correct: jax.Array
  count: jax.Array
  predicted: jax.Array

  @classmethod
  def zeros(cls, num_classes: int, num_groups: int) -> Counts:
    zeros = jnp.zeros((num_classes, num_groups), jnp.float32)
    return cls(zeros, zeros, zeros)

  def __add__(self, other: Counts) -> Counts:
    return jax.tree.map(jnp.add, self, other)


def _counts(predictions: jax.Array, labels: jax.Array, groups: jax.Array, weights: jax.Array,
            num_classes: int, num_groups: int) -> Counts:
  """Counts of [B] predicted classes, each example weighted (0 for masked, k if drawn k times)."""
  cells = num_classes * num_groups

  def per_cell(values, classes):  # [B] → [N, G], summed over the examples of each cell
    flat = jax.ops.segment_sum(values, classes * num_groups + groups, num_segments=cells)
    return flat.reshape(num_classes, num_groups)

  hits = weights * (predictions == labels)
  return Counts(correct=per_cell(hits, labels), count=per_cell(weights, labels),
                predicted=per_cell(weights, predictions))


def batch_counts(logits: jax.Array, labels: jax.Array, groups: jax.Array,
                 mask: jax.Array | None, num_groups: int, *,
                 num_classes: int | None = None) -> Counts:
  """Counts of one batch: logits [B, N], labels [B], groups [B], mask [B] (None: all valid).

  N is read from the logits; `num_classes`, if given, is checked against it.
  """
  if num_classes is not None and num_classes != logits.shape[-1]:
    raise ValueError(f"num_classes={num_classes} but the logits have {logits.shape[-1]} "
                     f"classes on their last axis; build the model with {num_classes} outputs")
  weights = (jnp.ones(labels.shape, jnp.float32) if mask is None
             else jnp.asarray(mask, jnp.float32))
  return _counts(jnp.argmax(logits, -1), labels, groups, weights, logits.shape[-1], num_groups)


def _divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, NaN where the denominator is 0."""
  defined = denominator > 0
  return jnp.where(defined, numerator / jnp.where(defined, denominator, 1.0), jnp.nan)


def _masked_min(values: jax.Array, valid: jax.Array, axis) -> jax.Array:
  """min of the valid values along axis; NaN where none is valid."""
  low = jnp.min(jnp.where(valid, values, jnp.inf), axis)
  return jnp.where(valid.any(axis), low, jnp.nan)


def _masked_max(values: jax.Array, valid: jax.Array, axis) -> jax.Array:
  return -_masked_min(-values, valid, axis)


def _masked_range(values: jax.Array, valid: jax.Array) -> jax.Array:
  """max − min of the valid values along the last axis; NaN where none is valid."""
  return _masked_max(values, valid, -1) - _masked_min(values, valid, -1)


def summarize(counts: Counts) -> dict[str, jax.Array]:
  """The metrics of the module docstring from counts [..., N, G] (pure JAX, any batch axes)."""
  correct, count, predicted = counts.correct, counts.count, counts.predicted
  group_count = count.sum(-2)  # [..., G]
  group_accuracy = _divide(correct.sum(-2), group_count)
  non_empty = group_count > 0
  k = non_empty.sum(-1)
  mean = jnp.where(non_empty, group_accuracy, 0.0).sum(-1) / jnp.maximum(k, 1)
  variance = jnp.where(non_empty, (group_accuracy - mean[..., None]) ** 2, 0.0).sum(-1)
  cell_accuracy = _divide(correct, count)  # [..., N, G]: TPR of class n in group g
  false_positive_rate = _divide(predicted - correct, group_count[..., None, :] - count)
  per_class = jnp.fmax(_masked_range(cell_accuracy, count > 0),  # [..., N]
                       _masked_range(false_positive_rate, ~jnp.isnan(false_positive_rate)))
  return {
      "accuracy": _divide(correct.sum((-2, -1)), count.sum((-2, -1))),
      "num_examples": count.sum((-2, -1)),
      "group_accuracy": group_accuracy,
      "group_count": group_count,
      "disparity": _masked_range(group_accuracy, non_empty),
      "worst_group_accuracy": _masked_min(group_accuracy, non_empty, -1),
      "group_accuracy_std": jnp.where(k > 0, jnp.sqrt(variance / jnp.maximum(k, 1)), jnp.nan),
      "equalized_odds_difference": _masked_max(per_class, ~jnp.isnan(per_class), -1),
      "cell_accuracy": cell_accuracy,
      "worst_cell_accuracy": _masked_min(cell_accuracy, count > 0, (-2, -1)),
  }


def generalization_gap(train_group_accuracy: Any, eval_group_accuracy: Any) -> Any:
  """Group-fair gap: mean over groups g present in both splits of (train a_g − eval a_g).

  Arguments are group accuracies [..., G] (NaN for an empty group). A training split that is
  95% group 0 and an evaluation split that is 50/50 differ in accuracy by about half the
  disparity even without any overfitting; per group, that shift is not counted. NaN when no
  group is present in both. > 0: overfitting.
  """
  xp = jnp if isinstance(train_group_accuracy, jax.Array) else np
  difference = xp.asarray(train_group_accuracy) - xp.asarray(eval_group_accuracy)
  both = ~xp.isnan(difference)
  count = both.sum(-1)
  total = xp.where(both, difference, 0.0).sum(-1)
  return xp.where(count > 0, total / xp.maximum(count, 1), xp.nan)


def pooled_generalization_gap(train_accuracy: Any, eval_accuracy: Any) -> Any:
  """Accuracy on the held training subset minus evaluation accuracy, groups pooled."""
  return train_accuracy - eval_accuracy


def robustness(accuracies: jax.Array) -> jax.Array:
  """Mean accuracy over the last axis [..., S]: one accuracy per `lighting.LIGHTING_SET` entry.

  The set is 5 kinds (brightness, contrast, gamma, exposure, temperature) × 5 severities = 25
  perturbations of the evaluation images; all perturbations count equally.
  """
  return jnp.mean(accuracies, axis=-1)


def robustness_by_kind(accuracies: jax.Array,
                       lighting_set: Sequence[tuple[str, int]] = lighting.LIGHTING_SET
                       ) -> dict[str, jax.Array]:
  """Mean accuracy per perturbation kind, from accuracies [..., S] ordered as lighting_set."""
  if accuracies.shape[-1] != len(lighting_set):
    raise ValueError(f"accuracies have {accuracies.shape[-1]} entries on the last axis but the "
                     f"lighting set has {len(lighting_set)}; give one accuracy per entry")
  kinds = [kind for kind, _ in lighting_set]
  return {kind: accuracies[..., np.asarray([k == kind for k in kinds])].mean(-1)
          for kind in dict.fromkeys(kinds)}


BOOTSTRAPPED = ("accuracy", "group_accuracy", "disparity", "worst_group_accuracy")
PAIRED = ("accuracy", "disparity", "worst_group_accuracy")


def _resampled(statistics: Callable[[jax.Array], dict[str, jax.Array]], size: int,
               key: jax.Array, level: jax.Array, num_resamples: int) -> dict[str, dict]:
  """{"estimate", "low", "high"} per statistic of example indices [n]: on all n examples, and
  the percentile interval over `num_resamples` resamples with replacement (from `key`; the
  same resamples for the same key and n, whatever the statistics)."""
  def resample(resample_key):
    return statistics(jax.random.randint(resample_key, (size,), 0, size))

  # Resamples run vmapped in chunks of about 4M gathered examples, bounding memory for large n.
  chunk = max(1, min(num_resamples, 2 ** 22 // size))
  draws = jax.lax.map(resample, jax.random.split(key, num_resamples), batch_size=chunk)
  quantiles = jnp.stack([(1 - level) / 2, (1 + level) / 2])
  bounds = jax.tree.map(lambda d: jnp.nanquantile(d, quantiles, axis=0), draws)
  estimate = statistics(jnp.arange(size))
  return {name: {"estimate": estimate[name], "low": bounds[name][0], "high": bounds[name][1]}
          for name in estimate}


@functools.partial(jax.jit, static_argnames=("num_classes", "num_groups", "num_resamples"))
def _bootstrap(predictions, labels, groups, key, level, *, num_classes, num_groups,
               num_resamples):
  """Intervals of `BOOTSTRAPPED` for predictions [n], or of the paired differences
  model 0 − model 1 of `PAIRED` for predictions [2, n]."""
  ones = jnp.ones(labels.shape, jnp.float32)

  def summary(model_predictions, indices):
    return summarize(_counts(model_predictions[indices], labels[indices], groups[indices], ones,
                             num_classes, num_groups))

  if predictions.ndim == 1:
    def statistics(indices):
      values = summary(predictions, indices)
      return {name: values[name] for name in BOOTSTRAPPED}
  else:
    def statistics(indices):
      first, second = summary(predictions[0], indices), summary(predictions[1], indices)
      return {name: first[name] - second[name] for name in PAIRED}
  return _resampled(statistics, labels.shape[0], key, level, num_resamples)


def _checked_bootstrap(predictions, labels, groups, num_classes, num_groups, key, num_resamples,
                       level) -> dict[str, dict[str, np.ndarray]]:
  """`_bootstrap` of host arrays after checking them."""
  _check_bootstrap_inputs(predictions, labels, groups, num_classes, num_groups, num_resamples,
                          level)
  out = _bootstrap(jnp.asarray(predictions, jnp.int32), jnp.asarray(labels, jnp.int32),
                   jnp.asarray(groups, jnp.int32), key, jnp.float32(level),
                   num_classes=num_classes, num_groups=num_groups, num_resamples=num_resamples)
  return jax.tree.map(np.asarray, out)


def _check_bootstrap_inputs(predictions, labels, groups, num_classes, num_groups, num_resamples,
                            level) -> None:
  if not predictions.shape[-1:] == labels.shape == groups.shape or labels.ndim != 1:
    raise ValueError(f"predictions {predictions.shape}, labels {labels.shape} and groups "
                     f"{groups.shape} must be [n] arrays of one length")
  if labels.size == 0:
    raise ValueError("the bootstrap needs at least one example, got none")
  for name, values, count in (("predictions", predictions, num_classes),
                              ("labels", labels, num_classes), ("groups", groups, num_groups)):
    if values.min() < 0 or values.max() >= count:
      raise ValueError(f"{name} range over {values.min()}..{values.max()}, outside "
                       f"0..{count - 1}; check num_classes / num_groups")
  if not 0 < level < 1 or num_resamples < 1:
    raise ValueError(f"level={level} must be in (0, 1) and num_resamples={num_resamples} >= 1")


def paired_bootstrap(predictions: Any, baseline_predictions: Any, labels: Any, groups: Any, *,
                     num_classes: int, num_groups: int, key: jax.Array,
                     num_resamples: int = 1000, level: float = 0.95
                     ) -> dict[str, dict[str, np.ndarray]]:
  """Paired percentile intervals of (model − baseline) for accuracy, disparity and worst-group
  accuracy: both models' metrics on each of the same resamples of the evaluation set.

  With the key of `bootstrap_intervals`, the resamples are those behind each model's own
  intervals. The difference's interval is what a claim "the model is fairer" needs: the two
  models' errors on shared examples are correlated, so separate intervals overlap far more
  than the uncertainty of the difference. Returns {name: {"estimate", "low", "high"}}.
  """
  predictions, baseline_predictions = np.asarray(predictions), np.asarray(baseline_predictions)
  labels, groups = np.asarray(labels), np.asarray(groups)
  if predictions.shape != baseline_predictions.shape or predictions.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} and {baseline_predictions.shape} must be "
                     f"[n] arrays of one length")
  return _checked_bootstrap(np.stack([predictions, baseline_predictions]), labels, groups,
                            num_classes, num_groups, key, num_resamples, level)


def bootstrap_intervals(predictions: Any, labels: Any, groups: Any, *, num_classes: int,
                        num_groups: int, key: jax.Array, num_resamples: int = 1000,
                        level: float = 0.95) -> dict[str, dict[str, np.ndarray]]:
  """Percentile bootstrap intervals of accuracy, group accuracy, disparity, worst group.

  Draws `num_resamples` evaluation sets of n examples with replacement (deterministic from
  `key`), computes the metrics on each (one jit, resamples vmapped) and returns, per metric,
  `{"estimate", "low", "high"}` as NumPy arrays ([G] for group_accuracy): the value on the
  full set and the (1 − level)/2 and (1 + level)/2 quantiles of the resampled values. A group
  absent from a resample has no accuracy there: its quantiles use the resamples that hold it,
  and that resample's disparity is taken over the groups it holds. A group absent from the
  full set gives NaN. Disparity, a range, is biased upward under resampling: its interval
  may lie above a point estimate near 0. Host-side: for final models and baselines only.
  """
  predictions, labels, groups = (np.asarray(a) for a in (predictions, labels, groups))
  if predictions.ndim != 1:
    raise ValueError(f"predictions {predictions.shape} must be an [n] array")
  return _checked_bootstrap(predictions, labels, groups, num_classes, num_groups, key,
                            num_resamples, level)


def _finite_or_none(value: Any) -> Any:
  if isinstance(value, list):
    return [_finite_or_none(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def to_python(tree: Any) -> Any:
  """A metrics tree (dicts, lists, arrays, dataclasses) as JSON-ready Python; NaN/±inf → None."""
  if isinstance(tree, Mapping):
    return {key: to_python(value) for key, value in tree.items()}
  if isinstance(tree, (list, tuple)):
    return [to_python(value) for value in tree]
  if tree is None or isinstance(tree, str):
    return tree
  if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
    return to_python({f.name: getattr(tree, f.name) for f in dataclasses.fields(tree)})
  value = np.asarray(tree)
  if value.dtype.kind not in "biuf":
    raise ValueError(f"to_python cannot convert a {type(tree).__name__} of dtype {value.dtype}; "
                     f"give numbers, arrays, dicts or lists")
  return _finite_or_none(value.tolist())
