"""L∞ attacks (PGD) and the settings of adversarial training.

`pgd` is the one projected-gradient attack of the project: the evaluators' adversarial
accuracy (cross-entropy of the whole model, the router included: an MoE is attacked end to
end) and the attacks of adversarial training (`loss.adversarial_terms`), which maximise the
cross-entropy (PGD-AT, Madry et al. 2018) or a KL divergence from the clean outputs (TRADES,
Zhang et al. 2019; AdvMoE, Zhang et al. 2023, adds the router's). Pure JAX: it jits and
vmaps over candidates.

`AdversarialSettings` choose the training method:
- `none`: clean training;
- `pgd_at`: the cross-entropy of PGD examples;
- `trades`: CE(x) + β · KL(f(x) ‖ f(x_adv)) per example, x_adv maximising the KL;
- `advmoe`: AdvMoE's alternation, per batch a TRADES step of the backbone (the router fixed;
  the attack maximises the model's KL plus the router's) and then a router step on fresh
  adversarial examples, CE(router(x), y mod E) + α · KL(router(x) ‖ router(x_adv)), the
  backbone fixed; router and backbone have separate optimizer states.
The per-example losses go through the training objective (ERM, group balanced, group DRO).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

METHODS = ("none", "pgd_at", "trades", "advmoe")


@dataclasses.dataclass(frozen=True)
class AttackSettings:
  """An L∞ PGD attack: `steps` of `step_size` within the ε-ball (defaults: CIFAR's PGD-10).

  `random_start`: start from a uniform point of the ball (else from the images; a KL attack
  needs the random start, its gradient is 0 at the images).
  """

  epsilon: float = 8 / 255
  step_size: float = 2 / 255
  steps: int = 10
  random_start: bool = True

  def __post_init__(self):
    if not (self.epsilon >= 0 and self.step_size >= 0 and self.steps >= 0):
      raise ValueError(f"attack epsilon={self.epsilon}, step_size={self.step_size}, "
                       f"steps={self.steps}: each must be >= 0 (e.g. 8/255, 2/255, 10)")
    if self.step_size > self.epsilon:
      raise ValueError(f"attack step_size={self.step_size} is larger than epsilon="
                       f"{self.epsilon}: one step would leave the ball; use at most epsilon "
                       f"(e.g. epsilon / 4)")


@dataclasses.dataclass(frozen=True)
class AdversarialSettings:
  """The training method (`METHODS`), its attack and its weights (AdvMoE's defaults).

  `beta` weighs the model's KL (TRADES, AdvMoE), `alpha` the router's KL (AdvMoE).
  """

  method: str = "none"
  epsilon: float = 8 / 255
  step_size: float = 5 / 255
  steps: int = 2
  random_start: bool = True
  beta: float = 6.0
  alpha: float = 6.0

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"unknown adversarial method {self.method!r}; use one of "
                       f"{', '.join(METHODS)}")
    attack = self.attack  # checks the attack's numbers
    if self.method != "none" and attack.steps < 1:
      raise ValueError(f"adversarial method {self.method!r} needs steps >= 1 (got "
                       f"{attack.steps}): with no attack step it trains on clean images; use "
                       f"e.g. 2, or method 'none'")
    if not (self.beta >= 0 and self.alpha >= 0):
      raise ValueError(f"beta={self.beta} and alpha={self.alpha} must be >= 0 (e.g. 6.0)")

  @property
  def attack(self) -> AttackSettings:
    return AttackSettings(self.epsilon, self.step_size, self.steps, self.random_start)


def pgd(loss_fn: Callable[[jax.Array], jax.Array], images: jax.Array, *, key: jax.Array,
        settings: AttackSettings) -> jax.Array:
  """L∞ projected gradient ascent on `loss_fn(images) -> scalar`.

  From the images (or a uniform point of the ε-ball, from `key`), `steps` times a move by
  `step_size` · sign(gradient) and a projection back onto the ball ∩ [0, 1]. Returns images
  of the same shape, with no gradient flowing back through the attack.
  """
  epsilon = settings.epsilon
  low, high = jnp.clip(images - epsilon, 0.0, 1.0), jnp.clip(images + epsilon, 0.0, 1.0)
  start = images
  if settings.random_start:
    start = jnp.clip(images + jax.random.uniform(key, images.shape, images.dtype, -epsilon,
                                                 epsilon), low, high)
  grad = jax.grad(loss_fn)

  def step(_, adversarial):
    return jnp.clip(adversarial + settings.step_size * jnp.sign(grad(adversarial)), low, high)

  return jax.lax.stop_gradient(jax.lax.fori_loop(0, settings.steps, step, start))


def kl_divergence(logits: jax.Array, reference_logits: jax.Array) -> jax.Array:
  """KL(softmax(reference) ‖ softmax(logits)) per example [...], in float32 (TRADES' KL:
  the clean outputs are the reference, the adversarial ones the logits)."""
  return optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(logits.astype(jnp.float32)),
      jax.nn.log_softmax(reference_logits.astype(jnp.float32)))
