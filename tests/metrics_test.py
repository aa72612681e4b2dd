"""Tests of the metrics: hand-counted cells, the disparity family, PGD, bootstrap, JSON."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moenas_jax import metrics
from moenas_jax.data import lighting

NAN = np.nan


def _logits(predictions, num_classes):
  return jax.nn.one_hot(jnp.asarray(predictions), num_classes)


def test_counts_and_summary_by_hand():
  # N = 3 classes, G = 3 groups (group 2 has no examples); the last example is masked.
  labels = jnp.array([0, 0, 1, 2, 1, 0, 2, 1])
  groups = jnp.array([0, 0, 0, 0, 1, 1, 1, 0])
  predictions = jnp.array([0, 1, 1, 2, 0, 0, 2, 2])
  mask = jnp.array([True] * 7 + [False])
  counts = metrics.batch_counts(_logits(predictions, 3), labels, groups, mask, num_groups=3)
  # Group 0: 0→0 ✓, 0→1 ✗, 1→1 ✓, 2→2 ✓.  Group 1: 1→0 ✗, 0→0 ✓, 2→2 ✓.
  np.testing.assert_array_equal(counts.count, [[2, 1, 0], [1, 1, 0], [1, 1, 0]])
  np.testing.assert_array_equal(counts.correct, [[1, 1, 0], [1, 0, 0], [1, 1, 0]])
  # Predicted as n per group: group 0 predicts 0, 1, 1, 2; group 1 predicts 0, 0, 2.
  np.testing.assert_array_equal(counts.predicted, [[1, 2, 0], [2, 0, 0], [1, 1, 0]])
  s = metrics.summarize(counts)
  np.testing.assert_allclose(s["accuracy"], 5 / 7, rtol=1e-6)
  np.testing.assert_array_equal(s["num_examples"], 7)
  np.testing.assert_allclose(s["group_accuracy"], [3 / 4, 2 / 3, NAN], rtol=1e-6)
  np.testing.assert_array_equal(s["group_count"], [4, 3, 0])
  np.testing.assert_allclose(s["disparity"], 3 / 4 - 2 / 3, rtol=1e-5)
  np.testing.assert_allclose(s["worst_group_accuracy"], 2 / 3, rtol=1e-6)
  np.testing.assert_allclose(s["group_accuracy_std"], 1 / 24, rtol=1e-5)  # ±1/24 around 17/24
  np.testing.assert_allclose(s["cell_accuracy"], [[0.5, 1, NAN], [1, 0, NAN], [1, 1, NAN]])
  np.testing.assert_array_equal(s["worst_cell_accuracy"], 0)
  # Class 0: TPR 0.5 vs 1, FPR 0/2 vs 1/2 → 0.5. Class 1: TPR 1 vs 0 → 1. Class 2: 0.
  np.testing.assert_allclose(s["equalized_odds_difference"], 1.0)


def _binary(positives, true_positives, negatives, false_positives):
  """Labels and predictions of one group with the given confusion counts."""
  labels = [1] * positives + [0] * negatives
  predictions = ([1] * true_positives + [0] * (positives - true_positives)
                 + [1] * false_positives + [0] * (negatives - false_positives))
  return labels, predictions


@pytest.mark.parametrize("group_1, expected", [
    # Group 0: TPR 3/4, FPR 2/6. Group 1 (2 of 5, 1 of 5): TPR gap 0.35 > FPR gap 2/15.
    ((5, 2, 5, 1), 0.35),
    # Group 1 (3 of 5, 0 of 5): TPR gap 0.15 < FPR gap 1/3.
    ((5, 3, 5, 0), 1 / 3),
])
def test_equalized_odds_matches_the_binary_textbook_definition(group_1, expected):
  labels_0, predictions_0 = _binary(4, 3, 6, 2)
  labels_1, predictions_1 = _binary(*group_1)
  labels = np.array(labels_0 + labels_1)
  predictions = np.array(predictions_0 + predictions_1)
  groups = np.array([0] * 10 + [1] * 10)
  # Textbook: max(|TPR_0 − TPR_1|, |FPR_0 − FPR_1|) of the positive class, here in NumPy.
  rates = [[predictions[(groups == g) & (labels == y)].mean() for g in (0, 1)] for y in (1, 0)]
  textbook = max(abs(a - b) for a, b in rates)
  np.testing.assert_allclose(textbook, expected, rtol=1e-6)
  counts = metrics.batch_counts(_logits(predictions, 2), jnp.asarray(labels),
                                jnp.asarray(groups), None, num_groups=2)
  np.testing.assert_allclose(metrics.summarize(counts)["equalized_odds_difference"], expected,
                             rtol=1e-5)


def test_one_group_and_no_examples():
  counts = metrics.batch_counts(_logits([0, 1, 1], 2), jnp.array([0, 1, 0]),
                                jnp.array([1, 1, 1]), None, num_groups=2)
  s = metrics.summarize(counts)
  np.testing.assert_allclose(s["group_accuracy"], [NAN, 2 / 3], rtol=1e-6)
  for name in ("disparity", "group_accuracy_std", "equalized_odds_difference"):
    np.testing.assert_array_equal(s[name], 0.0)
  with pytest.raises(ValueError, match="num_classes=3 but the logits have 2 classes"):
    metrics.batch_counts(_logits([0], 2), jnp.array([0]), jnp.array([0]), None, num_groups=1,
                         num_classes=3)
  empty = metrics.summarize(metrics.Counts.zeros(2, 2))
  for name in ("accuracy", "disparity", "worst_group_accuracy", "group_accuracy_std",
               "equalized_odds_difference", "worst_cell_accuracy"):
    assert np.isnan(empty[name]), name


def test_population_under_jit_and_vmap_accumulates_over_batches():
  # P = 3 candidates, two batches of B = 6, N = 4, G = 2.
  keys = jax.random.split(jax.random.key(0), 3)
  logits = jax.random.normal(keys[0], (2, 3, 6, 4))  # [batch, P, B, N]
  labels = jax.random.randint(keys[1], (2, 6), 0, 4)
  groups = jax.random.randint(keys[2], (2, 6), 0, 2)
  mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])

  @jax.jit
  def evaluate(logits):  # [batch, P, B, N] → summaries with a leading P
    def candidate(candidate_logits):  # [batch, B, N]
      counts = metrics.Counts.zeros(4, 2)
      for i in range(2):
        counts = counts + metrics.batch_counts(candidate_logits[i], labels[i], groups[i],
                                               mask[i], num_groups=2)
      return metrics.summarize(counts), counts
    return jax.vmap(candidate)(jnp.swapaxes(logits, 0, 1))

  summaries, counts = evaluate(logits)
  chex.assert_shape(counts.correct, (3, 4, 2))
  chex.assert_shape(summaries["cell_accuracy"], (3, 4, 2))
  # summarize also takes stacked counts [P, N, G] directly.
  chex.assert_trees_all_close(metrics.summarize(counts), summaries)
  # One candidate, both batches flattened into one: the same counts.
  flat = metrics.batch_counts(logits[:, 1].reshape(12, 4), labels.ravel(), groups.ravel(),
                              mask.ravel(), num_groups=2)
  chex.assert_trees_all_close(jax.tree.map(lambda c: c[1], counts), flat)
  predictions = np.asarray(logits[:, 1].argmax(-1))[np.asarray(mask)]
  np.testing.assert_allclose(summaries["accuracy"][1],
                             (predictions == np.asarray(labels)[np.asarray(mask)]).mean(),
                             rtol=1e-6)


def test_group_fair_gap_does_not_count_a_shift_of_group_shares():
  # Training 95% group 0, evaluation 50/50, the same group accuracies 0.9 and 0.5 in both:
  # no overfitting. Pooled: 0.95 · 0.9 + 0.05 · 0.5 = 0.88 against 0.7, a "gap" of 0.18.
  np.testing.assert_allclose(metrics.generalization_gap(np.array([0.9, 0.5]),
                                                        np.array([0.9, 0.5])), 0.0)
  np.testing.assert_allclose(metrics.pooled_generalization_gap(0.88, 0.7), 0.18)
  # Per group (0.1 + 0.3) / 2 = 0.2; a group empty in either split is left out: 0.1.
  np.testing.assert_allclose(
      metrics.generalization_gap(jnp.array([[0.9, 0.7], [0.9, NAN]]),
                                 jnp.array([[0.8, 0.4], [0.8, 0.5]])), [0.2, 0.1], rtol=1e-5)
  assert np.isnan(metrics.generalization_gap(np.array([NAN, 0.9]), np.array([0.5, NAN])))


def test_gap_and_robustness():
  np.testing.assert_allclose(metrics.pooled_generalization_gap(jnp.array([0.9, 0.7]),
                                                               jnp.array([0.8, 0.75])),
                             [0.1, -0.05], rtol=1e-5)
  # Accuracy 0.1 · kind index + 0.01 · severity: per kind 0.1 · k + 0.03, overall 0.23.
  kinds = list(lighting.KINDS)
  accuracies = jnp.array([[0.1 * kinds.index(kind) + 0.01 * severity
                           for kind, severity in lighting.LIGHTING_SET]] * 2)  # [P=2, S=25]
  np.testing.assert_allclose(metrics.robustness(accuracies), [0.23, 0.23], rtol=1e-5)
  by_kind = metrics.robustness_by_kind(accuracies)
  assert list(by_kind) == kinds
  for k, kind in enumerate(kinds):
    np.testing.assert_allclose(by_kind[kind], [0.1 * k + 0.03] * 2, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="24 entries on the last axis but the lighting set has 25"):
    metrics.robustness_by_kind(accuracies[:, :24])


def _bootstrap(predictions, labels, groups, key=0):
  return metrics.bootstrap_intervals(predictions, labels, groups, num_classes=2, num_groups=3,
                                     key=jax.random.key(key))


def test_bootstrap_intervals():
  # n = 400, N = 2, G = 3 with group 2 empty; both cases share one compile.
  labels = np.arange(400) % 2
  groups = (np.arange(400) >= 200).astype(int)
  perfect = _bootstrap(labels, labels, groups)
  for name, value in (("accuracy", 1.0), ("disparity", 0.0), ("worst_group_accuracy", 1.0)):
    for field in ("estimate", "low", "high"):
      np.testing.assert_array_equal(perfect[name][field], value)
  np.testing.assert_array_equal(perfect["group_accuracy"]["low"], [1, 1, NAN])
  # Half right (every other pair): a binomial proportion at 0.5, standard error 0.025, so
  # the 95% interval is about 2 · 1.96 · 0.025 ≈ 0.098 wide; per group (n = 200) ≈ 0.139.
  half = np.where(np.arange(400) % 4 < 2, labels, 1 - labels)
  out = _bootstrap(half, labels, groups)
  np.testing.assert_allclose(out["accuracy"]["estimate"], 0.5)
  low, high = out["accuracy"]["low"], out["accuracy"]["high"]
  assert low < 0.5 < high
  np.testing.assert_allclose(high - low, 0.098, atol=0.012)
  widths = out["group_accuracy"]["high"] - out["group_accuracy"]["low"]
  np.testing.assert_allclose(widths[:2], 0.139, atol=0.02)
  assert np.isnan(widths[2]) and np.isnan(out["group_accuracy"]["estimate"][2])
  assert 0 <= out["disparity"]["low"] < out["disparity"]["high"] < 0.2
  chex.assert_trees_all_equal(_bootstrap(half, labels, groups), out)  # deterministic in key
  assert _bootstrap(half, labels, groups, key=1)["accuracy"]["low"] != low


def test_paired_bootstrap_of_two_models_on_the_same_resamples():
  labels = np.arange(400) % 2
  groups = (np.arange(400) >= 200).astype(int)
  model = np.where(np.arange(400) % 4 < 2, labels, 1 - labels)  # half right in each group
  # The baseline is wrong on 20 more examples, all in group 1 (of the model's right ones).
  worse = model.copy()
  extra = np.flatnonzero((model == labels) & (groups == 1))[:20]
  worse[extra] = 1 - labels[extra]
  paired = metrics.paired_bootstrap(model, worse, labels, groups, num_classes=2, num_groups=3,
                                    key=jax.random.key(0))
  # Accuracy +20/400; group 1 of the baseline 80/200 = 0.4 against 0.5: disparity
  # 0 − 0.1, worst group 0.5 − 0.4.
  np.testing.assert_allclose(paired["accuracy"]["estimate"], 0.05, atol=1e-6)
  np.testing.assert_allclose(paired["disparity"]["estimate"], -0.1, atol=1e-6)
  np.testing.assert_allclose(paired["worst_group_accuracy"]["estimate"], 0.1, atol=1e-6)
  # Per resample the accuracy difference is (draws of the 20) / 400: mean 0.05, sd
  # sqrt(400 · 0.05 · 0.95) / 400 ≈ 0.0109, so the 95% interval ≈ [0.029, 0.071].
  low, high = paired["accuracy"]["low"], paired["accuracy"]["high"]
  np.testing.assert_allclose([low, high], [0.029, 0.071], atol=0.008)
  # Separate intervals are each about 0.098 wide (see above): far wider than the paired one.
  separate = [_bootstrap(p, labels, groups)["accuracy"] for p in (model, worse)]
  assert high - low < 0.5 * sum(i["high"] - i["low"] for i in separate)
  # Disparity, a range, stays noisy under resampling (the model's is |a_0 − a_1| ≈ 0 ± 0.07).
  assert paired["disparity"]["low"] < -0.1 < paired["disparity"]["high"]
  assert paired["worst_group_accuracy"]["low"] > 0
  same = metrics.paired_bootstrap(model, model, labels, groups, num_classes=2, num_groups=3,
                                  key=jax.random.key(0))
  for name in metrics.PAIRED:
    for field in ("estimate", "low", "high"):
      np.testing.assert_array_equal(same[name][field], 0.0)
  with pytest.raises(ValueError, match=r"must be \[n\] arrays of one length"):
    metrics.paired_bootstrap(model, worse[:10], labels, groups, num_classes=2, num_groups=3,
                             key=jax.random.key(0))


def test_bootstrap_checks_its_inputs():
  with pytest.raises(ValueError, match=r"groups range over 0..3, outside 0..2"):
    _bootstrap(np.zeros(4, int), np.zeros(4, int), np.arange(4))
  with pytest.raises(ValueError, match=r"must be \[n\] arrays of one length"):
    _bootstrap(np.zeros(4, int), np.zeros(3, int), np.zeros(4, int))


def test_to_python_is_json_ready():
  summary = {"accuracy": jnp.float32(0.5), "group_accuracy": jnp.array([0.25, jnp.nan]),
             "group_count": np.array([3, 0]), "nested": [np.float64(np.inf), 2, None, "x"],
             "counts": metrics.Counts.zeros(1, 2)}
  out = metrics.to_python(summary)
  assert out == {"accuracy": 0.5, "group_accuracy": [0.25, None], "group_count": [3, 0],
                 "nested": [None, 2, None, "x"],
                 "counts": {"correct": [[0.0, 0.0]], "count": [[0.0, 0.0]],
                            "predicted": [[0.0, 0.0]]}}
  assert json.loads(json.dumps(out, allow_nan=False)) == out
  with pytest.raises(ValueError, match="cannot convert a ndarray of dtype <U1"):
    metrics.to_python(np.array(["a"]))
