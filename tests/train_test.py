"""Tests of standalone training: loss decreases, bit-exact resume, NaN stops, new heads.

A ResNet-8 at half width (a dense baseline) trains on 256 images of the embedded dataset. The
file compiles a training step twice: one Trainer shared by the tests, and finetune's new head.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import models, train
from moenas_jax.checkpoint import Checkpointer
from moenas_jax.compilation import count_compilations
from moenas_jax.data import fashion_tones, pipeline

RESNET = {"num_classes": 10, "image_size": (28, 28), "depth": 8, "width_multiplier": 0.5}
# 256 examples / 32 = 8 steps per epoch, 24 in all, the first 2 warming up.
SETTINGS = train.TrainSettings(epochs=3, batch_size=32, learning_rate=1e-2, warmup_fraction=0.1)


@pytest.fixture(scope="module")
def resnet():
  """(model, graphdef, params, state) of the ResNet-8, seed 0.

  Initialised from an "rbg" key: XLA:CPU compiles its initialisers about 5x faster than the
  default threefry ones (8 s instead of 40 s for this model on a busy 2-core CPU).
  """
  model = models.build("resnet", rngs=nnx.Rngs(jax.random.key(0, impl="rbg")), **RESNET)
  return model, *models.split(model)


@pytest.fixture(scope="module")
def examples():
  return pipeline.held_train_subset(fashion_tones.load("train"), 256, seed=0)


@pytest.fixture(scope="module")
def trainer(resnet, examples):
  return train.Trainer(resnet[1], SETTINGS, len(examples["label"]))


@pytest.fixture(scope="module")
def uninterrupted(resnet, examples, trainer):
  """(params, state, history, compilations) of 3 epochs in one call."""
  _, _, params, state = resnet
  with count_compilations() as seen:
    result = trainer.fit(params, state, examples, seed=0)
  return *result, seen


def test_settings_give_the_optimizer_schedule_and_refuse_bad_values():
  optimizer = SETTINGS.optimizer(steps_per_epoch=8)
  assert (optimizer.total_steps, optimizer.warmup_steps) == (24, 2)  # round(0.1 * 24)
  assert optimizer.learning_rate == 1e-2
  with pytest.raises(ValueError, match="warmup_fraction=1.5"):
    train.TrainSettings(warmup_fraction=1.5)
  with pytest.raises(ValueError, match="epochs=0"):
    train.TrainSettings(epochs=0)


def test_training_lowers_the_loss_with_one_compile(uninterrupted):
  _, _, history, seen = uninterrupted
  assert seen.of("train_step") == 1
  assert [h["epoch"] for h in history] == [1, 2, 3]
  assert set(history[0]) == {"epoch", "loss", "cross_entropy", "aux_loss", "accuracy",
                             "grad_norm"}
  assert all(h["aux_loss"] == 0.0 for h in history)  # a dense model has no routing loss
  # Chance level is ln(10) = 2.30 and 10% accuracy; the third epoch is clearly better.
  assert history[0]["loss"] > 1.8
  assert history[-1]["loss"] < history[0]["loss"] - 0.4
  assert history[-1]["accuracy"] > history[0]["accuracy"] + 0.15


def test_resumed_training_equals_uninterrupted_training_bit_for_bit(
    resnet, examples, uninterrupted, trainer, tmp_path):
  _, _, params, state = resnet
  expected_params, expected_state, expected_history, _ = uninterrupted

  class Interrupted(Exception):
    pass

  def crash_after_the_first_epoch(line):
    if line.startswith("[train] epoch 1/3"):
      raise Interrupted

  lines = []
  with count_compilations() as seen:  # restored weights reuse the compiled step
    with Checkpointer(tmp_path) as ckpt:
      with pytest.raises(Interrupted):
        trainer.fit(params, state, examples, seed=0, checkpointer=ckpt,
                    log=crash_after_the_first_epoch)
      assert ckpt.steps() == [8]  # steps done: one epoch of 8
    with Checkpointer(tmp_path) as ckpt:  # as in a new process: everything from disk
      resumed_params, resumed_state, history = trainer.fit(params, state, examples, seed=0,
                                                           checkpointer=ckpt, log=lines.append)
      assert ckpt.steps() == [16, 24]
  assert seen.of("train_step") == 0
  assert lines[0].startswith("[train] resumed at step 8/24 (epoch 1) from ")
  assert [line.split(":")[0] for line in lines[1:]] == ["[train] epoch 2/3", "[train] epoch 3/3"]
  chex.assert_trees_all_equal((resumed_params, resumed_state), (expected_params, expected_state))
  assert history == expected_history

  with Checkpointer(tmp_path) as ckpt:
    # A finished run returns its result without training; another seed is another run.
    again = trainer.fit(params, state, examples, seed=0, checkpointer=ckpt, log=lines.append)
    chex.assert_trees_all_equal(again[0], expected_params)
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
      trainer.fit(params, state, examples, seed=1, checkpointer=ckpt)


def test_a_nan_loss_stops_training_naming_the_step(resnet, examples, trainer, tmp_path):
  _, _, params, state = resnet
  # Epoch 0's order puts example order[40] in its second batch (positions 32..63): step 1.
  images = examples["image"].astype(np.float32)
  images[pipeline.epoch_order(256, seed=0, epoch=0)[40]] = np.nan
  with Checkpointer(tmp_path) as ckpt:
    # Step 1's loss or (on XLA:CPU, whose relu maps NaN to 0) its gradient norm is NaN.
    with pytest.raises(FloatingPointError, match=r"is nan at step 1\b"):
      trainer.fit(params, state, {**examples, "image": images}, seed=0, checkpointer=ckpt)
    assert ckpt.latest_step() is None  # the failed epoch is not saved
  with pytest.raises(ValueError, match="made for 256 examples, got 255"):
    trainer.fit(params, state, jax.tree.map(lambda v: v[:255], examples), seed=0)
  with pytest.raises(ValueError, match="batch_size=32 must be in 1..16"):
    train.Trainer(resnet[1], SETTINGS, 16)


def test_replace_head_keeps_the_other_weights_of_every_family(resnet):
  model = resnet[0]
  new = train.replace_head(model, 4, rngs=nnx.Rngs(1))
  assert new.head.kernel.shape == (32, 4)  # 64 channels x 0.5
  assert new.config == {**model.config, "num_classes": 4}
  assert model.head.kernel.shape == (32, 10) and model.config["num_classes"] == 10
  def keep(m):
    return nnx.state(m, nnx.Not(nnx.PathContains("head")))
  chex.assert_trees_all_equal(keep(new), keep(model))
  graphdef, params, state = models.split(new)
  logits = jax.eval_shape(lambda: models.apply(graphdef, params, state,
                                               jnp.zeros((2, 28, 28, 3)))[0])
  assert logits.shape == (2, 4)
  for name, config in (("mobilenet_v2", {"width_multiplier": 0.35}),
                       ("mobilevit_v2", {"width_multiplier": 0.25, "max_experts": 2})):
    abstract = nnx.eval_shape(lambda name=name, config=config: train.replace_head(
        models.build(name, rngs=nnx.Rngs(0), num_classes=10, **config), 3,
        rngs=nnx.Rngs(1)))
    assert abstract.head.out_features == 3 and abstract.config["num_classes"] == 3
  with pytest.raises(TypeError, match="head"):
    train.replace_head(model.head, 4, rngs=nnx.Rngs(1))


def test_finetune_trains_every_weight_of_a_copy_with_a_new_head(resnet, examples):
  model = resnet[0]
  before = jax.tree.map(np.array, nnx.state(model))
  four = {**examples, "label": examples["label"] % 4}  # a 4-class task: the class modulo 4
  settings = train.TrainSettings(epochs=3, batch_size=64, learning_rate=1e-2)
  tuned, history = train.finetune(model, four, num_classes=4, settings=settings, seed=0)
  assert tuned.head.out_features == 4
  chex.assert_trees_all_equal(nnx.state(model), before)  # the model given is untouched
  assert not np.array_equal(tuned.stem.conv.kernel[...], model.stem.conv.kernel[...])
  assert [h["epoch"] for h in history] == [1, 2, 3]
  assert history[-1]["loss"] < history[0]["loss"] - 0.1
