"""Tests of supernet training: sandwich rule, averaged statistics, one compile, loss decreases."""

import jax
import numpy as np
import pytest
from flax import nnx

from moenas_jax import models, supernet
from moenas_jax.compilation import count_compilations
from moenas_jax.data import fashion_tones, pipeline

TINY = dict(num_classes=3, image_size=(8, 8), channels=3, width_multiplier=0.25,
            depths=(1, 1, 1), strides=(1, 2, 1, 2, 1, 1), max_experts=3, max_top_k=2)


def _tiny():
  model = models.build("mobilevit_v2", rngs=nnx.Rngs(0), **TINY)
  return model.search_space(), *models.split(model)


def test_sandwich_holds_the_largest_the_smallest_and_random_candidates():
  space, *_ = _tiny()
  archs = supernet.sandwich(space, jax.random.key(0), 5)
  space.validate(archs)
  np.testing.assert_array_equal(archs.num_experts[0], space.max_experts)
  np.testing.assert_array_equal(archs.top_k[0], space.max_top_k)
  np.testing.assert_array_equal(archs.num_experts[1], 1)
  np.testing.assert_array_equal(archs.top_k[1], 1)
  assert archs.num_experts.shape == (5, 3)
  assert supernet.sandwich(space, jax.random.key(0), 2).num_experts.shape == (2, 3)


def test_a_step_averages_batch_statistics_over_candidates_and_is_deterministic():
  space, graphdef, params, state = _tiny()
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((4, 8, 8, 3), np.float32),
           "label": np.array([0, 1, 2, 1], np.int32), "group": np.zeros(4, np.int32)}
  expected = [models.apply(graphdef, params, state, batch["image"], arch, train=True)[1]
              for arch in (space.largest(), space.dense())]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *expected)
  trainer = supernet.SupernetTrainer(graphdef, space, archs_per_step=2,
                                     optimizer=supernet.OptimizerSettings(warmup_steps=2, total_steps=10))
  copy = lambda tree: jax.tree.map(np.array, tree)  # the step donates its inputs
  runs = []
  with count_compilations() as seen:
    for _ in range(2):
      p, s = copy(params), copy(state)
      o = trainer.init(p)
      for step in range(2):
        p, s, o, logs = trainer.step(p, s, o, batch, jax.random.key(step))
        if step == 0:
          first_state = copy(s)
      runs.append((copy(p), logs))
  assert seen.of("supernet_step") == 1
  chex_close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree.map(chex_close, first_state, expected)
  jax.tree.map(np.testing.assert_array_equal, runs[0][0], runs[1][0])
  assert set(runs[0][1]) >= {"loss", "cross_entropy", "aux_loss", "accuracy_largest"}


def test_supernet_loss_decreases_on_the_embedded_dataset():
  train = fashion_tones.load("train")
  model = models.build("mobilevit_v2", rngs=nnx.Rngs(0), num_classes=10, image_size=(28, 28),
                       channels=3, width_multiplier=0.25, depths=(1, 1, 1),
                       strides=(2, 1, 2, 2, 1, 1), max_experts=4, max_top_k=2)
  graphdef, params, state = models.split(model)
  trainer = supernet.SupernetTrainer(
      graphdef, model.search_space(), archs_per_step=3,
      optimizer=supernet.OptimizerSettings(learning_rate=3e-3, warmup_steps=5, total_steps=40))
  opt_state = trainer.init(params)
  losses = []
  for step, batch in zip(range(40), pipeline.train_batches(train, 64, seed=0, epoch=0)):
    params, state, opt_state, logs = trainer.step(params, state, opt_state, batch,
                                                  jax.random.key(step))
    supernet.check_finite(logs, step)
    losses.append(float(logs["loss"]))
  # Chance level is ln(10) = 2.30; the last steps must be clearly below the first ones.
  assert np.mean(losses[:5]) > 2.1
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5


def test_bad_settings_and_a_nan_loss_are_refused():
  space, graphdef, _, _ = _tiny()
  with pytest.raises(ValueError, match="archs_per_step=1"):
    supernet.SupernetTrainer(graphdef, space, archs_per_step=1,
                             optimizer=supernet.OptimizerSettings())
  with pytest.raises(ValueError, match="warmup_steps=20"):
    supernet.OptimizerSettings(warmup_steps=20, total_steps=10)
  with pytest.raises(FloatingPointError, match="at step 7"):
    supernet.check_finite({"loss": np.float32("nan")}, 7)
