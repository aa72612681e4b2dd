"""Supernet training: every step trains K sampled architectures at once, vmapped over arch.

Sandwich rule (Yu & Huang, BigNAS / slimmable networks): each step's K candidates are the
largest, the smallest (every gene at 1: one expert, top-1, narrowest, shallowest) and K − 2
random ones, so the extremes of the space are always trained. Loss (`loss.update`) = the
training objective (`objectives.py`, e.g. ERM or group DRO) over the K candidates'
cross-entropies, plus the mean of their routing aux losses; the
objective's state travels with the optimizer state. The gradient is taken once for the shared
weights; the batch-norm statistics each candidate computes are averaged over the K candidates
(the search recalibrates them per candidate before scoring: `population.PopulationEvaluator`).
Optimiser: AdamW with linear warmup and cosine decay, gradients clipped to global norm 1;
weight decay applies to conv and linear kernels and expert weight matrices only (`decay_mask`).
One compiled step for the whole run; with a mesh the batch is split over all its devices
(data parallel, weights replicated). `frozen`: top-level weight names the optimizer leaves
out (a frozen trunk, `make_optimizer`).

Adversarial supernet training (`adversarial`: `pgd_at` or `trades`): each candidate is
attacked on its own (`loss.adversarial_terms` under the vmap over the K candidates, one key
for all). AdvMoE's alternation is for final training of a model with an image router only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from moenas_jax import adversarial, hosts, loss, objectives
from moenas_jax.search_space import Arch, SearchSpace


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """AdamW with linear warmup from 0 and cosine decay to `final_fraction` of the peak."""

  learning_rate: float = 2e-3
  weight_decay: float = 0.05
  warmup_steps: int = 50
  total_steps: int = 500
  final_fraction: float = 0.01
  clip_norm: float = 1.0

  def __post_init__(self):
    if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps; got "
                       f"total_steps={self.total_steps}, warmup_steps={self.warmup_steps}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


# Leaf names weight decay shrinks: conv/linear kernels and the experts' weight matrices.
DECAYED_NAMES = ("kernel", "w_in", "w_out")


def decay_mask(params: Any) -> Any:
  """True at the leaves AdamW decays: named in `DECAYED_NAMES` with ndim >= 2.

  Not decayed (as in big_vision and V-MoE): norm scales and biases, linear and expert biases
  (`bias`, `b_in`, `b_out`) and the MoE router, whose decay would pull every token's gates
  towards uniform. `params` is an nnx.State or a nested dict; the mask has its structure.
  """
  def decayed(path, leaf):
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED_NAMES and jnp.ndim(leaf) >= 2
  return jax.tree_util.tree_map_with_path(decayed, params)


def frozen_labels(params: Any, frozen: Sequence[str]) -> Any:
  """"frozen" at the leaves under a top-level name in `frozen`, else "trained"."""
  def label(path, leaf):
    del leaf
    return "frozen" if path and getattr(path[0], "key", None) in frozen else "trained"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(settings: OptimizerSettings, frozen: Sequence[str] = ()
                   ) -> optax.GradientTransformation:
  """The settings' AdamW; the weights under the top-level names in `frozen` (a frozen trunk)
  are left out: never updated, no optimizer state, not in the clipped gradient norm."""
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, settings.learning_rate, settings.warmup_steps, settings.total_steps,
      end_value=settings.learning_rate * settings.final_fraction)
  optimizer = optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                          optax.adamw(schedule, weight_decay=settings.weight_decay,
                                      mask=decay_mask))
  if not frozen:
    return optimizer
  return optax.multi_transform({"trained": optimizer, "frozen": optax.set_to_zero()},
                               lambda params: frozen_labels(params, tuple(frozen)))


def sandwich(space: SearchSpace, key: jax.Array, num_archs: int) -> Arch:
  """[K, L] candidates: the largest, the smallest and K − 2 random ones."""
  extremes = [space.largest(), space.smallest()][:num_archs]
  fixed = jax.tree.map(lambda *v: jnp.stack([jnp.asarray(x, jnp.int32) for x in v]), *extremes)
  if num_archs <= 2:
    return fixed
  random = space.sample_population(key, num_archs - 2)
  return jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(jnp.int32)]), fixed, random)


class SupernetTrainer:
  """The jitted supernet step, `step(params, state, opt_state, batch, key)`."""

  def __init__(self, graphdef: nnx.GraphDef, space: SearchSpace, *, archs_per_step: int,
               optimizer: OptimizerSettings, mesh: Mesh | None = None,
               objective: objectives.Objective | None = None,
               adversarial_settings: adversarial.AdversarialSettings | None = None,
               frozen: Sequence[str] = ()):
    if archs_per_step < 2:
      raise ValueError(f"archs_per_step={archs_per_step}: the sandwich rule needs at least 2 "
                       f"(the largest and the smallest candidate)")
    robust = adversarial_settings or adversarial.AdversarialSettings()
    if robust.method == "advmoe":
      raise ValueError("supernet training does not alternate routers and backbones (AdvMoE is "
                       "for final training); use adversarial method 'trades' or 'pgd_at'")
    terms = (loss.terms if robust.method == "none" else
             functools.partial(loss.adversarial_terms, settings=robust))
    self.optimizer = make_optimizer(optimizer, frozen)
    self.objective = objectives.Objective.erm() if objective is None else objective
    self.mesh = mesh

    def supernet_step(params, state, opt_state, batch, key):
      arch_key, noise_key = jax.random.split(key)
      archs = sandwich(space, arch_key, archs_per_step)
      noise_keys = jax.random.split(noise_key, archs_per_step)

      def candidates(params):  # the K candidates; their batch-norm statistics averaged
        ce, aux, correct, states = jax.vmap(lambda arch, noise: terms(
            graphdef, params, state, batch, arch, noise))(archs, noise_keys)  # ce [K, B]
        return ce, aux, correct, jax.tree.map(lambda v: v.mean(axis=0), states)

      params, new_state, opt_state, logs = loss.update(self.optimizer, self.objective,
                                                       candidates, params, opt_state, batch)
      correct = logs.pop("accuracy")
      # Candidates 0 and 1 are the largest and the smallest (see `sandwich`).
      return params, new_state, opt_state, {**logs, "accuracy_largest": correct[0],
                                            "accuracy_smallest": correct[1]}

    self._step = jax.jit(supernet_step, donate_argnums=(0, 1, 2))

  def init(self, params: Any) -> Any:
    """(optimizer state, objective state): the `opt_state` that `step` takes and returns."""
    return self.optimizer.init(params), self.objective.init()

  def place(self, tree: Any) -> Any:
    """Weights and optimizer state replicated over the mesh's devices (unchanged without one),
    so a restored checkpoint lands where a fresh run's arrays do."""
    if self.mesh is None:
      return tree
    return jax.device_put(tree, NamedSharding(self.mesh, PS()))

  def shard_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The batch split over every device of the mesh (unchanged without a mesh)."""
    if self.mesh is None:
      return batch
    return hosts.put(batch, NamedSharding(self.mesh, PS(self.mesh.axis_names)))

  def step(self, params: Any, state: Any, opt_state: Any, batch: dict[str, np.ndarray],
           key: jax.Array) -> tuple[Any, Any, Any, dict[str, jax.Array]]:
    """One update of the shared weights; returns (params, state, opt_state, logs)."""
    return self._step(params, state, opt_state, self.shard_batch(batch), key)
