"""Tests of the population evaluator: equals a per-candidate loop, compiles once, shards."""

import json
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from flax import nnx

from configs import smoke
from moenas_jax import adversarial, evaluate, models, population, reward, search_space, settings
from moenas_jax.compilation import count_compilations
from moenas_jax.data import lighting
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import search as search_stage

NUM_CLASSES, NUM_GROUPS = 10, 2


def test_population_metrics_equal_a_per_candidate_loop_and_compile_once(tiny_supernet, examples):
  model, graphdef, params, state = tiny_supernet
  logits_of = jax.jit(lambda arch, images: models.apply(graphdef, params, state, images, arch)[0])

  def loop_accuracy(arch, examples, kind=None, severity=0):
    """Accuracy and per-group accuracy of one candidate, with NumPy."""
    images = examples["image"].astype(np.float32) / 255
    if kind is not None:
      images = lighting.perturb(images, kind, severity)
    correct = np.asarray(logits_of(arch, images)).argmax(-1) == examples["label"]
    groups = examples["group"]
    return correct.mean(), np.array([correct[groups == g].mean() for g in range(NUM_GROUPS)])

  space = model.search_space()
  evaluation, held = examples(0, 21), examples(1, 21)  # 21: the last batch of 8 is padded
  lighting_set = (("gamma", 3), ("contrast", 5))
  evaluator = population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES,
                                             num_groups=NUM_GROUPS, batch_size=8,
                                             lighting_set=lighting_set)
  first = space.sample_population(jax.random.key(1), 4)
  second = space.sample_population(jax.random.key(2), 4)
  with count_compilations() as seen:
    results = evaluator.evaluate(params, state, first, evaluation, held)
    evaluator.evaluate(params, state, second, evaluation, held)
  assert seen.of("population_counts") == 1
  assert results["accuracy"].shape == (4,)
  assert results["group_accuracy"].shape == (4, NUM_GROUPS)
  for p, arch in enumerate(search_space.unstack(first)):
    accuracy, groups = loop_accuracy(arch, evaluation)
    np.testing.assert_allclose(results["accuracy"][p], accuracy, atol=1e-6)
    np.testing.assert_allclose(results["group_accuracy"][p], groups, atol=1e-6)
    np.testing.assert_allclose(results["disparity"][p], groups.max() - groups.min(), atol=1e-6)
    robust = np.mean([loop_accuracy(arch, evaluation, kind, s)[0] for kind, s in lighting_set])
    np.testing.assert_allclose(results["robustness"][p], robust, atol=1e-6)
    train_accuracy, train_groups = loop_accuracy(arch, held)
    # Group-fair: the mean over groups of (train − evaluation) group accuracy.
    np.testing.assert_allclose(results["generalization_gap"][p], np.mean(train_groups - groups),
                               atol=1e-6)
    np.testing.assert_allclose(results["pooled_generalization_gap"][p],
                               train_accuracy - accuracy, atol=1e-6)


def test_recalibration_gives_each_candidate_the_mean_of_its_batch_statistics(tiny_supernet,
                                                                             examples):
  model, graphdef, params, state = tiny_supernet
  space = model.search_space()
  images = (examples(3, 24)["image"].astype(np.float32) / 255).reshape(3, 8, 28, 28, 3)
  evaluator = population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES,
                                             num_groups=NUM_GROUPS, batch_size=8,
                                             lighting_set=(), chunk_size=2,
                                             recalibration_images=images)
  archs = space.sample_population(jax.random.key(4), 3)  # chunks of 2: one padded candidate
  evaluation = examples(5, 16)
  with count_compilations() as seen:
    recalibrated = evaluator.recalibrate(params, state, archs)
    results = evaluator.evaluate(params, state, archs, evaluation)
    evaluator.evaluate(params, state, space.sample_population(jax.random.key(6), 3), evaluation)
  assert seen.of("bn_recalibrate") == 1 and seen.of("population_counts") == 1
  chex.assert_tree_shape_prefix(recalibrated, (3,))
  # The stem's batch norm, by hand: the mean over the 3 batches of its conv's batch mean.
  stem = nnx.merge(graphdef, params, state).stem.conv
  expected_mean = np.mean([np.asarray(stem(batch)).mean((0, 1, 2)) for batch in images], 0)
  for p in range(3):
    np.testing.assert_allclose(recalibrated["stem"]["norm"]["mean"][...][p], expected_mean,
                               rtol=1e-4, atol=1e-5)
  statistics = jax.jit(lambda images, arch: models.batch_statistics(graphdef, params, state,
                                                                    images, arch))
  single = evaluate.Evaluator(graphdef, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS,
                              batch_size=8, lighting_set=())
  for p, arch in enumerate(search_space.unstack(archs)):
    own = jax.tree.map(lambda *v: np.mean(v, 0), *[statistics(batch, arch) for batch in images])
    chex.assert_trees_all_close(jax.tree.map(lambda v, p=p: v[p], recalibrated), own,
                                rtol=1e-4, atol=1e-5)
    # Scored with its own statistics: what one model with that state scores.
    own_result = single.evaluate(params, own, evaluation, arch=arch, bootstrap_resamples=0)
    np.testing.assert_allclose(results["accuracy"][p], own_result["accuracy"], atol=1e-6)
  with pytest.raises(ValueError, match="no recalibration_images"):
    population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS,
                                   batch_size=8).recalibrate(params, state, archs)
  with pytest.raises(ValueError, match="a standalone model .* has its own batch-norm state"):
    evaluator.evaluate(params, state, None, evaluation)
  with pytest.raises(ValueError, match=r"recalibration_images must be \[NB, B, H, W, C\]"):
    population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES, num_groups=NUM_GROUPS,
                                   batch_size=8, recalibration_images=images[0])


def test_attacks_and_predictions_of_a_population_equal_the_test_evaluator_at_p_1(
    tiny_supernet, examples):
  """PGD vmapped over candidates (one key), per-perturbation accuracies and predictions: each
  candidate's equal what `evaluate.Evaluator` (the same evaluator at P = 1) gives it."""
  model, graphdef, params, state = tiny_supernet
  archs = model.search_space().sample_population(jax.random.key(8), 2)
  evaluation = examples(2, 12)  # the last batch of 8 is padded
  lighting_set = (("brightness", 5), ("gamma", 5))
  settings = dict(num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, batch_size=8,
                  lighting_set=lighting_set,
                  attack=adversarial.AttackSettings(steps=1))
  attack_key = jax.random.split(jax.random.key(4))[1]  # the test evaluator's, seed 4
  scores = population.PopulationEvaluator(graphdef, **settings).evaluate(
      params, state, archs, evaluation, attack_key=attack_key, with_predictions=True)
  assert scores["perturbation_accuracy"].shape == (2, 2)
  assert scores["predictions"].shape == (2, 12)
  single = evaluate.Evaluator(graphdef, **settings)
  for p, arch in enumerate(search_space.unstack(archs)):
    result, predictions = single.evaluate(params, state, evaluation, arch=arch, seed=4,
                                          bootstrap_resamples=0, with_predictions=True)
    np.testing.assert_array_equal(scores["predictions"][p], predictions)
    np.testing.assert_allclose(scores["accuracy"][p], np.mean(
        predictions == evaluation["label"]), atol=1e-6)
    for name in ("accuracy", "adversarial_accuracy", "robustness"):
      np.testing.assert_allclose(scores[name][p], result[name], atol=1e-6)
    np.testing.assert_allclose(scores["perturbation_accuracy"][p],
                               list(result["robustness_by_kind"].values()), atol=1e-6)
    # Summed counts over equal-size perturbed copies: robustness is their mean accuracy.
    np.testing.assert_allclose(result["robustness"],
                               np.mean(scores["perturbation_accuracy"][p]), atol=1e-6)
  with pytest.raises(ValueError, match="needs attack_key"):
    single.population.evaluate(params, state, None, evaluation)


def test_padding_candidates_repeats_the_last_one():
  arch = search_space.Arch(np.arange(6).reshape(3, 2), np.ones((3, 2), np.int32))
  padded = population.pad_candidates(arch, 4)
  np.testing.assert_array_equal(padded.num_experts, [[0, 1], [2, 3], [4, 5], [4, 5]])
  assert population.pad_candidates(arch, 3).num_experts.shape == (3, 2)


@pytest.mark.parametrize("size, chunk_size, shards, expected", [
    (32, 8, 1, (4, 32)),  # 4 chunks of 8
    (20, 8, 1, (3, 21)),  # ceil(20 / 8) = 3 chunks of ceil(20 / 3) = 7: one padded candidate
    (12, 8, 1, (2, 12)),  # 2 chunks of 6, not 8 + 4 padded
    (6, None, 4, (1, 8)),  # one chunk, padded to the 4 'pop' shards
    (32, 8, 4, (4, 32)),  # chunks of 8 = 2 per shard
    (8, 3, 4, (2, 8)),  # a chunk holds at least one candidate per shard
])
def test_chunking_pads_the_fewest_candidates(size, chunk_size, shards, expected):
  assert population.chunking(size, chunk_size, shards) == expected


def test_chunked_vmap_equals_vmap_in_candidate_order():
  def fn(weights, x, arch):
    return {"y": weights * x + arch, "z": arch[None] * 2}

  weights, x, archs = np.float32(3), np.arange(4, dtype=np.float32), np.arange(6.0)
  expected = jax.vmap(fn, in_axes=(None, None, 0))(weights, x, archs)
  chunked = population.chunked_vmap(fn, 3, (None, None, 0))(weights, x, archs)
  chex.assert_trees_all_close(chunked, expected)
  chex.assert_shape(chunked["y"], (6, 4))


def test_chunked_evaluator_equals_one_vmap_and_compiles_once(tiny_supernet, examples):
  _, graphdef, params, state = tiny_supernet
  settings = dict(num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, batch_size=8,
                  lighting_set=(("gamma", 3),))
  archs = tiny_supernet[0].search_space().sample_population(jax.random.key(4), 5)
  data = (examples(0, 16), examples(1, 8))
  whole = population.PopulationEvaluator(graphdef, **settings).evaluate(params, state, archs,
                                                                        *data)
  chunked = population.PopulationEvaluator(graphdef, chunk_size=2, **settings)
  with count_compilations() as seen:
    results = chunked.evaluate(params, state, archs, *data)  # 3 chunks of 2, one padded
  assert seen.of("population_counts") == 1
  assert results["accuracy"].shape == (5,)
  chex.assert_trees_all_close(results, whole, atol=1e-6)


def test_bad_settings_are_refused(tiny_supernet):
  _, graphdef, _, _ = tiny_supernet
  with pytest.raises(ValueError, match="unknown lighting kinds \\['fog'\\]"):
    population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES, num_groups=2, batch_size=8,
                                   lighting_set=(("fog", 1),))
  with pytest.raises(ValueError, match="data_parallel=3 must divide the 2 devices"):
    population.make_mesh(jax.devices() * 2, data_parallel=3)
  with pytest.raises(ValueError, match="chunk_size=0 must be positive"):
    population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES, num_groups=2, batch_size=8,
                                   chunk_size=0)


_SHARDED_SCRIPT = """
import json, jax, numpy as np
from flax import nnx
from moenas_jax import models, population
from tests.conftest import TINY_SUPERNET, random_examples
from tests.population_test import NUM_CLASSES, NUM_GROUPS
assert jax.device_count() == 8, jax.devices()
model = models.build("mobilevit_v2", rngs=nnx.Rngs(0), **TINY_SUPERNET)
graphdef, params, state = models.split(model)
archs = model.search_space().sample_population(jax.random.key(3), 6)  # 6: padded to 8
settings = dict(num_classes=NUM_CLASSES, num_groups=NUM_GROUPS, batch_size=8,
                lighting_set=(("brightness", 2),))
data = (random_examples(0, 21), random_examples(1, 10))
mesh = population.make_mesh(data_parallel=2)  # 'pop' 4 x 'data' 2
# 6 candidates, padded to 8: one vmap of 8 (2 per device) and 2 chunks of 4 (1 per device).
sharded = population.PopulationEvaluator(graphdef, mesh=mesh, **settings)
chunked = population.PopulationEvaluator(graphdef, mesh=mesh, chunk_size=4, **settings)
single = population.PopulationEvaluator(graphdef, **settings)
results = [each.evaluate(params, state, archs, *data) for each in (sharded, chunked, single)]
out = {name: [result[name].tolist() for result in results]
       for name in ("accuracy", "group_accuracy", "robustness", "generalization_gap")}
print(json.dumps(out))
"""


def test_sharded_over_8_devices_equals_one_device():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  env = dict(os.environ, XLA_FLAGS=flags.strip(), PYTHONPATH=root, JAX_PLATFORMS="cpu")
  done = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  results = json.loads(done.stdout.strip().splitlines()[-1])
  for name, (sharded, chunked, single) in results.items():
    assert np.shape(sharded)[0] == np.shape(chunked)[0] == 6, name
    np.testing.assert_allclose(sharded, single, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(chunked, single, atol=1e-6, err_msg=name)


def test_the_search_scores_pgd_accuracy_of_p_candidates_in_one_compile_for_the_reward(
    tiny_supernet, examples, tmp_path):
  """config.search.pgd_steps → the search's evaluator attacks the P candidates in one
  compiled call per batch shape; config.reward.terms weighs adversarial_accuracy."""
  model, graphdef, params, state = tiny_supernet
  space = model.search_space()
  config = smoke.get_config()
  config.data.eval_batch_size = 8
  config.search.update(bn_batches=0, pgd_steps=1, lighting_severities=(5,))
  config.reward.terms = {"adversarial_accuracy": {"weight": 0.3}}
  settings.check(config, tmp_path / "data")
  evaluation = examples(3, 16)
  data = data_stage.Data(train=examples(4, 16), held=examples(1, 8), search=evaluation,
                         robust=evaluation, test=evaluation, class_names=[str(n) for n in
                                                                          range(NUM_CLASSES)],
                         group_names=["a", "b"], image_shape=(28, 28, 3))
  evaluator = search_stage.population_evaluator(config, graphdef, data)
  assert evaluator.attack == adversarial.AttackSettings(steps=1)  # ε 8/255, steps of 2/255
  score = search_stage.candidate_scorer(config, evaluator, params, state, space, data)
  with count_compilations() as seen:
    for cycle in range(2):
      archs = space.sample_population(jax.random.key(cycle), 3)
      records = score(archs, np.arange(3), cycle)
  assert seen.of("adversarial_counts") == 1
  metrics = {name: np.array([record["metrics"][name] for record in records])
             for name in ("adversarial_accuracy", "adversarial_disparity")}
  assert np.all((metrics["adversarial_accuracy"] >= 0) & (metrics["adversarial_accuracy"] <= 1))
  # The reward is the default one plus 0.3 · adversarial accuracy.
  plain = reward.spec_from_config({**config.reward.to_dict(), "terms": {}})
  for record in records:
    np.testing.assert_allclose(
        record["reward"] - float(plain.reward(record["metrics"])),
        0.3 * record["metrics"]["adversarial_accuracy"], atol=1e-6)
