"""Expert pruning: drop the experts that a candidate's routers rarely use.

`expert_usage` measures, on a calibration split, the share of each MoE layer's routed token
choices that each expert takes (choices kept after capacity, as `expert_counts` reports them).
`prune` keeps the experts whose share reaches `min_fraction` (always at least the most used
one) and lowers the candidate's `num_experts` to their count. A candidate uses the first n
experts of a layer, so the kept experts move to the front in their original order, with the
router's columns, and the removed ones follow. The result is still the supernet's state, with
the same shapes (the compiled evaluators still fit); `export.standalone` of the pruned arch is
the smaller model. In the conv-MoE families (`resnet_moe`, `vgg_moe`) one image router serves
every layer, so the experts are pathways and the order is shared by all layers
(`_prune_pathways`); usage counts images.

Axis letters: B batch · D width · E experts (E_max of the layer) · L MoE layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moenas_jax import hosts, models, moe
from moenas_jax.models import resnet_moe, vgg_moe
from moenas_jax.data import pipeline
from moenas_jax.search_space import Arch

Path = tuple[Any, ...]


def expert_usage(graphdef: nnx.GraphDef, params: nnx.State, state: nnx.State, arch: Arch,
                 examples: pipeline.Examples, *, batch_size: int) -> list[np.ndarray]:
  """Per MoE layer, float64 [E]: each expert's share of the layer's kept token choices.

  Counted over every example of `examples` for the candidate `arch` (inactive experts get 0;
  the active ones sum to 1). Each example is routed on its own, exactly as in a batch (routing
  groups never span images), so the padded rows of the last batch are masked out exactly. One
  jitted function serves every batch and every arch (traced) of the same graphdef and shapes.
  """
  model = nnx.merge(graphdef, params, state)
  space = model.search_space()
  arch = space.validate(arch)
  if arch.num_experts.ndim != 1:
    raise ValueError(f"expert_usage() takes one candidate, got a population of shape "
                     f"{arch.num_experts.shape}; unstack it first")
  if not len(examples["label"]):
    raise ValueError("the calibration split has no examples; give at least one")
  for (path, layer), shape in zip(_moe_modules(model), space.layers):
    if layer.group_size is not None and shape.tokens % layer.group_size:
      raise ValueError(f"MoE layer {path} routes groups of group_size={layer.group_size} "
                       f"tokens, which span its {shape.tokens}-token images; expert usage is "
                       f"counted per image: build the supernet with group_size=None or a "
                       f"divisor of {shape.tokens}")

  totals = tuple(jnp.zeros(size, jnp.int32) for size in space.max_experts)
  arch = jax.tree.map(jnp.asarray, arch)
  for batch in pipeline.eval_batches(examples, batch_size):
    totals = usage_counts(_Same(graphdef), params, state, arch, batch["image"], batch["mask"],
                         totals)
  return [np.asarray(total, np.float64) / max(int(total.sum()), 1)
          for total in hosts.to_host(totals)]


class _Same:
  """A graphdef as a static jit argument, equal only to itself (a GraphDef is not hashable)."""

  def __init__(self, graphdef: nnx.GraphDef):
    self.graphdef = graphdef

  def __hash__(self) -> int:
    return id(self.graphdef)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, _Same) and other.graphdef is self.graphdef


@functools.partial(jax.jit, static_argnums=0)
def usage_counts(model: _Same, params: nnx.State, state: nnx.State, arch: Arch,
                 images: jax.Array, mask: jax.Array,
                 totals: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """totals (L arrays [E]) plus the kept choices per expert of the valid images [B, H, W, C].

  The jitted step of `expert_usage` (its compilations are counted under this name).
  """
  def one(image):  # one image, routed on its own → L arrays [E]
    _, _, aux = models.apply(model.graphdef, params, state, image[None], arch)
    return aux["expert_counts"]

  counts = jax.vmap(one)(images)  # L arrays [B, E]
  return tuple(total + jnp.where(mask[:, None], count, 0).sum(0)
               for total, count in zip(totals, counts))


def prune(params: nnx.State, arch: Arch, usage: list[np.ndarray], *,
          min_fraction: float) -> tuple[nnx.State, Arch, list[dict[str, Any]]]:
  """Removes the active experts whose usage is below `min_fraction` of their layer's choices.

  Returns the supernet params with each layer's kept experts first (expert weights and router
  columns permuted alike; every other weight copied unchanged), the arch with num_experts = the
  number kept and top_k clipped to it (its other genes unchanged), and per layer a report:
  `usage` of the active experts, `kept` and `removed` (original expert indices; new expert i
  is old `kept[i]`), `num_experts` and `top_k` as (before, after). The most used expert
  stays even if below the threshold. Under the new arch the pruned params send every token to
  the same experts as the old ones under `arch` when no token chose a removed expert; the
  outputs then differ only by the softmax mass the removed experts held (none once it
  underflows) and by fewer capacity drops (the kept experts' capacity can only grow).
  """
  if not 0.0 <= min_fraction <= 1.0:  # also rejects NaN
    raise ValueError(f"min_fraction={min_fraction!r} must be in [0, 1]: the least share of a "
                     f"layer's routed choices that keeps an expert (e.g. 0.05)")
  conv_blocks = _conv_blocks(params)
  layers = {} if conv_blocks else _moe_params(params)
  sizes = ([experts for experts, _, _ in conv_blocks] if conv_blocks
           else [_num_experts(leaves) for leaves in layers.values()])
  num_experts, top_k = moe.check_arch(arch.num_experts, arch.top_k, max_experts=max(sizes),
                                      max_top_k=max(sizes))
  if num_experts.shape != (len(sizes),):
    raise ValueError(f"prune() takes one candidate with [{len(sizes)}] values (one per MoE "
                     f"layer), got num_experts of shape {num_experts.shape}")
  if len(usage) != len(sizes) or any(np.shape(u) != (e,) for u, e in zip(usage, sizes)):
    raise ValueError(f"usage must hold one array per MoE layer of shapes "
                     f"{[(e,) for e in sizes]} (from expert_usage), got shapes "
                     f"{[np.shape(u) for u in usage]}")
  for layer, (n, size) in enumerate(zip(num_experts, sizes)):
    if n > size:
      raise ValueError(f"num_experts[{layer}] = {n} exceeds the {size} experts of MoE layer "
                       f"{layer}")
  if conv_blocks:
    params, pruned, report = _prune_pathways(params, num_experts, top_k, usage, min_fraction,
                                             conv_blocks)
    return params, arch.replace(num_experts=pruned.num_experts, top_k=pruned.top_k), report
  axes = _expert_axes()
  permuted, report = {}, []
  for layer, ((path, leaves), size) in enumerate(zip(layers.items(), sizes)):
    n, k = int(num_experts[layer]), int(top_k[layer])
    share = np.asarray(usage[layer], np.float64)[:n]
    kept = [e for e in range(n) if share[e] >= min_fraction] or [int(np.argmax(share))]
    removed = [e for e in range(n) if e not in kept]
    if removed:
      order = np.asarray(kept + removed + list(range(n, size)))
      for name, variable in leaves.items():
        if axes[name] is not None:
          permuted[(*path, name)] = jnp.take(variable.get_value(), order, axis=axes[name])
    num_experts[layer], top_k[layer] = len(kept), min(k, len(kept))
    report.append({"usage": share.tolist(), "kept": kept, "removed": removed,
                   "num_experts": (n, len(kept)), "top_k": (k, int(top_k[layer]))})
  new_params = nnx.map_state(
      lambda path, variable: variable.copy(permuted.get(path, variable.get_value())), params)
  return new_params, arch.replace(num_experts=num_experts, top_k=top_k), report


def _conv_blocks(params: nnx.State) -> list[tuple[int, int, list[Path]]]:
  """(E, W, kernel paths) of each convolutional MoE layer of a conv-MoE model (`resnet_moe`,
  `vgg_moe`) with a router ([] for another family): its kernels hold E channel blocks of W."""
  for family in (resnet_moe, vgg_moe):
    blocks = family.expert_layers(params)
    if blocks:
      return blocks
  return []


def _prune_pathways(params: nnx.State, num_experts: np.ndarray, top_k: np.ndarray,
                    usage: list[np.ndarray], min_fraction: float,
                    blocks: list[tuple[int, int, list[Path]]]
                    ) -> tuple[nnx.State, Arch, list[dict]]:
  """`prune` for one image router shared by every MoE layer (`conv_moe`): experts are
  pathways.

  Every layer scores the experts with the same router columns, so one order serves all:
  the experts that some layer keeps (share ≥ min_fraction of its images, or its most used
  one) go first in their original order, then the rest. A layer's kept experts are those of
  its first n that any layer keeps, a prefix of that order; its n drops to their count. The
  router head's columns and each layer's channel blocks (of all its convs) are permuted
  alike (a layer with E < E_r experts takes the order's experts below E, which agrees with
  the router on the kept prefix: the only experts the pruned arch uses).
  """
  keep = set()
  for n, share in zip(num_experts, usage):
    keep |= {e for e in range(n) if share[e] >= min_fraction}
  for n, share in zip(num_experts, usage):
    if not keep & set(range(n)):
      keep.add(int(np.argmax(share[:n])))
  order = sorted(keep) + [e for e in range(max(e for e, _, _ in blocks)) if e not in keep]
  permuted, report = {}, []
  for b, ((experts, width, kernels), n, k) in enumerate(zip(blocks, num_experts.tolist(),
                                                            top_k.tolist())):
    kept = [e for e in sorted(keep) if e < n]
    num_experts[b], top_k[b] = len(kept), min(k, len(kept))
    report.append({"usage": np.asarray(usage[b], np.float64)[:n].tolist(), "kept": kept,
                   "removed": [e for e in range(n) if e not in keep],
                   "num_experts": (n, len(kept)), "top_k": (k, int(top_k[b]))})
    channels = (np.asarray([e for e in order if e < experts])[:, None] * width
                + np.arange(width)).ravel()
    for path in kernels:
      permuted[path] = channels
  if any(layer["removed"] for layer in report):
    permuted[("router", "head", "kernel")] = permuted[("router", "head", "bias")] = order
    params = nnx.map_state(
        lambda path, variable: variable.copy(
            jnp.take(variable.get_value(), np.asarray(permuted[path]), axis=-1)
            if path in permuted else variable.get_value()), params)
  return params, Arch(num_experts, top_k), report


def _block_params(max_experts: int) -> list[tuple[Path, nnx.Variable]]:
  """The parameters of a small abstract `MoEFeedForward` (D = 3, H = 5: sizes unlike E)."""
  block = nnx.eval_shape(lambda: moe.MoEFeedForward(3, 5, max_experts=max_experts,
                                                    rngs=nnx.Rngs(0)))
  return list(nnx.to_flat_state(nnx.state(block, nnx.Param)))


@functools.cache
def _expert_axes() -> dict[str, int | None]:
  """The expert axis of each parameter of an `MoEFeedForward` (None: shared by the experts).

  Read from moe.py's own block with E = 2, so every parameter it gives a block is found,
  whatever its name: the [E, ...] expert weights and the [D, E] router alike.
  """
  return {path[-1]: (variable.shape.index(2) if 2 in variable.shape else None)
          for path, variable in _block_params(2)}


@functools.cache
def _layer_names() -> tuple[frozenset[str], frozenset[str]]:
  """Parameter names of an MoE layer: with a router (E > 1) and without (E = 1)."""
  return tuple(frozenset(path[-1] for path, _ in _block_params(e)) for e in (2, 1))


def _num_experts(leaves: dict[str, nnx.Variable]) -> int:
  """E of one MoE layer, read from a parameter with an expert axis."""
  axes = _expert_axes()
  return next(variable.shape[axes[name]] for name, variable in leaves.items()
              if axes[name] is not None)


def _moe_params(params: nnx.State) -> dict[Path, dict[str, nnx.Variable]]:
  """The parameters of each MoE layer (keyed by the layer's path), in layer order.

  A layer is a module whose parameter names are those of an `MoEFeedForward`. Path order is
  the model's layer order (the order of `expert_counts`): stages, then layers in a stage.
  """
  modules: dict[Path, dict[str, nnx.Variable]] = {}
  for path, variable in nnx.to_flat_state(params):
    modules.setdefault(path[:-1], {})[path[-1]] = variable
  layers = {path: modules[path] for path in sorted(modules)
            if frozenset(modules[path]) in _layer_names()}
  if not layers:
    raise ValueError("params hold no MoE layer (MoEFeedForward parameters); pass the "
                     "supernet's nnx.Param state (models.split(model)[1])")
  return layers


def _moe_modules(model: nnx.Module) -> list[tuple[Path, moe.MoEFeedForward]]:
  """The MoE blocks of a model, in layer order (as in `_moe_params`)."""
  return sorted(((path, module) for path, module in nnx.iter_modules(model)
                 if isinstance(module, moe.MoEFeedForward)), key=lambda item: item[0])
