"""The training loss of every loop (supernet, proxy, final training, fine-tuning).

`terms` runs one candidate (or a standalone model, `arch=None`) on a batch in training mode
and gives the per-example cross-entropies, the routing aux loss, the accuracy and the new
batch-norm state. `update` is one gradient step of `objective(cross-entropies) + mean aux
loss` for any `terms_fn(params)` (one model, K sandwich candidates vmapped, …): the
objective (`objectives.py`: ERM, group-balanced, group DRO; later adversarial ones) is the
pluggable part, and its state travels next to the optimizer state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moenas_jax import models, objectives


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy, in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def terms(graphdef: nnx.GraphDef, params: Any, state: Any, batch: dict[str, jax.Array],
          arch: Any = None, key: jax.Array | None = None
          ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """(cross-entropy [B], aux loss, accuracy, new state) of one training-mode forward pass."""
  logits, new_state, aux = models.apply(graphdef, params, state, batch["image"], arch,
                                        train=True, key=key)
  correct = (logits.argmax(-1) == batch["label"]).mean()
  return cross_entropy(logits, batch["label"]), aux["aux_loss"], correct, new_state


def update(optimizer: optax.GradientTransformation, objective: objectives.Objective,
           terms_fn: Callable[[Any], tuple[jax.Array, jax.Array, jax.Array, Any]],
           params: Any, opt_state: Any, batch: dict[str, jax.Array]
           ) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
  """One step on loss = objective(cross-entropies [..., B]) + mean aux loss.

  `opt_state` is (optimizer state, objective state). Returns (params, new state,
  opt_state, logs): "loss", "cross_entropy" and "aux_loss" (means), "accuracy" (as
  `terms_fn` gives it: a scalar, or one per candidate) and "grad_norm".
  """
  optimizer_state, objective_state = opt_state

  def loss_fn(params):
    ce, aux, correct, new_state = terms_fn(params)
    loss, new_objective = objective.loss(ce, batch, objective_state)
    return loss + aux.mean(), (ce, aux, correct, new_state, new_objective)

  (loss, (ce, aux, correct, new_state, objective_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  updates, optimizer_state = optimizer.update(grads, optimizer_state, params)
  logs = {"loss": loss, "cross_entropy": ce.mean(), "aux_loss": aux.mean(), "accuracy": correct,
          "grad_norm": optax.tree.norm(grads)}
  return (optax.apply_updates(params, updates), new_state, (optimizer_state, objective_state),
          logs)
