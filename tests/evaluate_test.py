"""Tests of single-model evaluation: a NumPy loop on the same logits, hand-derived cases, costs.

Compiles: the tiny supernet's counting function and a reference forward; a ResNet-8's
counting function, PGD attack and a reference attack; the bootstrap and summaries.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import adversarial, costs, evaluate, export, loss, models
from moenas_jax.data import lighting, pipeline
from moenas_jax.search_space import Arch

NUM_CLASSES, NUM_GROUPS = 10, 2


def test_metrics_equal_a_numpy_loop_on_the_same_logits(tiny_supernet, examples):
  model, graphdef, params, state = tiny_supernet
  arch = model.search_space().sample(jax.random.key(3))  # a candidate of the supernet
  logits_of = jax.jit(lambda images: models.apply(graphdef, params, state, images, arch)[0])

  def accuracies(examples, kind=None, severity=0):
    """(accuracy, accuracy per group) from the logits of all examples at once, with NumPy."""
    images = examples["image"].astype(np.float32) / 255
    if kind is not None:
      images = lighting.perturb(images, kind, severity)
    correct = np.asarray(logits_of(images)).argmax(-1) == examples["label"]
    groups = examples["group"]
    return correct.mean(), np.array([correct[groups == g].mean() for g in range(NUM_GROUPS)])

  # 10 examples: the last batch of 8 is padded (and the bootstrap shares one compile below).
  evaluation, held = examples(0, 10), examples(1, 10)
  result = evaluate.evaluate(graphdef, params, state, evaluation, num_classes=NUM_CLASSES,
                             num_groups=NUM_GROUPS, batch_size=8, held_examples=held,
                             bootstrap_resamples=200, arch=arch)
  json.dumps(result, allow_nan=False)  # JSON-ready: plain Python, no NaN
  accuracy, groups = accuracies(evaluation)
  np.testing.assert_allclose(result["accuracy"], accuracy, atol=1e-6)
  np.testing.assert_allclose(result["group_accuracy"], groups, atol=1e-6)
  np.testing.assert_allclose(result["disparity"], groups.max() - groups.min(), atol=1e-6)
  np.testing.assert_allclose(result["worst_group_accuracy"], groups.min(), atol=1e-6)
  assert result["num_examples"] == 10
  assert result["group_count"] == np.bincount(evaluation["group"], minlength=2).tolist()
  per_entry = np.array([accuracies(evaluation, kind, s)[0] for kind, s in lighting.LIGHTING_SET])
  np.testing.assert_allclose(result["robustness"], per_entry.mean(), atol=1e-6)
  assert list(result["robustness_by_kind"]) == list(lighting.KINDS)
  for i, kind in enumerate(lighting.KINDS):  # 5 severities per kind, in LIGHTING_SET order
    np.testing.assert_allclose(result["robustness_by_kind"][kind],
                               per_entry[5 * i:5 * i + 5].mean(), atol=1e-6)
  train_accuracy, train_groups = accuracies(held)
  np.testing.assert_allclose(result["train_accuracy"], train_accuracy, atol=1e-6)
  # Group-fair: per group train − evaluation accuracy, averaged (both groups in both sets).
  np.testing.assert_allclose(result["generalization_gap"], np.mean(train_groups - groups),
                             atol=1e-6)
  np.testing.assert_allclose(result["pooled_generalization_gap"], train_accuracy - accuracy,
                             atol=1e-6)
  assert "adversarial_accuracy" not in result
  bootstrap = result["bootstrap"]
  assert set(bootstrap) == {"accuracy", "group_accuracy", "disparity", "worst_group_accuracy"}
  assert all(set(v) == {"estimate", "low", "high"} for v in bootstrap.values())
  np.testing.assert_allclose(bootstrap["accuracy"]["estimate"], accuracy, atol=1e-6)
  np.testing.assert_allclose(bootstrap["disparity"]["estimate"], result["disparity"], atol=1e-6)
  assert bootstrap["accuracy"]["low"] <= accuracy <= bootstrap["accuracy"]["high"]


@pytest.fixture(scope="module")
def resnet():
  """(graphdef, params, state) of a ResNet-8 (rbg key: its initialisers compile fast)."""
  model = models.build("resnet", rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
                       num_classes=NUM_CLASSES, image_size=(28, 28), depth=8,
                       width_multiplier=0.25)
  return models.split(model)


def test_hand_derived_metrics_of_a_constant_classifier_and_pgd(resnet, examples):
  graphdef, params, state = resnet
  # Head kernel 0 and bias e_3: every image, clean, dimmed or attacked, is predicted class 3.
  constant = jax.tree.map(jnp.array, params)
  head = nnx.to_pure_dict(params)
  head["head"] = {"kernel": np.zeros((16, NUM_CLASSES), np.float32),
                  "bias": np.eye(NUM_CLASSES, dtype=np.float32)[3]}
  nnx.replace_by_pure_dict(constant, head)
  data = {"image": examples(2, 10)["image"],
          "label": np.array([3, 3, 3, 1, 3, 0, 0, 0, 0, 2], np.int32),
          "group": np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1], np.int32)}
  evaluator = evaluate.Evaluator(graphdef, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS,
                                 batch_size=8, lighting_set=(("gamma", 3),),
                                 attack=adversarial.AttackSettings(steps=1))
  result = evaluator.evaluate(constant, state, data, held_examples=data,
                              bootstrap_resamples=200)
  # Group 0: 3 of 4 are class 3; group 1: 1 of 6.
  np.testing.assert_allclose(result["accuracy"], 0.4, atol=1e-6)
  np.testing.assert_allclose(result["group_accuracy"], [3 / 4, 1 / 6], atol=1e-6)
  np.testing.assert_allclose(result["disparity"], 3 / 4 - 1 / 6, atol=1e-6)
  # Class 3: TPR 1 in both groups, FPR 1 in both (every other example is called 3); the
  # other classes are never predicted: TPR 0 and FPR 0 wherever defined.
  assert result["equalized_odds_difference"] == 0.0
  np.testing.assert_allclose(result["robustness"], 0.4, atol=1e-6)
  np.testing.assert_allclose(result["robustness_by_kind"]["gamma"], 0.4, atol=1e-6)
  np.testing.assert_allclose(result["adversarial_accuracy"], 0.4, atol=1e-6)
  # The attack cannot move a constant classifier: its groups keep 3/4 and 1/6.
  np.testing.assert_allclose(result["adversarial_group_accuracy"], [3 / 4, 1 / 6], atol=1e-6)
  np.testing.assert_allclose(result["adversarial_disparity"], 3 / 4 - 1 / 6, atol=1e-6)
  assert result["generalization_gap"] == 0.0
  np.testing.assert_allclose(result["bootstrap"]["group_accuracy"]["estimate"], [3 / 4, 1 / 6],
                             atol=1e-6)

  # The real weights: the same attack as the docstring's, batch by batch.
  logits_of = jax.jit(lambda images: models.apply(graphdef, params, state, images)[0])

  @jax.jit
  def attacked_correct(batch, key):
    def attacked_loss(images):
      return (loss.cross_entropy(logits_of(images), batch["label"]) * batch["mask"]).sum()
    images = adversarial.pgd(attacked_loss, batch["image"], key=key,
                             settings=adversarial.AttackSettings(steps=1))
    return ((logits_of(images).argmax(-1) == batch["label"]) & batch["mask"]).sum()

  attack_key = jax.random.split(jax.random.key(5))[1]
  correct = sum(int(attacked_correct(batch, jax.random.fold_in(attack_key, b)))
                for b, batch in enumerate(pipeline.eval_batches(data, 8)))
  result = evaluator.evaluate(params, state, data, bootstrap_resamples=0, seed=5)
  np.testing.assert_allclose(result["adversarial_accuracy"], correct / 10, atol=1e-6)
  assert "bootstrap" not in result and "train_accuracy" not in result


def test_model_costs_of_a_standalone_candidate_match_the_search_space(tiny_supernet):
  model = tiny_supernet[0]
  space = model.search_space()
  dense = export.standalone(model, space.dense())  # one expert per layer: no capacity padding
  assert evaluate.model_costs(dense) == {"params": int(space.params(space.dense())),
                                         "macs": int(space.macs(space.dense()))}
  assert evaluate.model_costs(dense)["macs"] == _traced_macs(dense)

  # A found candidate whose layers pad. Tiny supernet: 16 tokens per image in every MoE layer,
  # (D, H) = (32, 64), (48, 96), (64, 128); base 142,589 params and 2,851,232 MACs.
  arch = Arch(np.array([3, 2, 3], np.int32), np.array([2, 1, 1], np.int32))
  # Params: n · (2DH + H + D) + D · n per layer: 12,672 + 18,816 + 49,920.
  # MACs: 16 tokens · (k · 2DH + D · n + k · D) per layer: 133,632 + 149,760 + 266,240.
  expected = {"params": 142_589 + 12_672 + 18_816 + 49_920,
              "macs": 2_851_232 + 133_632 + 149_760 + 266_240}
  assert expected == {"params": int(space.params(arch)), "macs": int(space.macs(arch))}
  standalone = export.standalone(model, arch)
  assert evaluate.model_costs(standalone) == expected
  assert evaluate.model_costs(model) == {"params": int(space.params(space.largest())),
                                         "macs": int(space.macs(space.largest()))}
  # What the standalone computes also fills its capacity padding (eval capacity factor 2):
  # n blocks of ceil(16 · k · 2 / n) slots for the 16 · k choices: 66 − 32, 32 − 16 and
  # 33 − 16 empty slots of 2 · D · H MACs each, which model_costs leaves out.
  padding = 34 * 2 * 32 * 64 + 16 * 2 * 48 * 96 + 17 * 2 * 64 * 128
  assert _traced_macs(standalone) == expected["macs"] + padding == expected["macs"] + 565_248


def _traced_macs(model):
  graphdef, params, state = models.split(model)
  image = jax.ShapeDtypeStruct((1, *model.input_shape), jnp.float32)
  return costs.count_macs(lambda p, s, x: models.apply(graphdef, p, s, x)[0], params, state,
                          image)


def test_model_costs_of_a_dense_family_are_traced():
  model = nnx.eval_shape(lambda: models.build("resnet", rngs=nnx.Rngs(0), num_classes=10,
                                              image_size=(28, 28)))
  assert not hasattr(model, "search_space")
  assert evaluate.model_costs(model) == {"params": costs.count_params(model),
                                         "macs": _traced_macs(model)}


def test_bad_arguments_are_refused_before_any_compile(tiny_supernet, examples):
  graphdef = tiny_supernet[1]
  with pytest.raises(ValueError, match="unknown lighting kinds \\['glare'\\]"):
    evaluate.Evaluator(graphdef, num_classes=10, num_groups=2, batch_size=8,
                       lighting_set=(("glare", 1),))
  evaluator = evaluate.Evaluator(graphdef, num_classes=10, num_groups=2, batch_size=8)
  with pytest.raises(ValueError, match="at least one example"):
    evaluator.evaluate(None, None, jax.tree.map(lambda v: v[:0], examples(0, 1)))
