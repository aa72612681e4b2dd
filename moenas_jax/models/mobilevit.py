"""MobileViT-V2-style MoE supernet for small images (28 to 64 px).

Layout (Mehta & Rastegari 2022, widths times `width_multiplier` α): conv stem → MobileNetV2
stage (64α) → two MobileNetV2 blocks (128α) → three stages of [MobileNetV2 block (stride),
MobileViT-V2 block]: (256α, attention width 128α, depths[0] transformer layers), (384α, 192α,
depths[1]), (512α, 256α, depths[2]) → global average pool → linear classifier.

A MobileViT-V2 block: depthwise 3x3 + pointwise to width d, unfold into patch pixels P and
patches N, transformer layers (pre-norm separable linear self-attention, pre-norm feed-forward),
norm, fold, 1x1 projection back. Every feed-forward is an `MoEFeedForward` on the P · N tokens
of an image: that is where the search acts. The L = sum(depths) MoE layers take a candidate
`Arch(num_experts[L], top_k[L])`; `num_experts = 1` everywhere is the dense MobileViT-V2.
A stage whose map is not divisible by `patch_size` uses 1x1 patches (attention over all pixels).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moenas_jax import moe, search_space
from moenas_jax.models import layers
from moenas_jax.search_space import Arch

NAME = "mobilevit_v2"
_STAGE_WIDTHS = (64, 128, 256, 384, 512)
# The stages, in order, that can form a frozen trunk (`MobileViTV2.freeze_trunk`): none has
# an MoE or depth gene; stage1 and stage2 have the width gene.
TRUNK_STAGES = ("stem", "stage1", "stage2")
_ATTENTION_WIDTHS = (128, 192, 256)


def _mask(x: jax.Array, channels: Any) -> jax.Array:
  """x with the channels from `channels` on set to 0 (None: x)."""
  return x if channels is None else layers.mask_channels(x, channels)


class LinearSelfAttention(nnx.Module):
  """Separable self-attention: one query score per token, softmax over the N patches."""

  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.qkv = nnx.Linear(dim, 1 + 2 * dim, rngs=rngs)
    self.out = nnx.Linear(dim, dim, rngs=rngs)
    self.dim = dim

  def __call__(self, x: jax.Array) -> jax.Array:  # x: [B, P, N, D]
    query, key, value = jnp.split(self.qkv(x), [1, 1 + self.dim], axis=-1)
    scores = jax.nn.softmax(query[..., 0], axis=-1)  # [B, P, N]
    context = jnp.einsum("bpnd,bpn->bpd", key, scores)
    return self.out(jax.nn.relu(value) * context[:, :, None, :])

  def macs(self, tokens: int) -> int:
    return tokens * (self.dim * (1 + 2 * self.dim) + self.dim + self.dim * self.dim)


class TransformerLayer(nnx.Module):
  """Pre-norm attention and pre-norm MoE feed-forward, each with a residual."""

  def __init__(self, dim: int, hidden: int, *, max_experts: int, max_top_k: int,
               moe_settings: dict[str, Any], rngs: nnx.Rngs):
    self.attention_norm = nnx.GroupNorm(dim, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.attention = LinearSelfAttention(dim, rngs=rngs)
    self.ffn_norm = nnx.GroupNorm(dim, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.ffn = moe.MoEFeedForward(dim, hidden, max_experts=max_experts, max_top_k=max_top_k,
                                  rngs=rngs, **moe_settings)

  def __call__(self, x, num_experts, top_k, *, train, key):  # x: [B, P, N, D]
    x = x + self.attention(self.attention_norm(x))
    batch, pixels, patches, dim = x.shape
    tokens = self.ffn_norm(x).reshape(batch, pixels * patches, dim)
    y, metrics = self.ffn(tokens, num_experts, top_k, train=train, key=key)
    return x + y.reshape(x.shape), metrics


class MobileViTBlock(nnx.Module):
  """Local conv representation → transformer layers over unfolded patches → fold → project."""

  def __init__(self, channels: int, dim: int, *, depth: int, patch: int, ffn_multiplier: float,
               max_experts: Sequence[int], max_top_k: Sequence[int],
               moe_settings: dict[str, Any], rngs: nnx.Rngs):
    self.local = layers.ConvBN(channels, channels, 3, groups=channels, activation="silu",
                               rngs=rngs)
    self.to_tokens = nnx.Conv(channels, dim, (1, 1), use_bias=False, rngs=rngs)
    hidden = int(dim * ffn_multiplier) // 16 * 16
    self.transformer = nnx.List([
        TransformerLayer(dim, hidden, max_experts=max_experts[i], max_top_k=max_top_k[i],
                         moe_settings=moe_settings, rngs=rngs) for i in range(depth)])
    self.norm = nnx.GroupNorm(dim, num_groups=1, epsilon=1e-5, rngs=rngs)
    self.project = layers.ConvBN(dim, channels, 1, activation=None, rngs=rngs)
    self.patch, self.dim, self.hidden, self.channels = patch, dim, hidden, channels

  def __call__(self, x, num_experts, top_k, *, train, key, channels=None, depth=None):
    """`channels`: the active width of a width candidate (its other channels are 0 in x and
    set to 0 here); `depth`: its layers used (the others pass their input through and count
    nothing in the metrics). None: every channel, every layer."""
    y = self.unfold(x, train, channels)
    metrics = []
    for i, layer in enumerate(self.transformer):
      layer_key = None if key is None else jax.random.fold_in(key, i)
      out, layer_metrics = layer(y, num_experts[i], top_k[i], train=train, key=layer_key)
      if depth is not None:
        used = i < depth
        out = jnp.where(used, out, y)
        layer_metrics = jax.tree.map(lambda m, used=used: jnp.where(used, m, 0), layer_metrics)
      y = out
      metrics.append(layer_metrics)
    return self.fold(y, x.shape, train, channels), metrics

  def unfold(self, x: jax.Array, train: bool, channels: Any = None) -> jax.Array:
    """The local representation of x [B, H, W, C] as tokens [B, P = p·p pixels of a patch,
    N = patches, D]."""
    batch, height, width, _ = x.shape
    p = self.patch
    y = self.to_tokens(_mask(self.local(x, train), channels))
    y = y.reshape(batch, height // p, p, width // p, p, self.dim).transpose(0, 2, 4, 1, 3, 5)
    return y.reshape(batch, p * p, (height // p) * (width // p), self.dim)

  def fold(self, y: jax.Array, shape: Sequence[int], train: bool,
           channels: Any = None) -> jax.Array:
    """Tokens [B, P, N, D] normed, folded back to the block's input `shape` and projected."""
    batch, height, width, _ = shape
    p = self.patch
    y = self.norm(y).reshape(batch, p, p, height // p, width // p, self.dim)
    y = y.transpose(0, 3, 1, 4, 2, 5).reshape(batch, height, width, self.dim)
    return _mask(self.project(y, train), channels)

  def costs(self, height: int, width: int, channels: int) -> tuple[int, int]:
    """(params, MACs per image) outside the transformer layers, built for `channels`."""
    tokens = height * width
    local = self.local.costs(height, width, channels, channels)
    project = self.project.costs(height, width, self.dim, channels)
    return (local[0] + channels * self.dim + 2 * self.dim + project[0],
            local[1] + tokens * channels * self.dim + project[1])

  def layer_costs(self, height: int, width: int) -> tuple[int, int]:
    """(params, MACs per image) of one transformer layer outside its MoE feed-forward: the
    attention (qkv and output projections with biases) and the two norms."""
    dim = self.dim
    params = dim * (1 + 2 * dim) + 1 + 2 * dim + dim * dim + dim + 4 * dim
    return params, self.transformer[0].attention.macs(height * width)


def _per_layer(value: int | Sequence[int], count: int, name: str) -> tuple[int, ...]:
  values = (int(value),) * count if isinstance(value, numbers.Integral) else tuple(value)
  if len(values) != count:
    raise ValueError(f"{name} has {len(values)} entries but the model has {count} MoE layers "
                     f"(sum of depths); give one int or {count} values")
  return values


def check_width_choices(width_choices: Sequence[float]) -> tuple[float, ...]:
  """The multipliers of a width gene: ascending, in (0, 1], the last 1.0 (the supernet)."""
  choices = tuple(width_choices)
  if (not choices or any(not isinstance(m, numbers.Real) or not 0 < m <= 1 for m in choices)
      or list(choices) != sorted(set(choices)) or choices[-1] != 1.0):
    raise ValueError(f"width_choices must be distinct ascending multipliers in (0, 1] ending "
                     f"with 1.0 (the supernet's full width), got {choices}; e.g. "
                     f"(0.5, 0.75, 1.0), or (1.0,) for no width gene")
  return choices


class MobileViTV2(nnx.Module):
  """The MoE supernet (or, with per-layer maxima, a standalone candidate).

  Width and depth genes (OFA / BigNAS style, weights built at the maxima): with several
  `width_choices`, gene `width` picks per searched stage (stage1, stage2 and the three
  MobileViT stages; not the stem) the first make_divisible(channels · multiplier, 8)
  channels; with `search_depth`, gene `depth` picks the first transformer layers of each
  MobileViT stage. Both act as masks, so candidates share one compiled function. A
  standalone candidate gives its channel counts as `stage_widths` and its depths as
  `depths`.

  Frozen trunk (`freeze_trunk(k)`): the model takes the features of its first k stages
  (`trunk(images)`) instead of images and runs only the stages after them (the tail).
  """

  def __init__(self, *, num_classes: int, image_size: Sequence[int] = (32, 32),
               channels: int = 3, width_multiplier: float = 1.0,
               depths: Sequence[int] = (2, 4, 3), strides: Sequence[int] = (1, 1, 2, 2, 2, 2),
               patch_size: int = 2, expand_ratio: float = 2.0, ffn_multiplier: float = 2.0,
               max_experts: int | Sequence[int] = 8, max_top_k: int | Sequence[int] = 1,
               moe_settings: dict[str, Any] | None = None,
               width_choices: Sequence[float] = (1.0,), search_depth: bool = False,
               stage_widths: Sequence[int] | None = None, rngs: nnx.Rngs):
    if len(depths) != 3 or min(depths) < 1:
      raise ValueError(f"depths must be 3 positive transformer depths, got {tuple(depths)}")
    if len(strides) != 6 or any(s not in (1, 2) for s in strides):
      raise ValueError(f"strides must be 6 values in {{1, 2}} (stem and 5 stages), got "
                       f"{tuple(strides)}")
    if not width_multiplier > 0 or num_classes < 1 or patch_size < 1:
      raise ValueError(f"need width_multiplier > 0, num_classes >= 1 and patch_size >= 1; got "
                       f"{width_multiplier}, {num_classes}, {patch_size}")
    if not isinstance(search_depth, bool):
      raise ValueError(f"search_depth must be True or False, got {search_depth!r}")
    width_choices = check_width_choices(width_choices)
    if stage_widths is not None and (
        len(stage_widths) != len(_STAGE_WIDTHS)
        or any(not isinstance(c, numbers.Integral) or c < 1 for c in stage_widths)):
      raise ValueError(f"stage_widths must be {len(_STAGE_WIDTHS)} positive channel counts "
                       f"(stage1, stage2, three MobileViT stages) or None, got {stage_widths}")
    image_size = tuple(image_size)
    layers.check_image_size(NAME, image_size, math.prod(strides))
    self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                       width_multiplier=width_multiplier, depths=tuple(depths),
                       strides=tuple(strides), patch_size=patch_size,
                       expand_ratio=expand_ratio, ffn_multiplier=ffn_multiplier,
                       max_experts=max_experts, max_top_k=max_top_k,
                       moe_settings=dict(moe_settings or {}), width_choices=width_choices,
                       search_depth=search_depth,
                       stage_widths=None if stage_widths is None else tuple(stage_widths))
    self.input_shape = (*image_size, channels)
    self.depths, self.search_depth = tuple(depths), search_depth
    num_layers = sum(depths)
    self.max_experts = _per_layer(max_experts, num_layers, "max_experts")
    self.max_top_k = _per_layer(max_top_k, num_layers, "max_top_k")
    moe.check_arch(self.max_experts, self.max_top_k, max_experts=max(self.max_experts),
                   max_top_k=max(self.max_top_k))

    alpha = width_multiplier
    widths = [layers.make_divisible(min(max(32 * alpha, 16), 64), 8, 16)]
    widths += (list(stage_widths) if stage_widths is not None else
               [layers.make_divisible(c * alpha, 16 if i == 0 else 8)
                for i, c in enumerate(_STAGE_WIDTHS)])
    # [5][≤ W]: each searched stage's distinct channel counts over the width choices,
    # ascending (the last: all of them); gene value v takes the v-th, so one network has one
    # value (two multipliers that round to the same count are one choice).
    self.stage_channels = tuple(
        tuple(sorted({min(full, layers.make_divisible(full * m, 8)) for m in width_choices}))
        for full in widths[1:])
    self.stem = layers.ConvBN(channels, widths[0], 3, stride=strides[0], activation="silu",
                              rngs=rngs)
    mv2 = dict(expand_ratio=expand_ratio, activation="silu", rngs=rngs)
    self.stage1 = layers.InvertedResidual(widths[0], widths[1], stride=strides[1], **mv2)
    self.stage2 = nnx.List([
        layers.InvertedResidual(widths[1], widths[2], stride=strides[2], **mv2),
        layers.InvertedResidual(widths[2], widths[2], stride=1, **mv2)])
    self.downsample = nnx.List()
    self.vit = nnx.List()
    height, width = (layers.out_size(s, strides[0] * strides[1] * strides[2]) for s in image_size)
    first = 0
    for stage, depth in enumerate(depths):
      stride = strides[3 + stage]
      self.downsample.append(layers.InvertedResidual(widths[2 + stage], widths[3 + stage],
                                                     stride=stride, **mv2))
      height, width = layers.out_size(height, stride), layers.out_size(width, stride)
      patch = patch_size if height % patch_size == 0 and width % patch_size == 0 else 1
      self.vit.append(MobileViTBlock(
          widths[3 + stage], layers.make_divisible(_ATTENTION_WIDTHS[stage] * alpha, 8),
          depth=depth, patch=patch, ffn_multiplier=ffn_multiplier,
          max_experts=self.max_experts[first:first + depth],
          max_top_k=self.max_top_k[first:first + depth],
          moe_settings=dict(moe_settings or {}), rngs=rngs))
      first += depth
    self.head = nnx.Linear(widths[-1], num_classes, rngs=rngs)
    self.frozen_stages = 0

  def freeze_trunk(self, stages: int) -> None:
    """From now on the first `stages` of `TRUNK_STAGES` are a trunk outside the model's
    call: `__call__` takes `trunk(images)` and runs the tail only (0: images, every stage).
    Refuses a trunk with a searched gene."""
    if not 0 <= stages <= len(TRUNK_STAGES):
      raise ValueError(f"frozen stages must be in 0..{len(TRUNK_STAGES)} (the stem, stage1, "
                       f"stage2: the stages without MoE or depth genes), got {stages}")
    if self.searches_width and stages > 1:
      raise ValueError(f"{stages} frozen stages would freeze stage1's width gene "
                       f"(width_choices={self.config['width_choices']}); freeze only the "
                       f"stem (1), or search no width (width_choices=(1.0,))")
    self.frozen_stages = stages

  def frozen_names(self) -> tuple[str, ...]:
    """The top-level names of the frozen trunk's weights (`freeze_trunk`)."""
    return TRUNK_STAGES[:self.frozen_stages]

  def _trunk_stage(self, stage: int, x: jax.Array, train: bool, width: Any) -> jax.Array:
    """Stage `stage` of `TRUNK_STAGES` on x; `width(i)`: block i's active channels."""
    if stage == 0:
      return self.stem(x, train)
    if stage == 1:
      return self.stage1(x, train, width(0))
    for i, block in enumerate(self.stage2):
      x = block(x, train, width(1 + i))
    return x

  def trunk(self, images: jax.Array) -> jax.Array:
    """The frozen trunk's features of `images` (evaluation mode, full width): the input
    `__call__` takes after `freeze_trunk`."""
    layers.check_images(NAME, images, self.input_shape)
    x = images
    for stage in range(self.frozen_stages):
      x = self._trunk_stage(stage, x, False, lambda i: None)
    return x

  @property
  def searches_width(self) -> bool:
    return len(self.config["width_choices"]) > 1

  def full_arch(self) -> Arch:
    """Every expert, the maximal top-k, full width and depth: `search_space().largest()`
    (tested equal), without building the space's cost tables."""
    width = (jnp.asarray([len(row) for row in self.stage_channels], jnp.int32)
             if self.searches_width else None)
    return Arch(jnp.asarray(self.max_experts, jnp.int32), jnp.asarray(self.max_top_k, jnp.int32),
                width=width, depth=jnp.asarray(self.depths, jnp.int32) if self.search_depth
                else None)

  def _check_arch(self, arch: Arch) -> None:
    layers_count = len(self.max_experts)
    if not jnp.shape(arch.num_experts) == jnp.shape(arch.top_k) == (layers_count,):
      raise ValueError(f"{NAME} takes one candidate, Arch with [{layers_count}] arrays; got "
                       f"shapes {jnp.shape(arch.num_experts)} and {jnp.shape(arch.top_k)}. "
                       f"For a population [P, {layers_count}] use jax.vmap over the arch.")
    for name, searched, size in (("width", self.searches_width, len(self.stage_channels)),
                                 ("depth", self.search_depth, len(self.depths))):
      value = getattr(arch, name)
      if searched != (value is not None) or (searched and jnp.shape(value) != (size,)):
        raise ValueError(f"this {NAME} {'searches' if searched else 'has no'} gene {name}"
                         f"{f' ([{size}] values)' if searched else ''}; got arch.{name} = "
                         f"{value!r}. Build the arch from model.search_space()")

  def _active_widths(self, arch: Arch) -> list[tuple[Any, Any, Any]] | None:
    """Per searched block (stage1, stage2's two, the three downsamples): its traced
    (input, hidden, output) channels, then the three MobileViT blocks' channels; None when
    the width is not searched."""
    if not self.searches_width:
      return None
    size = max(len(row) for row in self.stage_channels)
    rows = [row + row[-1:] * (size - len(row)) for row in self.stage_channels]  # padded
    choice = jnp.clip(arch.width, 1, jnp.asarray([len(r) for r in self.stage_channels])) - 1

    def channels(stage):
      return jnp.asarray(rows[stage], jnp.int32)[choice[stage]]

    def hidden(block, stage):  # the block's expanded width for its input stage's channels
      return jnp.asarray([block.hidden_for(c) for c in rows[stage]], jnp.int32)[choice[stage]]

    stem = self.stage1.in_channels
    blocks = [(stem, self.stage1.hidden_for(stem), channels(0))]
    blocks += [(channels(i), hidden(block, i), channels(1)) for i, block in
               enumerate(self.stage2)]
    blocks += [(channels(1 + s), hidden(down, 1 + s), channels(2 + s))
               for s, down in enumerate(self.downsample)]
    return blocks + [channels(2 + s) for s in range(3)]

  def __call__(self, images: jax.Array, arch: Arch | None = None, *, train: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, num_classes] and MoE metrics for a candidate (None: every expert, max k,
    full width and depth).

    `key` drives the gate noise in training. Metrics: `aux_loss` (summed over layers),
    `drop_fraction` [L], `expert_counts` (a tuple of L arrays [E_l]); a layer beyond its
    stage's depth counts 0 in each. After `freeze_trunk`, `images` are `trunk(images)`.
    """
    if not self.frozen_stages:
      layers.check_images(NAME, images, self.input_shape)
    arch = self.full_arch() if arch is None else arch
    self._check_arch(arch)
    active = self._active_widths(arch)
    width = (lambda i: None) if active is None else (lambda i: active[i])
    x = images
    for stage in range(self.frozen_stages, len(TRUNK_STAGES)):
      x = self._trunk_stage(stage, x, train, width)
    metrics, first = [], 0
    for stage, (down, vit) in enumerate(zip(self.downsample, self.vit)):
      depth = len(vit.transformer)
      stage_key = None if key is None else jax.random.fold_in(key, stage)
      x, stage_metrics = vit(down(x, train, width(3 + stage)),
                             arch.num_experts[first:first + depth],
                             arch.top_k[first:first + depth], train=train, key=stage_key,
                             channels=width(6 + stage),
                             depth=None if arch.depth is None else arch.depth[stage])
      metrics += stage_metrics
      first += depth
    logits = self.head(x.mean(axis=(1, 2)))
    return logits, {
        "aux_loss": sum(m["aux_loss"] for m in metrics),
        "drop_fraction": jnp.stack([m["drop_fraction"] for m in metrics]),
        "expert_counts": tuple(m["expert_counts"] for m in metrics),
    }

  def staged_config(self, arch: Arch) -> dict[str, Any]:
    """The config entries of candidate `arch`'s own model: its channels (`stage_widths`)
    and depths, with no width or depth gene."""
    config = {}
    if arch.width is not None:
      config.update(width_choices=(1.0,), stage_widths=tuple(
          row[value - 1] for row, value in zip(self.stage_channels, np.asarray(arch.width))))
    if arch.depth is not None:
      config.update(search_depth=False, depths=tuple(np.asarray(arch.depth).tolist()))
    return config

  def blocks(self, batch_size: int) -> list[tuple[nnx.Module, Callable, jax.ShapeDtypeStruct]]:
    """The blocks the search space prices, to time each alone in the model as built: (module,
    its inference call `apply(module, x)`, its input x [batch_size, ...]) for the width blocks
    in `search_space().width_blocks` order, then the transformer layers (attention and MoE
    feed-forward) in layer order."""
    found, transformer = [], []

    def add(module, apply, x):
      found.append((module, apply, x))
      return jax.eval_shape(lambda x: apply(module, x), x)

    def block(module, x):
      return module(x, False)

    def local(vit, x):  # a MobileViT block without its transformer layers
      return vit.fold(vit.unfold(x, False), x.shape, False)

    def layer(module, tokens):
      return module(tokens, jnp.int32(module.ffn.max_experts), jnp.int32(module.ffn.max_top_k),
                    train=False, key=None)[0]

    x = jax.eval_shape(lambda x: self.stem(x, False),
                       jax.ShapeDtypeStruct((batch_size, *self.input_shape), jnp.float32))
    for module in (self.stage1, *self.stage2):
      x = add(module, block, x)
    for down, vit in zip(self.downsample, self.vit):
      x = add(down, block, x)
      add(vit, local, x)
      tokens = jax.eval_shape(lambda x, vit=vit: vit.unfold(x, False), x)
      transformer += [(module, layer, tokens) for module in vit.transformer]
    add(self.head, lambda head, x: head(x.mean(axis=(1, 2))), x)
    return found + transformer

  def search_space(self) -> search_space.SearchSpace:
    """The space of this supernet: per-layer maxima, MoE layer shapes, the costs of the
    blocks by their active widths and of the transformer layers by depth, the rest."""
    options = self.stage_channels  # a position's channels per width value

    def block(name, source, target, cost):
      rows = options[source] if source is not None else (None,)
      cols = options[target] if target is not None else (None,)
      table = [[cost(a, b) for b in cols] for a in rows]
      return search_space.WidthBlock(
          name, source if self.searches_width else None, target if self.searches_width else None,
          *(tuple(tuple(entry[i] for entry in row) for row in table) for i in range(2)))

    height, width = self.input_shape[:2]
    base_macs = self.stem.macs(height, width)
    height, width = (layers.out_size(s, self.stem.stride) for s in (height, width))
    stem = self.stem.out_channels
    blocks, shapes, layer_costs = [], [], []
    ir_blocks = [("stage1", self.stage1, None, 0), ("stage2.0", self.stage2[0], 0, 1),
                 ("stage2.1", self.stage2[1], 1, 1)]
    ir_blocks += [(f"downsample{s}", down, 1 + s, 2 + s) for s, down in enumerate(self.downsample)]
    for index, (name, ir, source, target) in enumerate(ir_blocks):
      blocks.append(block(name, source, target, lambda a, b, ir=ir, h=height, w=width: ir.costs(
          h, w, stem if a is None else a, b)))
      height, width = (layers.out_size(s, ir.stride) for s in (height, width))
      if index >= 3:
        vit = self.vit[index - 3]
        blocks.append(block(f"vit{index - 3}", None, index - 1,
                            lambda _, b, vit=vit, h=height, w=width: vit.costs(h, w, b)))
        layer_costs += [vit.layer_costs(height, width)] * len(vit.transformer)
        shapes += [search_space.MoELayerShape(vit.dim, vit.hidden, height * width)
                   for _ in vit.transformer]
    classes = self.head.out_features
    blocks.append(block("head", len(options) - 1, None, lambda a, _: (a * classes + classes,
                                                                       a * classes)))
    base_params = -sum(b.params[-1][-1] for b in blocks) - sum(p for p, _ in layer_costs)
    for path, leaf in nnx.to_flat_state(nnx.state(self, nnx.Param)):
      if "ffn" not in path:
        base_params += math.prod(leaf.get_value().shape)
    return search_space.SearchSpace(
        max_experts=self.max_experts, max_top_k=self.max_top_k, layers=tuple(shapes),
        base_params=base_params, base_macs=base_macs,
        width_maxima=tuple(len(row) for row in options) if self.searches_width else (),
        width_blocks=tuple(blocks), depth_maxima=self.depths if self.search_depth else (),
        layer_costs=tuple(layer_costs))


def dense(**config: Any) -> MobileViTV2:
  """Dense MobileViT-V2: the supernet with one expert and top-1 in every layer, at full
  width and depth (no width or depth gene)."""
  return MobileViTV2(**{**config, "max_experts": 1, "max_top_k": 1, "width_choices": (1.0,),
                        "search_depth": False})
