"""The training loss of every loop (supernet, proxy, final training, fine-tuning).

`terms` runs one candidate (or a standalone model, `arch=None`) on a batch in training mode
and gives the per-example cross-entropies, the routing aux loss, the accuracy and the new
batch-norm state. `update` is one gradient step of `objective(per-example losses) + mean aux
loss` for any `terms_fn(params)` (one model, K sandwich candidates vmapped, …): the
objective (`objectives.py`: ERM, group-balanced, group DRO) is the pluggable part, and its
state travels next to the optimizer state.

Adversarial training (`adversarial.AdversarialSettings`): `adversarial_terms` is `terms` with
PGD-AT's or TRADES' per-example losses (the attack runs in evaluation mode on frozen weights,
as in the TRADES code; the clean and adversarial forwards then update batch norm one after
the other), so the fairness objectives weigh robust losses. AdvMoE (`advmoe_update`)
alternates two `update`s per batch with the optimizers of `alternating`: a TRADES step of
the backbone, then a router step (`router_terms`), each phase's optimizer
(`optax.multi_transform` over `router_labels`) setting the other part's updates to zero and
holding no moments for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moenas_jax import adversarial, models, objectives


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


def has_router(params: Any) -> bool:
  """Whether the model has an image router: a top-level "router" in its parameters."""
  return "router" in params


def router_labels(params: Any) -> Any:
  """"router" at the leaves of the top-level `router` subtree, "backbone" elsewhere."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: "router" if getattr(path[0], "key", None) == "router" else "backbone",
      params)


def alternating(optimizer: optax.GradientTransformation
                ) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  """AdvMoE's (backbone optimizer, router optimizer): `optimizer` on one part, zero updates
  (and no state) on the other."""
  return tuple(optax.multi_transform({part: optimizer, other: optax.set_to_zero()},
                                     router_labels)
               for part, other in (("backbone", "router"), ("router", "backbone")))


def _attack(graphdef: nnx.GraphDef, params: Any, state: Any, batch: dict[str, jax.Array],
            arch: Any, key: jax.Array, settings: adversarial.AdversarialSettings,
            with_router: bool) -> jax.Array:
  """Adversarial images (evaluation mode, weights frozen): PGD on the cross-entropy
  (`pgd_at`) or on KL(f(x) ‖ f(x_adv)), plus the router's with `with_router`."""
  params = jax.lax.stop_gradient(params)

  def forward(images):
    logits, _, aux = models.apply(graphdef, params, state, images, arch, train=False)
    return logits, aux.get("router_logits")

  if settings.method == "pgd_at":
    def objective(images):
      return cross_entropy(forward(images)[0], batch["label"]).sum()
  else:
    clean, clean_router = forward(batch["image"])

    def objective(images):
      logits, router = forward(images)
      total = adversarial.kl_divergence(logits, clean).sum()
      if with_router:
        total += adversarial.kl_divergence(router, clean_router).sum()
      return total
  return adversarial.pgd(objective, batch["image"], key=key, settings=settings.attack)


def adversarial_terms(graphdef: nnx.GraphDef, params: Any, state: Any,
                      batch: dict[str, jax.Array], arch: Any = None,
                      key: jax.Array | None = None, *,
                      settings: adversarial.AdversarialSettings
                      ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """`terms` under attack: per example CE(x_adv) (`pgd_at`) or CE(x) + β · KL(f(x) ‖
  f(x_adv)) (`trades`, and AdvMoE's backbone step, whose attack adds the router's KL).
  `key` (required) gives the attack's start and the gate noise. The accuracy is on the
  adversarial (`pgd_at`) or clean images."""
  attack_key, noise_key = jax.random.split(key)
  images = _attack(graphdef, params, state, batch, arch, attack_key, settings,
                   with_router=settings.method == "advmoe")
  if settings.method == "pgd_at":
    return terms(graphdef, params, state, {**batch, "image": images}, arch, noise_key)
  logits, state, aux = models.apply(graphdef, params, state, batch["image"], arch,
                                    train=True, key=noise_key)
  attacked, state, _ = models.apply(graphdef, params, state, images, arch, train=True,
                                    key=noise_key)
  losses = (cross_entropy(logits, batch["label"])
            + settings.beta * adversarial.kl_divergence(attacked, logits))
  return losses, aux["aux_loss"], (logits.argmax(-1) == batch["label"]).mean(), state


def router_terms(graphdef: nnx.GraphDef, params: Any, state: Any, batch: dict[str, jax.Array],
                 key: jax.Array, settings: adversarial.AdversarialSettings
                 ) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
  """AdvMoE's router step, as `terms`: per example CE(router(x), y mod E) + α ·
  KL(router(x) ‖ router(x_adv)) on fresh adversarial images; accuracy of y mod E."""
  attack_key, noise_key = jax.random.split(key)
  images = _attack(graphdef, params, state, batch, None, attack_key, settings, with_router=True)
  _, state, aux = models.apply(graphdef, params, state, batch["image"], train=True,
                               key=noise_key)
  _, state, attacked = models.apply(graphdef, params, state, images, train=True, key=noise_key)
  router = aux["router_logits"]  # [B, E]
  target = batch["label"] % router.shape[-1]
  losses = (cross_entropy(router, target)
            + settings.alpha * adversarial.kl_divergence(attacked["router_logits"], router))
  return losses, aux["aux_loss"], (router.argmax(-1) == target).mean(), state


# The router step's objective: the mean (its targets y mod E are no fairness units).
_ROUTER_OBJECTIVE = objectives.Objective.erm()


def advmoe_update(optimizers: tuple[optax.GradientTransformation, ...],
                  objective: objectives.Objective, graphdef: nnx.GraphDef, params: Any,
                  state: Any, opt_state: Any, batch: dict[str, jax.Array], key: jax.Array,
                  settings: adversarial.AdversarialSettings
                  ) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
  """AdvMoE's two steps on one batch: the backbone's (TRADES under `objective`, the router
  fixed), then the router's (`router_terms`, the backbone fixed).

  `optimizers`: `alternating`'s pair; `opt_state` = ((backbone state, router state),
  objective state). Logs: the backbone step's, plus "router_loss" and "router_accuracy".
  """
  (backbone_state, router_state), objective_state = opt_state
  backbone_key, router_key = jax.random.split(key)
  params, state, (backbone_state, objective_state), logs = update(
      optimizers[0], objective, functools.partial(
          adversarial_terms, graphdef, state=state, batch=batch, key=backbone_key,
          settings=settings), params, (backbone_state, objective_state), batch)
  params, state, (router_state, _), router_logs = update(
      optimizers[1], _ROUTER_OBJECTIVE, functools.partial(
          router_terms, graphdef, state=state, batch=batch, key=router_key,
          settings=settings), params, (router_state, None), batch)
  logs.update(router_loss=router_logs["loss"], router_accuracy=router_logs["accuracy"])
  return params, state, ((backbone_state, router_state), objective_state), logs


def update(optimizer: optax.GradientTransformation, objective: objectives.Objective,
           terms_fn: Callable[[Any], tuple[jax.Array, jax.Array, jax.Array, Any]],
           params: Any, opt_state: Any, batch: dict[str, jax.Array]
           ) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
  """One step on loss = objective(per-example losses [..., B]) + mean aux loss.

  `opt_state` is (optimizer state, objective state). Returns (params, new state,
  opt_state, logs): "loss", "cross_entropy" (the mean per-example loss: under attack,
  its adversarial form) and "aux_loss" (means), "accuracy" (as `terms_fn` gives it: a
  scalar, or one per candidate) and "grad_norm".
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
