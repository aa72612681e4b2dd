"""The architecture search space: `Arch` pytrees and what can be done with them.

A candidate is data, not code: `Arch(num_experts[L], top_k[L])`, int32 arrays over the L MoE
layers of the supernet; a population is the same pytree with a leading axis P. Sampling and
mutation are pure JAX (jit- and vmap-able, keys from the caller). Validation, JSON and cost
counting run on the host with NumPy.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from moenas_jax import moe


@struct.dataclass
class Arch:
  """One candidate ([L] arrays) or a population ([P, L] arrays) of MoE layer settings."""

  num_experts: Any
  top_k: Any

  def to_json(self) -> str:
    """JSON object keyed by field name (one candidate or a population)."""
    return json.dumps(to_dict(self), sort_keys=True)

  def key(self) -> tuple:
    """A hashable identity of one candidate ([L] arrays), for caches and deduplication."""
    return tuple((name, tuple(values)) for name, values in sorted(to_dict(self).items()))


def to_dict(arch: Arch) -> dict[str, list]:
  return {field.name: np.asarray(getattr(arch, field.name)).tolist()
          for field in dataclasses.fields(arch)}


def from_json(text: str | dict) -> Arch:
  """Inverse of `Arch.to_json`; names the missing or unknown field if the JSON does not fit."""
  data = json.loads(text) if isinstance(text, str) else text
  if not isinstance(data, dict):
    raise ValueError(f"arch JSON must be an object of named int lists, got {data!r}")
  names = [field.name for field in dataclasses.fields(Arch)]
  unknown, missing = sorted(set(data) - set(names)), [n for n in names if n not in data]
  if unknown or missing:
    raise ValueError(f"arch JSON must have the fields {names}; missing {missing}, unknown "
                     f"{unknown} in {data!r}")
  for name in names:
    values = np.asarray(data[name], dtype=object).ravel().tolist()
    if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
      raise ValueError(f"arch field {name!r} must hold integers, got {data[name]!r}")
  return Arch(**{name: np.asarray(data[name], np.int32) for name in names})


def features(space: SearchSpace, archs: Arch, *, one_hot: bool = False) -> np.ndarray:
  """Numeric columns [P, F] (float64) of a population, for surrogate models of the reward.

  One column per gene (field of `space.gene_maxima()`, then layer) holding value / maximum,
  in (0, 1]; with `one_hot`, one indicator column per value 1..maximum of each gene instead.
  A new gene (an `Arch` field with its `gene_maxima` entry) adds its columns here.
  """
  columns = []
  for name, maxima in space.gene_maxima().items():
    values = np.asarray(getattr(archs, name), np.int64)
    for layer, maximum in enumerate(maxima):
      gene = values[:, layer:layer + 1]
      columns.append(gene == np.arange(1, maximum + 1) if one_hot else gene / maximum)
  return np.concatenate(columns, axis=1).astype(np.float64)


def check_rewards(rewards: Any, batch_size: int) -> np.ndarray:
  """The rewards a controller's `tell()` takes, as float64 [P]: finite, one per candidate."""
  rewards = np.asarray(rewards, np.float64)
  if rewards.shape != (batch_size,) or not np.isfinite(rewards).all():
    raise ValueError(f"tell() needs {batch_size} finite rewards, got {rewards!r}")
  return rewards


def check_budgets(owner: str, *budgets: float | None) -> None:
  """Raises ValueError unless every hard budget of controller `owner` is positive or None."""
  for budget in budgets:
    if budget is not None and not budget > 0:
      raise ValueError(f"a {owner} budget must be positive or None, got {budget!r}")


def within_budget(space: SearchSpace, archs: Arch, param_budget: float | None = None,
                  mac_budget: float | None = None) -> np.ndarray:
  """[P] bool: the candidates within the params and MACs budgets (None: no budget), from the
  exact analytic counts (`SearchSpace.params`, `.macs`), before anything is scored."""
  within = np.ones(np.shape(archs.num_experts)[0], bool)
  for budget, count in ((param_budget, space.params), (mac_budget, space.macs)):
    if budget is not None:
      within &= count(archs) <= budget
  return within


def stack(archs: Sequence[Arch]) -> Arch:
  """P candidates → one population pytree with a leading axis P."""
  if not archs:
    raise ValueError("cannot stack an empty list of architectures")
  return jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]), *archs)


def unstack(population: Arch) -> list[Arch]:
  """A population pytree → its P candidates, as NumPy arrays."""
  if np.ndim(population.num_experts) != 2:
    raise ValueError(f"unstack() takes a population [P, L], got shape "
                     f"{np.shape(population.num_experts)}")
  size = np.asarray(population.num_experts).shape[0]
  return [jax.tree.map(lambda v, i=i: np.asarray(v)[i], population) for i in range(size)]


@dataclasses.dataclass(frozen=True)
class MoELayerShape:
  """One MoE feed-forward layer of the supernet: width D, hidden width H, tokens per image.

  Costs of one layer, vectorised over NumPy arrays of expert counts n and top-ks k:
  `params(n)` = n experts of D · H + H + H · D + D, plus a router D · n if n > 1 (a layer
  with one expert is a plain feed-forward); `macs(n, k)` per token: the router (D · n), and
  for each of the k chosen experts its two matmuls (2 · D · H) plus the gate-weighted combine
  (D); one expert: a plain feed-forward (2 · D · H).
  """

  dim: int
  hidden: int
  tokens: int

  def params(self, experts: np.ndarray) -> np.ndarray:
    per_expert = 2 * self.dim * self.hidden + self.hidden + self.dim
    return experts * per_expert + np.where(experts > 1, self.dim * experts, 0)

  def macs(self, experts: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    routed = experts > 1
    return self.tokens * (top_k * 2 * self.dim * self.hidden
                          + routed * (self.dim * experts + top_k * self.dim))


@dataclasses.dataclass(frozen=True)
class ConvMoELayerShape:
  """One convolutional MoE layer (`models.conv_moe`): a k x k conv `in_channels` → W (W =
  `width`, each expert's channel block) and, with `second_conv` (a `resnet_moe` block), a
  second one W → W routed alike, at `positions` output positions.

  `params(n)`: n experts' kernels, k² · W · (in_channels + W) each with the second conv, else
  k² · W · in_channels (the batch norms are shared by the experts: not counted here).
  `macs(n, k)` per position: the k chosen experts' convs, plus, when routed (n > 1), the
  gate-weighted combine of each conv (k · W).
  """

  in_channels: int
  width: int
  positions: int
  kernel: int = 3
  second_conv: bool = True

  @property
  def per_expert(self) -> int:
    """One expert's kernel weights, also its MACs per output position."""
    inputs = self.in_channels + (self.width if self.second_conv else 0)
    return self.kernel ** 2 * self.width * inputs

  def params(self, experts: np.ndarray) -> np.ndarray:
    return experts * self.per_expert

  def macs(self, experts: np.ndarray, top_k: np.ndarray) -> np.ndarray:
    convs = 2 if self.second_conv else 1
    combine = np.where(experts > 1, convs * top_k * self.width, 0)
    return self.positions * (top_k * self.per_expert + combine)


@dataclasses.dataclass(frozen=True)
class ImageRouterShape:
  """A router shared by every MoE layer that scores whole images (`models.conv_moe`): a
  body of `body_params` and `body_macs` and a linear head from `features` to E_r scores.

  A standalone candidate's head has E_r = its largest expert count (the router's first E_r
  columns); with one expert everywhere there is no router at all. `params` / `macs` take the
  expert counts [..., L] of candidates.
  """

  body_params: int
  body_macs: int
  features: int

  def params(self, experts: np.ndarray) -> np.ndarray:
    scores = experts.max(-1)
    return np.where(scores > 1, self.body_params + (self.features + 1) * scores, 0)

  def macs(self, experts: np.ndarray) -> np.ndarray:
    scores = experts.max(-1)
    return np.where(scores > 1, self.body_macs + self.features * scores, 0)


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Per-layer maxima of the supernet and the costs of everything outside its MoE layers.

  `base_params` / `base_macs` count the parameters and per-image multiply-accumulates of all
  non-MoE layers; the MoE layers (each a shape object with `params(n)` and `macs(n, k)`:
  `MoELayerShape`, `ConvMoELayerShape`) and an optional image-level `router`
  (`ImageRouterShape`) add what the candidate activates (see `params`, `macs`).
  """

  max_experts: tuple[int, ...]
  max_top_k: tuple[int, ...]
  layers: tuple[MoELayerShape | ConvMoELayerShape, ...]
  base_params: int
  base_macs: int
  router: ImageRouterShape | None = None

  def __post_init__(self):
    if not len(self.max_experts) == len(self.max_top_k) == len(self.layers):
      raise ValueError(f"max_experts ({len(self.max_experts)}), max_top_k "
                       f"({len(self.max_top_k)}) and layers ({len(self.layers)}) must have "
                       f"one entry per MoE layer")

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  def gene_maxima(self) -> dict[str, tuple[int, ...]]:
    """Per `Arch` field, each layer's largest value (every gene takes values 1..maximum)."""
    return {"num_experts": self.max_experts, "top_k": self.max_top_k}

  def _maxima(self) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(self.max_experts, jnp.int32), jnp.asarray(self.max_top_k, jnp.int32)

  def largest(self) -> Arch:
    """Every expert active, every token at the maximal top-k."""
    return Arch(np.asarray(self.max_experts, np.int32), np.asarray(self.max_top_k, np.int32))

  def dense(self) -> Arch:
    """One expert, top-1 everywhere: the dense model."""
    ones = np.ones(self.num_layers, np.int32)
    return Arch(ones, ones.copy())

  def sample(self, key: jax.Array) -> Arch:
    """Uniform expert count per layer, then a uniform top-k in 1..min(max_top_k, experts)."""
    max_experts, max_top_k = self._maxima()
    experts_key, top_k_key = jax.random.split(key)
    experts = jax.random.randint(experts_key, (self.num_layers,), 1, max_experts + 1)
    top_k = jax.random.randint(top_k_key, (self.num_layers,), 1,
                               jnp.minimum(max_top_k, experts) + 1)
    return Arch(experts, top_k)

  def sample_population(self, key: jax.Array, size: int) -> Arch:
    return jax.vmap(self.sample)(jax.random.split(key, size))

  def mutate(self, key: jax.Array, arch: Arch, num_mutations: int = 1) -> Arch:
    """Changes `num_mutations` genes (a layer's expert count or its top-k) to new values.

    The gene is drawn uniformly among those that have another valid value, the new value
    uniformly among the other valid values. When an expert count drops below its layer's
    top-k, the top-k is clipped too, so the child is always valid. Repeated draws may hit
    the same gene; a space with one architecture returns it unchanged.
    """
    max_experts, max_top_k = self._maxima()
    experts = jnp.asarray(arch.num_experts, jnp.int32)
    top_k = jnp.asarray(arch.top_k, jnp.int32)
    for step_key in jax.random.split(key, num_mutations):
      gene_key, value_key = jax.random.split(step_key)
      # Genes 0..L-1 are expert counts, L..2L-1 top-ks; `choices` counts their valid values.
      choices = jnp.concatenate([max_experts, jnp.minimum(max_top_k, experts)])
      changeable = choices > 1
      gene = jax.random.choice(gene_key, 2 * self.num_layers,
                               p=changeable / jnp.maximum(changeable.sum(), 1))
      layer, is_top_k = gene % self.num_layers, gene >= self.num_layers
      current = jnp.where(is_top_k, top_k[layer], experts[layer])
      # A different value, uniform over the others: shift by 1..choices-1 around the ring.
      shift = jax.random.randint(value_key, (), 1, jnp.maximum(choices[gene], 2))
      new = jnp.where(changeable[gene], (current - 1 + shift) % choices[gene] + 1, current)
      experts = experts.at[layer].set(jnp.where(is_top_k, experts[layer], new))
      top_k = top_k.at[layer].set(jnp.where(is_top_k, new,
                                            jnp.minimum(top_k[layer], experts[layer])))
    return Arch(experts, top_k)

  def validate(self, arch: Arch) -> Arch:
    """Checks one candidate or a population on the host; returns it as int32 NumPy arrays."""
    experts, top_k = np.asarray(arch.num_experts), np.asarray(arch.top_k)
    if experts.ndim not in (1, 2) or experts.shape[-1] != self.num_layers:
      raise ValueError(f"arch.num_experts has shape {experts.shape}; the supernet has "
                       f"{self.num_layers} MoE layers, so give [{self.num_layers}] values "
                       f"(or [P, {self.num_layers}] for a population)")
    experts, top_k = moe.check_arch(experts, top_k, max_experts=max(self.max_experts),
                                    max_top_k=max(self.max_top_k))
    for name, values, maxima in (("num_experts", experts, self.max_experts),
                                 ("top_k", top_k, self.max_top_k)):
      over = values > np.asarray(maxima)
      if over.any():
        where = tuple(int(i) for i in np.argwhere(over)[0])
        raise ValueError(f"{name}{list(where)} = {values[where]} exceeds the maximum "
                         f"{maxima[where[-1]]} of MoE layer {where[-1]}")
    return Arch(experts, top_k)

  def params(self, arch: Arch) -> np.ndarray:
    """Stored parameters of the standalone model with only the active experts."""
    experts = np.asarray(arch.num_experts, np.int64)
    total = sum(layer.params(experts[..., i]) for i, layer in enumerate(self.layers))
    return self.base_params + total + self._router(experts, "params")

  def macs(self, arch: Arch) -> np.ndarray:
    """Multiply-accumulates per image on the active path.

    Capacity padding is not counted: it is what a per-token implementation on the device
    would run.
    """
    experts = np.asarray(arch.num_experts, np.int64)
    top_k = np.asarray(arch.top_k, np.int64)
    total = sum(layer.macs(experts[..., i], top_k[..., i])
                for i, layer in enumerate(self.layers))
    return self.base_macs + total + self._router(experts, "macs")

  def _router(self, experts: np.ndarray, cost: str) -> np.ndarray:
    return 0 if self.router is None else getattr(self.router, cost)(experts)
