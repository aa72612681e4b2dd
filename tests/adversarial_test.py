"""Tests of the attacks and adversarial training (PGD-AT, TRADES, AdvMoE's alternation).

A tiny MoE of our own stands in for a conv MoE: a linear image router on the flattened image
picks one of two linear expert heads with a straight-through one-hot (argmax forward, the
softmax's gradient backward), after a batch norm (so the state is threaded); it returns
`aux["router_logits"]` as the model contract asks.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moenas_jax import adversarial, loss, models, objectives, train
from moenas_jax.checkpoint import Checkpointer
from moenas_jax.compilation import count_compilations

PIXELS, CLASSES, EXPERTS = 2 * 2 * 1, 3, 2


class TinyMoE(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.norm = nnx.BatchNorm(PIXELS, rngs=rngs)
    self.router = nnx.Linear(PIXELS, EXPERTS, rngs=rngs)
    self.experts = nnx.Linear(PIXELS, EXPERTS * CLASSES, rngs=rngs)
    self.config = {"num_classes": CLASSES}

  def __call__(self, images, arch=None, *, train, key=None):
    x = images.reshape(images.shape[0], -1)
    scores = self.router(x)  # [B, E]
    soft = jax.nn.softmax(scores)
    gate = jax.nn.one_hot(scores.argmax(-1), EXPERTS) + soft - jax.lax.stop_gradient(soft)
    heads = self.experts(self.norm(x, use_running_average=not train))
    logits = jnp.einsum("be,ben->bn", gate, heads.reshape(-1, EXPERTS, CLASSES))
    return logits, {"aux_loss": jnp.zeros(()), "router_logits": scores}


class TinyDense(nnx.Module):
  def __init__(self, *, rngs: nnx.Rngs):
    self.head = nnx.Linear(PIXELS, CLASSES, rngs=rngs)

  def __call__(self, images, arch=None, *, train, key=None):
    return self.head(images.reshape(images.shape[0], -1)), {"aux_loss": jnp.zeros(())}


def _batch(size=8, seed=0):
  images = jax.random.uniform(jax.random.key(seed), (size, 2, 2, 1))
  return {"image": images, "label": jnp.arange(size) % CLASSES, "group": jnp.arange(size) % 2}


def _examples(size=16):
  batch = _batch(size)
  return {name: np.asarray(values) for name, values in batch.items()}


@pytest.fixture(scope="module")
def tiny():
  return models.split(TinyMoE(rngs=nnx.Rngs(0)))


def test_settings_refuse_bad_attacks_naming_the_value():
  with pytest.raises(ValueError, match="epsilon=-0.1"):
    adversarial.AttackSettings(epsilon=-0.1)
  with pytest.raises(ValueError, match="step_size=0.5 is larger than epsilon=0.1"):
    adversarial.AttackSettings(epsilon=0.1, step_size=0.5)
  with pytest.raises(ValueError, match="'trades' needs steps >= 1"):
    adversarial.AdversarialSettings(method="trades", steps=0)
  with pytest.raises(ValueError, match="unknown adversarial method 'fgsm'"):
    adversarial.AdversarialSettings(method="fgsm")
  with pytest.raises(ValueError, match="beta=-1"):
    adversarial.AdversarialSettings(beta=-1)
  assert adversarial.AdversarialSettings(steps=0).attack.steps == 0  # clean training: allowed


WEIGHTS = jnp.array([[1.0, -1.0], [-2.0, 0.5], [0.5, 2.0], [0.0, -1.0]])


def _ce(images, labels):
  logits = images.reshape(images.shape[0], -1) @ WEIGHTS
  return loss.cross_entropy(logits, labels).mean()


def test_pgd_one_step_of_epsilon_from_the_images_reaches_the_optimal_corner():
  # d loss / d x = p_other · (w_other − w_label) / B: its sign never changes, so one step of ε
  # from the images lands on x + ε · sign(w_other − w_label), clipped to [0, 1].
  images = jnp.array([[0.3, 0.5, 0.7, 0.4], [1.0, 0.0, 0.5, 0.5]]).reshape(2, 2, 2, 1)
  labels = jnp.array([0, 1])
  settings = adversarial.AttackSettings(epsilon=0.1, step_size=0.1, steps=1, random_start=False)
  attacked = adversarial.pgd(lambda x: _ce(x, labels), images, key=jax.random.key(3),
                             settings=settings)
  # Example 0 moves by [−, +, +, −]; example 1 by [+, −, −, +], its 1.0 and 0.0 pixels stay.
  expected = [[0.2, 0.6, 0.8, 0.3], [1.0, 0.0, 0.4, 0.6]]
  np.testing.assert_allclose(np.asarray(attacked).reshape(2, 4), expected, atol=1e-6)


def test_pgd_increases_the_loss_within_the_ball_and_jits():
  images = jax.random.uniform(jax.random.key(0), (8, 2, 2, 1))
  labels = jax.random.randint(jax.random.key(1), (8,), 0, 2)
  settings = adversarial.AttackSettings()
  attack = jax.jit(lambda key: adversarial.pgd(lambda x: _ce(x, labels), images, key=key,
                                               settings=settings))
  attacked = attack(jax.random.key(2))
  distance = np.abs(np.asarray(attacked - images))
  assert distance.max() <= 8 / 255 + 1e-6 and distance.max() > 7 / 255
  assert float(attacked.min()) >= 0 and float(attacked.max()) <= 1
  assert float(_ce(attacked, labels)) > float(_ce(images, labels)) + 0.01
  np.testing.assert_array_equal(attack(jax.random.key(2)), attacked)
  start = adversarial.pgd(lambda x: _ce(x, labels), images, key=jax.random.key(2),
                          settings=adversarial.AttackSettings(steps=0))
  assert 0 < np.abs(np.asarray(start - images)).max() <= 8 / 255 + 1e-6


def test_kl_divergence_by_hand():
  # Reference softmax [3/4, 1/4] against [1/2, 1/2]: 3/4 log(3/2) + 1/4 log(1/2).
  kl = adversarial.kl_divergence(jnp.zeros((1, 2)), jnp.log(jnp.array([[3.0, 1.0]])))
  np.testing.assert_allclose(kl, [0.75 * np.log(1.5) + 0.25 * np.log(0.5)], rtol=1e-6)


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_no_ball_gives_the_clean_loss_and_a_ball_a_larger_one(tiny, method):
  graphdef, params, state = tiny
  batch, key = _batch(), jax.random.key(1)
  clean, _, _, clean_state = loss.terms(graphdef, params, state, batch)
  flat = adversarial.AdversarialSettings(method=method, epsilon=0.0, step_size=0.0)
  losses, aux, _, new_state = loss.adversarial_terms(graphdef, params, state, batch, key=key,
                                                     settings=flat)
  np.testing.assert_allclose(losses, clean, rtol=1e-6)  # x_adv = x: KL 0, CE(x_adv) = CE(x)
  assert float(aux) == 0.0
  # TRADES forwards twice (clean, then adversarial): batch norm moves one more momentum step.
  steps = 1 if method == "pgd_at" else 2
  mean = np.asarray(batch["image"]).reshape(8, -1).mean(0)
  np.testing.assert_allclose(new_state["norm"]["mean"][...], (1 - 0.99 ** steps) * mean,
                             rtol=1e-5)
  assert not np.allclose(clean_state["norm"]["mean"][...], 0)
  ball = adversarial.AdversarialSettings(method=method, epsilon=0.3, step_size=0.1, steps=3)
  losses, *_ = loss.adversarial_terms(graphdef, params, state, batch, key=key, settings=ball)
  assert float(losses.mean()) > float(clean.mean()) + 1e-3


def test_robust_losses_go_through_the_fairness_objective(tiny):
  graphdef, params, state = tiny
  batch = _batch()
  settings = adversarial.AdversarialSettings(method="trades", epsilon=0.3, step_size=0.1)
  # Training-split counts 2 and 6: weights 8 / (2 · 2) = 2 and 8 / (2 · 6) = 2/3.
  objective = objectives.Objective(objectives.ObjectiveSettings("group_balanced"), CLASSES, 2,
                                   [2, 6])

  def terms_fn(params):
    return loss.adversarial_terms(graphdef, params, state, batch, key=jax.random.key(0),
                                  settings=settings)

  losses = terms_fn(params)[0]
  _, _, _, logs = loss.update(optax.sgd(0.0), objective, terms_fn, params,
                              (optax.sgd(0.0).init(params), objective.init()), batch)
  weights = np.where(np.asarray(batch["group"]) == 0, 2.0, 2 / 3)
  np.testing.assert_allclose(logs["loss"], np.mean(weights * np.asarray(losses)), rtol=1e-6)


def test_router_labels_and_the_alternating_optimizers_freeze_the_other_part(tiny):
  graphdef, params, _ = tiny
  labels = loss.router_labels(params)
  assert labels["router"]["kernel"].get_value() == "router"
  assert labels["experts"]["kernel"].get_value() == "backbone"
  assert loss.has_router(params)
  assert not loss.has_router(models.split(TinyDense(rngs=nnx.Rngs(0)))[1])
  backbone_opt, router_opt = loss.alternating(optax.adam(0.1))
  grads = jax.tree.map(jnp.ones_like, params)
  for optimizer, moving in ((backbone_opt, "experts"), (router_opt, "router")):
    opt_state = optimizer.init(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    frozen = "router" if moving == "experts" else "experts"
    np.testing.assert_array_equal(updates[frozen]["kernel"][...], 0.0)
    # Adam's first step moves each weight by the learning rate against the gradient's sign.
    np.testing.assert_allclose(updates[moving]["kernel"][...], -0.1, rtol=1e-5)
    # The frozen part has no moments at all.
    moments = {str(path) for path, _ in jax.tree_util.tree_leaves_with_path(opt_state)}
    assert not any(f"'{frozen}'" in path for path in moments), moments


def test_advmoe_step_is_a_backbone_step_then_a_router_step(tiny):
  graphdef, params, state = tiny
  batch, key = _batch(), jax.random.key(4)
  settings = adversarial.AdversarialSettings(method="advmoe", epsilon=0.3, step_size=0.1)
  optimizers = loss.alternating(optax.adam(0.05))
  objective = objectives.Objective.erm()
  opt_state = (tuple(o.init(params) for o in optimizers), objective.init())
  new_params, _, ((backbone_state, router_state), _), logs = loss.advmoe_update(
      optimizers, objective, graphdef, params, state, opt_state, batch, key, settings)
  # The backbone equals one TRADES step of the backbone optimizer alone (the router step does
  # not touch it); the router moved in the second step only.
  backbone_key, _ = jax.random.split(key)
  alone, *_ = loss.update(optimizers[0], objective, lambda p: loss.adversarial_terms(
      graphdef, p, state, batch, key=backbone_key, settings=settings), params,
      (opt_state[0][0], opt_state[1]), batch)
  chex.assert_trees_all_close(new_params["experts"], alone["experts"], rtol=1e-6)
  np.testing.assert_array_equal(alone["router"]["kernel"][...],
                                params["router"]["kernel"][...])
  assert not np.allclose(new_params["router"]["kernel"][...], params["router"]["kernel"][...])
  assert set(logs) >= {"loss", "router_loss", "router_accuracy", "grad_norm"}


SETTINGS = dict(epochs=2, batch_size=8, learning_rate=0.05, warmup_fraction=0.0)


def test_advmoe_training_compiles_once_and_resumes_bit_for_bit(tiny, tmp_path):
  graphdef, params, state = tiny
  examples = _examples()
  settings = train.TrainSettings(**SETTINGS, adversarial=adversarial.AdversarialSettings(
      method="advmoe", epsilon=0.3, step_size=0.1))
  trainer = train.Trainer(graphdef, settings, len(examples["label"]))
  with count_compilations() as seen:
    expected = trainer.fit(params, state, examples, seed=0)
  assert seen.of("train_step") == 1
  history = expected[2]
  assert [h["epoch"] for h in history] == [1, 2] and np.isfinite(history[-1]["router_loss"])

  class Interrupted(Exception):
    pass

  def crash_after_the_first_epoch(line):
    if line.startswith("[train] epoch 1/2"):
      raise Interrupted

  with count_compilations() as seen:  # two optimizer states restored: the same step
    with Checkpointer(tmp_path) as ckpt:
      with pytest.raises(Interrupted):
        trainer.fit(params, state, examples, seed=0, checkpointer=ckpt,
                    log=crash_after_the_first_epoch)
    with Checkpointer(tmp_path) as ckpt:
      resumed = trainer.fit(params, state, examples, seed=0, checkpointer=ckpt)
  assert seen.of("train_step") == 0
  chex.assert_trees_all_equal(resumed[:2], expected[:2])
  assert resumed[2] == history


def test_advmoe_on_a_model_without_a_router_fails_before_compiling():
  graphdef, params, state = models.split(TinyDense(rngs=nnx.Rngs(0)))
  settings = train.TrainSettings(**SETTINGS, adversarial=adversarial.AdversarialSettings(
      method="advmoe"))
  trainer = train.Trainer(graphdef, settings, 16)
  with count_compilations() as seen, pytest.raises(ValueError, match="no top-level 'router'"):
    trainer.fit(params, state, _examples(), seed=0)
  assert seen.of("train_step") == 0


@pytest.mark.parametrize("method", ["pgd_at", "trades"])
def test_adversarial_training_under_group_dro_compiles_one_step(tiny, method):
  graphdef, params, state = tiny
  examples = _examples()
  objective = objectives.Objective(objectives.ObjectiveSettings("group_dro", dro_step_size=1.0),
                                   CLASSES, 2, [8, 8])
  settings = train.TrainSettings(**SETTINGS, adversarial=adversarial.AdversarialSettings(
      method, epsilon=0.3, step_size=0.1))
  trainer = train.Trainer(graphdef, settings, len(examples["label"]), objective)
  with count_compilations() as seen:
    _, _, history = trainer.fit(params, state, examples, seed=0)
  assert seen.of("train_step") == 1
  assert [h["epoch"] for h in history] == [1, 2]
  assert all(np.isfinite(h["loss"]) and h["loss"] > 0 for h in history)
