"""Tests of proxy fine-tuning: vmapped equals alone, one compile, learns, wiring into the search."""

import jax
import numpy as np
import pytest

from configs import smoke
from moenas_jax import candidate_log, population, proxy, search_space, settings
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import search as search_stage
from moenas_jax.compilation import count_compilations
from moenas_jax.data import fashion_tones, pipeline

SETTINGS = proxy.ProxySettings(steps=4, batch_size=16, learning_rate=0.05)


@pytest.fixture(scope="module")
def tuner(tiny_supernet):
  return proxy.ProxyTuner(tiny_supernet[1], SETTINGS)


@pytest.fixture(scope="module")
def train_examples():
  return fashion_tones.load("train")


def _close(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5), a, b)


def test_vmapped_tuning_equals_each_candidate_alone_and_compiles_once(tiny_supernet, tuner,
                                                                      train_examples):
  model, _, params, state = tiny_supernet
  space = model.search_space()
  first = space.sample_population(jax.random.key(1), 3)
  second = space.sample_population(jax.random.key(2), 3)
  with count_compilations() as seen:
    tuned_params, tuned_state, logs = tuner.tune(params, state, first, train_examples,
                                                 jax.random.key(0))
    tuner.tune(params, state, second, train_examples, jax.random.key(5))
  assert seen.of("proxy_step") == 1 and seen.of("proxy_init") == 1
  assert logs["loss"].shape == (SETTINGS.steps, 3)
  leaf = jax.tree.leaves(tuned_params)[0]
  assert leaf.shape == (3, *jax.tree.leaves(params)[0].shape)
  for p, arch in enumerate(search_space.unstack(first)):
    alone = tuner.tune(params, state, search_space.stack([arch]), train_examples,
                       jax.random.key(0))
    _close(jax.tree.map(lambda v, p=p: v[p:p + 1], (tuned_params, tuned_state)), alone[:2])
    np.testing.assert_allclose(alone[2]["loss"][:, 0], logs["loss"][:, p], rtol=1e-5)
  # The copies moved away from the shared weights, each in its own way.
  moved = np.asarray(tuned_params["head"]["kernel"]) - params["head"]["kernel"]
  assert np.abs(moved).max() > 5e-4  # measured: 1.5e-3
  assert np.abs(moved[0] - moved[1]).max() > 5e-4  # measured: 1.2e-3


def test_tuning_lowers_each_candidates_training_loss(tiny_supernet, tuner, train_examples):
  model, _, params, state = tiny_supernet
  archs = model.search_space().sample_population(jax.random.key(3), 3)
  # 16 examples, batches of 16: every step sees the same images, so the loss must fall.
  few = pipeline.held_train_subset(train_examples, 16, seed=0)
  _, _, logs = tuner.tune(params, state, archs, few, jax.random.key(0))
  assert np.all(logs["loss"][0] > 2.2)  # about ln(10) = 2.30 at initialisation
  assert np.all(np.diff(logs["loss"], axis=0) < 0)
  assert np.all(logs["loss"][-1] < logs["loss"][0] - 0.5)  # measured: 0.75 to 0.77 lower
  assert np.all(logs["accuracy"][-1] > logs["accuracy"][0] + 0.4)  # measured: 0.69 to 0.88


def test_zero_steps_give_the_shared_weights_stacked(tiny_supernet, examples):
  model, graphdef, params, state = tiny_supernet
  archs = model.search_space().sample_population(jax.random.key(4), 2)
  tuner = proxy.ProxyTuner(graphdef, proxy.ProxySettings(steps=0, batch_size=8))
  tuned_params, tuned_state, logs = tuner.tune(params, state, archs, examples(0, 8),
                                               jax.random.key(0))
  assert logs["loss"].shape == (0, 2)
  for p in range(2):
    jax.tree.map(np.testing.assert_array_equal,
                 jax.tree.map(lambda v, p=p: v[p], (tuned_params, tuned_state)), (params, state))


def test_bad_settings_and_a_non_finite_loss_are_refused(tiny_supernet, tuner, examples):
  model, _, params, state = tiny_supernet
  with pytest.raises(ValueError, match="steps >= 0 and batch_size >= 1, got steps=-1"):
    proxy.ProxySettings(steps=-1)
  with pytest.raises(ValueError, match="batch_size=0"):
    proxy.ProxySettings(batch_size=0)
  with pytest.raises(ValueError, match="learning_rate must be positive, got 0"):
    proxy.ProxySettings(learning_rate=0)
  archs = model.search_space().sample_population(jax.random.key(0), 1)
  with pytest.raises(ValueError, match="batch_size=16 must be in 1..8"):
    tuner.tune(params, state, archs, examples(0, 8), jax.random.key(0))
  poisoned = jax.tree.map(np.array, params)
  poisoned["head"]["bias"][3] = np.nan
  with pytest.raises(FloatingPointError,
                     match="loss is nan, gradient norm nan, at step 0 \\(candidate 0\\)"):
    tuner.tune(poisoned, state, archs, examples(0, 16), jax.random.key(0))
  # A NaN pixel: the gradient norm is not finite even where the loss may be.
  images = examples(0, 16)
  images["image"] = images["image"].astype(np.float32)
  images["image"][3, 5, 5, 0] = np.nan
  with pytest.raises(FloatingPointError, match="gradient norm nan, at step 0"):
    tuner.tune(params, state, archs, images, jax.random.key(0))


def test_a_search_scores_proxy_tuned_candidates_and_resumes_exactly(tiny_supernet, examples,
                                                                    train_examples, tmp_path):
  model, graphdef, params, state = tiny_supernet
  space = model.search_space()
  config = smoke.get_config()
  config.data.eval_batch_size = 8
  # ERM and the shared batch-norm statistics: the scores are the tuned copies' alone.
  config.supernet.objective.name = "erm"
  config.search.update(candidates=6, population_size=4, tournament_size=2, batch_size=3,
                       bn_batches=0, proxy_steps=SETTINGS.steps,
                       proxy_batch_size=SETTINGS.batch_size,
                       proxy_learning_rate=SETTINGS.learning_rate)
  settings.check(config, tmp_path / "data")
  evaluation = pipeline.held_train_subset(fashion_tones.load("validation"), 24, seed=0)
  data = data_stage.Data(train=train_examples, held=examples(1, 8), search=evaluation,
                     robust=evaluation, test=evaluation, class_names=fashion_tones.CLASS_NAMES,
                     group_names=fashion_tones.GROUP_NAMES, image_shape=(28, 28, 3))

  def run(workdir, candidates):
    config.search.candidates = candidates
    search_stage.run_controller(config, graphdef, params, state, space, data, workdir, log=print)
    return candidate_log.read(workdir / "results" / "candidates.jsonl")

  straight = run(tmp_path / "straight", 6)
  run(tmp_path / "resumed", 3)  # stopped after the first cycle, then resumed
  assert run(tmp_path / "resumed", 6) == straight
  # The first cycle's candidates were scored on weights tuned with the documented key.
  first = [record for record in straight if record["cycle"] == 0]
  archs = search_space.stack([search_space.from_json(record["arch"]) for record in first])
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), 0)
  tuned_params, tuned_state, _ = proxy.ProxyTuner(graphdef, SETTINGS).tune(
      params, state, archs, train_examples, key)
  evaluator = population.PopulationEvaluator(graphdef, num_classes=10, num_groups=2,
                                             batch_size=8, lighting_set=(),
                                             per_candidate_weights=True)
  expected = evaluator.evaluate(tuned_params, tuned_state, archs, evaluation)["accuracy"]
  np.testing.assert_allclose([record["metrics"]["accuracy"] for record in first], expected,
                             atol=1e-6)
  stacked = jax.tree.map(lambda v: np.broadcast_to(v, (len(first), *v.shape)), (params, state))
  shared = evaluator.evaluate(*stacked, archs, evaluation)["accuracy"]
  assert not np.allclose(shared, expected)
