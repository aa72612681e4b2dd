"""The architecture search space: `Arch` pytrees and what can be done with them.

A candidate is data, not code: `Arch(num_experts[L], top_k[L])`, int32 arrays over the L MoE
layers of the supernet; a population is the same pytree with a leading axis P. The genes a
space searches are declared once, in `SearchSpace.genes` (a table of `Gene`s with their legal
values); sampling, mutation, validation and features follow from that table. Sampling and
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


@struct.dataclass
class Arch:
  """One candidate ([n] arrays per gene) or a population ([P, n] arrays) of gene values.

  `num_experts` and `top_k` are the MoE layers' genes, [L] each; `width` and `depth` are
  optional genes (None: the space has no such gene; None is an empty pytree node, so jit,
  vmap and `jax.tree.map` skip it).
  """

  num_experts: Any
  top_k: Any
  width: Any = None
  depth: Any = None

  def to_json(self) -> str:
    """JSON object keyed by field name (one candidate or a population)."""
    return json.dumps(to_dict(self), sort_keys=True)

  def key(self) -> tuple:
    """A hashable identity of one candidate ([L] arrays), for caches and deduplication."""
    return tuple((name, tuple(values)) for name, values in sorted(to_dict(self).items()))


def present(arch: Arch) -> dict[str, Any]:
  """The genes `arch` has (its fields that are not None), by field name."""
  return {field.name: getattr(arch, field.name) for field in dataclasses.fields(arch)
          if getattr(arch, field.name) is not None}


def to_dict(arch: Arch) -> dict[str, list]:
  return {name: np.asarray(values).tolist() for name, values in present(arch).items()}


def population_size(archs: Arch) -> int:
  """P, the leading axis of a population (static, also under jit)."""
  return int(np.shape(jax.tree.leaves(archs)[0])[0])


def from_json(text: str | dict) -> Arch:
  """Inverse of `Arch.to_json`; names the missing or unknown field if the JSON does not fit."""
  data = json.loads(text) if isinstance(text, str) else text
  if not isinstance(data, dict):
    raise ValueError(f"arch JSON must be an object of named int lists, got {data!r}")
  fields = dataclasses.fields(Arch)
  required = [f.name for f in fields if f.default is dataclasses.MISSING]
  optional = [f.name for f in fields if f.name not in required]
  unknown = sorted(set(data) - {f.name for f in fields})
  missing = [name for name in required if name not in data]
  if unknown or missing:
    raise ValueError(f"arch JSON must have the fields {required} (optional {optional}); "
                     f"missing {missing}, unknown {unknown} in {data!r}")
  names = [f.name for f in fields if f.name in data]
  for name in names:
    values = np.asarray(data[name], dtype=object).ravel().tolist()
    if not values or any(not isinstance(v, int) or isinstance(v, bool) for v in values):
      raise ValueError(f"arch field {name!r} must hold integers, got {data[name]!r}")
  return Arch(**{name: np.asarray(data[name], np.int32) for name in names})


def features(space: SearchSpace, archs: Arch, *, one_hot: bool = False) -> np.ndarray:
  """Numeric columns [P, F] (float64) of a population, for surrogate models of the reward.

  One column per (gene of `space.genes`, position) holding value / maximum, in (0, 1]; with
  `one_hot`, one indicator column per value 1..maximum of each instead.
  """
  columns = []
  for gene in space.genes:
    values = np.asarray(getattr(archs, gene.name), np.int64)
    for position, maximum in enumerate(gene.maxima):
      value = values[:, position:position + 1]
      columns.append(value == np.arange(1, maximum + 1) if one_hot else value / maximum)
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
  within = np.ones(population_size(archs), bool)
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
  shapes = {name: np.shape(values) for name, values in present(population).items()}
  if any(len(shape) != 2 for shape in shapes.values()):
    raise ValueError(f"unstack() takes a population ([P, n] per gene), got shapes {shapes}")
  return [jax.tree.map(lambda v, i=i: np.asarray(v)[i], population)
          for i in range(population_size(population))]


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
class WidthBlock:
  """A block (named `name`) whose costs follow the active widths of its input and output:
  `params[i][j]`, `macs[i][j]` at value i + 1 of gene `width` at position `source` and value
  j + 1 at `target` (None: a width that is not searched, one row or column)."""

  name: str
  source: int | None
  target: int | None
  params: tuple[tuple[int, ...], ...]
  macs: tuple[tuple[int, ...], ...]

  def costs(self, width: np.ndarray | None, cost: str) -> np.ndarray:
    """params or macs of candidates with width values [..., positions] (None: no gene)."""
    def index(position):
      return 0 if width is None or position is None else width[..., position] - 1
    return np.asarray(getattr(self, cost), np.int64)[index(self.source), index(self.target)]


@dataclasses.dataclass(frozen=True)
class Gene:
  """A searched `Arch` field: one value per position, legal values 1..maxima[position].

  capped_by: the gene (earlier in the table, of the same length) whose value at the same
  position caps this one's, as num_experts caps top_k; doc: what a value means (the llm
  prompt); unit: what a position is (error messages).
  """

  name: str
  maxima: tuple[int, ...]
  capped_by: str | None = None
  doc: str = ""
  unit: str = "MoE layer"


def _check_genes(genes: Sequence[Gene]) -> None:
  """Refuses a gene table that sampling, mutation and validation could not follow."""
  fields, names = [field.name for field in dataclasses.fields(Arch)], [g.name for g in genes]
  if names != [name for name in fields if name in names]:
    raise ValueError(f"genes {names} must be distinct Arch fields, in field order {fields}")
  seen = {}
  for gene in genes:
    if not all(maximum >= 1 for maximum in gene.maxima):
      raise ValueError(f"gene {gene.name!r} needs maxima >= 1, got {gene.maxima}")
    cap = seen.get(gene.capped_by)
    if gene.capped_by is not None and (cap is None or len(cap.maxima) != len(gene.maxima)):
      raise ValueError(f"gene {gene.name!r} is capped by {gene.capped_by!r}, which must be "
                       f"an earlier gene of the same length")
    seen[gene.name] = gene


# The genes with one value per MoE layer; a layer beyond its stage's depth holds value 1.
LAYER_GENES = ("num_experts", "top_k")


def _first(bad: np.ndarray) -> tuple[int, ...]:
  """The index of the first True of `bad`."""
  return tuple(int(i) for i in np.argwhere(bad)[0])


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """Per-layer maxima of the supernet and the costs of everything outside its MoE layers.

  `base_params` / `base_macs` count the parameters and per-image multiply-accumulates of all
  non-MoE layers; the MoE layers (each a shape object with `params(n)` and `macs(n, k)`:
  `MoELayerShape`, `ConvMoELayerShape`) and an optional image-level `router`
  (`ImageRouterShape`) add what the candidate activates (see `params`, `macs`). The genes
  searched are the table `genes`.

  Width and depth genes (a supernet with stages, OFA-style): `width_maxima` gives the number
  of width choices per searched stage (empty: no `width` gene); `width_blocks` price the
  blocks whose costs follow those widths (and are not in the base). `depth_maxima` gives each
  stage's MoE layers, in layer order (empty: no `depth` gene; layer i of stage s is used while
  i < depth[s]); `layer_costs` are (params, MACs) of each MoE layer's surroundings (attention,
  norms), counted while the layer is used. A candidate is canonical: the MoE genes of an
  unused layer are 1 (`clip`, `validate`), so one network has one `Arch.key()`.
  """

  max_experts: tuple[int, ...]
  max_top_k: tuple[int, ...]
  layers: tuple[MoELayerShape | ConvMoELayerShape, ...]
  base_params: int
  base_macs: int
  router: ImageRouterShape | None = None
  width_maxima: tuple[int, ...] = ()
  width_blocks: tuple[WidthBlock, ...] = ()
  depth_maxima: tuple[int, ...] = ()
  layer_costs: tuple[tuple[int, int], ...] = ()

  def __post_init__(self):
    if not len(self.max_experts) == len(self.max_top_k) == len(self.layers):
      raise ValueError(f"max_experts ({len(self.max_experts)}), max_top_k "
                       f"({len(self.max_top_k)}) and layers ({len(self.layers)}) must have "
                       f"one entry per MoE layer")
    if self.depth_maxima and sum(self.depth_maxima) != self.num_layers:
      raise ValueError(f"depth_maxima {self.depth_maxima} must add up to the "
                       f"{self.num_layers} MoE layers")
    if self.layer_costs and len(self.layer_costs) != self.num_layers:
      raise ValueError(f"layer_costs needs one (params, MACs) per MoE layer, got "
                       f"{len(self.layer_costs)} for {self.num_layers}")
    _check_genes(self.genes)

  @property
  def num_layers(self) -> int:
    return len(self.layers)

  @property
  def genes(self) -> tuple[Gene, ...]:
    """The searched genes, in `Arch` field order (each after the gene that caps it)."""
    genes = (Gene("num_experts", tuple(self.max_experts), None,
                  "each layer's number of experts"),
             Gene("top_k", tuple(self.max_top_k), "num_experts",
                  "its top_k (experts per token)"))
    if self.width_maxima:
      genes += (Gene("width", tuple(self.width_maxima), None,
                     "each stage's width (1 = the narrowest choice)", "stage"),)
    if self.depth_maxima:
      genes += (Gene("depth", tuple(self.depth_maxima), None,
                     "each transformer stage's depth (its first layers used; the "
                     "others' experts and top_k are ignored)", "stage"),)
    return genes

  def used_layers(self, depth: Any) -> Any:
    """[..., L] bool: the MoE layers within their stage's depth, for depth values [..., S]
    (NumPy or JAX arrays); every layer without a depth gene."""
    if not self.depth_maxima or depth is None:
      return np.ones(self.num_layers, bool)
    stage = np.repeat(np.arange(len(self.depth_maxima)), self.depth_maxima)
    index = np.concatenate([np.arange(d) for d in self.depth_maxima])
    return index < depth[..., stage]

  def _legal_maxima(self, gene: Gene, values: dict[str, Any], xp: Any = jnp) -> Any:
    """[n]: each position's largest legal value of `gene`, given the genes that cap it (and
    1 for a MoE layer beyond its stage's depth); xp: jnp (traced code) or np (host)."""
    maxima = xp.asarray(gene.maxima, xp.int32)
    if gene.capped_by is not None:
      maxima = xp.minimum(maxima, values[gene.capped_by])
    if gene.name in LAYER_GENES and "depth" in values:
      maxima = xp.where(self.used_layers(values["depth"]), maxima, 1)
    return maxima

  def largest(self) -> Arch:
    """Every gene at its largest legal value (every expert active, the maximal top-k); host
    NumPy, so also a constant inside jitted code."""
    values = {}
    for gene in self.genes:
      values[gene.name] = self._legal_maxima(gene, values, np).astype(np.int32)
    return Arch(**values)

  def smallest(self) -> Arch:
    """Every gene at 1: one expert, top-1, the narrowest width and depth 1."""
    return Arch(**{gene.name: np.ones(len(gene.maxima), np.int32) for gene in self.genes})

  def dense(self) -> Arch:
    """The dense model: one expert and top-1 in every layer, every other gene at its largest
    (full width and depth); `smallest()` where the space has no other genes."""
    values = present(self.largest())
    for name in LAYER_GENES:
      values[name] = np.ones_like(values[name])
    return Arch(**values)

  def sample(self, key: jax.Array) -> Arch:
    """Each gene in table order, uniform per position in 1..min(maximum, cap) (an expert
    count per layer, then a top-k in 1..min(max_top_k, experts))."""
    values = {}
    for gene, gene_key in zip(self.genes, jax.random.split(key, len(self.genes))):
      values[gene.name] = jax.random.randint(gene_key, (len(gene.maxima),), 1,
                                             self._legal_maxima(gene, values) + 1)
    return self.clip(Arch(**values))

  def sample_population(self, key: jax.Array, size: int) -> Arch:
    return jax.vmap(self.sample)(jax.random.split(key, size))

  def mutate(self, key: jax.Array, arch: Arch, num_mutations: int = 1) -> Arch:
    """Changes `num_mutations` slots (a gene at one position) to new values.

    The slot is drawn uniformly among those that have another legal value, the new value
    uniformly among the other legal values. When a gene drops below a gene it caps (an
    expert count below its layer's top-k), that one is clipped too, so the child is always
    valid. Repeated draws may hit the same slot; a space with one architecture returns it
    unchanged.
    """
    genes, names = self.genes, [gene.name for gene in self.genes]
    arch = Arch(**{name: jnp.asarray(getattr(arch, name), jnp.int32) for name in names})
    splits = np.cumsum([len(gene.maxima) for gene in genes])[:-1].tolist()
    for step_key in jax.random.split(key, num_mutations):
      slot_key, value_key = jax.random.split(step_key)
      # Slots are the genes' positions in table order; `choices` counts their legal values.
      values = present(arch)
      choices = jnp.concatenate([self._legal_maxima(gene, values) for gene in genes])
      changeable = choices > 1
      slot = jax.random.choice(slot_key, choices.size,
                               p=changeable / jnp.maximum(changeable.sum(), 1))
      flat = jnp.concatenate([values[name] for name in names])
      # A different value, uniform over the others: shift by 1..choices-1 around the ring.
      shift = jax.random.randint(value_key, (), 1, jnp.maximum(choices[slot], 2))
      new = jnp.where(changeable[slot], (flat[slot] - 1 + shift) % choices[slot] + 1,
                      flat[slot])
      arch = self.clip(Arch(**dict(zip(names, jnp.split(flat.at[slot].set(new), splits)))))
    return arch

  def clip(self, arch: Arch) -> Arch:
    """`arch` with each capped gene lowered to the gene that caps it where above, and the
    MoE genes of layers beyond their stage's depth set to 1 (canonical; pure JAX)."""
    values = present(arch)
    for gene in self.genes:
      if gene.capped_by is not None:
        values[gene.name] = jnp.minimum(values[gene.name], values[gene.capped_by])
    return self._canonical(values, jnp)

  def _canonical(self, values: dict[str, Any], xp: Any) -> Arch:
    """The MoE genes of layers beyond their stage's depth set to 1 (xp: jnp or np)."""
    if "depth" in values:
      used = self.used_layers(xp.asarray(values["depth"]))
      for name in LAYER_GENES:
        values[name] = xp.where(used, values[name], 1).astype(values[name].dtype)
    return Arch(**values)

  def validate(self, arch: Arch) -> Arch:
    """Checks one candidate or a population on the host; returns it, canonical (`clip`:
    the MoE genes of layers beyond their stage's depth set to 1), as int32 NumPy arrays.

    Raises ValueError naming the first bad gene, position and value and its legal range.
    """
    given, names = present(arch), [gene.name for gene in self.genes]
    if set(given) != set(names):
      raise ValueError(f"the arch has the genes {sorted(given)}, the search space {names}; "
                       f"give exactly those")
    values = {}
    for gene in self.genes:
      value, size = np.asarray(given[gene.name]), len(gene.maxima)
      if value.dtype.kind not in "iu":
        raise ValueError(f"{gene.name} must hold integers, got dtype {value.dtype}: {value!r}")
      if value.ndim not in (1, 2) or value.shape[-1] != size:
        raise ValueError(f"arch.{gene.name} has shape {value.shape}; the supernet has {size} "
                         f"{gene.unit}s, so give [{size}] values (or [P, {size}] for a "
                         f"population)")
      values[gene.name] = value.astype(np.int32)
    shapes = {name: value.shape[:-1] for name, value in values.items()}
    if len(set(shapes.values())) > 1:
      raise ValueError(f"the genes have different population shapes {shapes}; give every "
                       f"gene for the same candidates")
    for gene in self.genes:
      value, maxima = values[gene.name], np.asarray(gene.maxima)
      bad = (value < 1) | (value > maxima)
      if bad.any():
        where = _first(bad)
        raise ValueError(f"{gene.name}{list(where)} = {value[where]} must be in "
                         f"1..{maxima[where[-1]]}, the legal values of {gene.unit} "
                         f"{where[-1]}")
      cap = values.get(gene.capped_by)
      if cap is not None and (value > cap).any():
        where = _first(value > cap)
        raise ValueError(f"{gene.name}{list(where)} = {value[where]} must not exceed "
                         f"{gene.capped_by}{list(where)} = {cap[where]}")
    return self._canonical(values, np)

  def params(self, arch: Arch) -> np.ndarray:
    """Stored parameters of the standalone model with only the active experts (and its
    widths and depths)."""
    experts = np.asarray(arch.num_experts, np.int64)
    layers = [layer.params(experts[..., i]) for i, layer in enumerate(self.layers)]
    return (self.base_params + self._used(arch, layers, 0).sum(-1)
            + self._width_costs(arch, "params") + self._router(experts, "params"))

  def macs(self, arch: Arch) -> np.ndarray:
    """Multiply-accumulates per image on the active path.

    Capacity padding is not counted: it is what a per-token implementation on the device
    would run.
    """
    experts = np.asarray(arch.num_experts, np.int64)
    return (self.base_macs + self.layer_macs(arch).sum(-1) + self._width_costs(arch, "macs")
            + self._router(experts, "macs"))

  def layer_macs(self, arch: Arch) -> np.ndarray:
    """[..., L]: each MoE layer's MACs per image with its `layer_costs`, 0 where unused."""
    experts = np.asarray(arch.num_experts, np.int64)
    top_k = np.asarray(arch.top_k, np.int64)
    return self._used(arch, [layer.macs(experts[..., i], top_k[..., i])
                             for i, layer in enumerate(self.layers)], 1)

  def _used(self, arch: Arch, layers: list[np.ndarray], column: int) -> np.ndarray:
    """[..., L]: the MoE layers' costs plus their `layer_costs` (column 0: params, 1: MACs)
    where used, else 0."""
    depth = None if arch.depth is None else np.asarray(arch.depth, np.int64)
    surroundings = (np.asarray([cost[column] for cost in self.layer_costs], np.int64)
                    if self.layer_costs else 0)
    return self.used_layers(depth) * (np.stack(layers, -1) + surroundings)

  def _width_costs(self, arch: Arch, cost: str) -> Any:
    """The width blocks' params or MACs."""
    width = None if arch.width is None else np.asarray(arch.width, np.int64)
    return sum(block.costs(width, cost) for block in self.width_blocks)

  def _router(self, experts: np.ndarray, cost: str) -> np.ndarray:
    return 0 if self.router is None else getattr(self.router, cost)(experts)
