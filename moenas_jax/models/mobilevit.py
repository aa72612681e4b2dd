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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moenas_jax import moe, search_space
from moenas_jax.models import layers
from moenas_jax.search_space import Arch

NAME = "mobilevit_v2"
_STAGE_WIDTHS = (64, 128, 256, 384, 512)
_ATTENTION_WIDTHS = (128, 192, 256)


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

  def __call__(self, x, num_experts, top_k, *, train, key):
    batch, height, width, _ = x.shape
    p = self.patch
    y = self.to_tokens(self.local(x, train))
    # Unfold [B, H, W, D] → [B, P = p·p pixels of a patch, N = patches, D].
    y = y.reshape(batch, height // p, p, width // p, p, self.dim).transpose(0, 2, 4, 1, 3, 5)
    y = y.reshape(batch, p * p, (height // p) * (width // p), self.dim)
    metrics = []
    for i, layer in enumerate(self.transformer):
      layer_key = None if key is None else jax.random.fold_in(key, i)
      y, layer_metrics = layer(y, num_experts[i], top_k[i], train=train, key=layer_key)
      metrics.append(layer_metrics)
    y = self.norm(y).reshape(batch, p, p, height // p, width // p, self.dim)
    y = y.transpose(0, 3, 1, 4, 2, 5).reshape(batch, height, width, self.dim)
    return self.project(y, train), metrics

  def base_macs(self, height: int, width: int) -> int:
    """MACs of everything but the MoE feed-forwards."""
    tokens = height * width
    attention = sum(layer.attention.macs(tokens) for layer in self.transformer)
    return (self.local.macs(height, width) + tokens * self.channels * self.dim + attention
            + self.project.macs(height, width))


def _per_layer(value: int | Sequence[int], count: int, name: str) -> tuple[int, ...]:
  values = (int(value),) * count if isinstance(value, numbers.Integral) else tuple(value)
  if len(values) != count:
    raise ValueError(f"{name} has {len(values)} entries but the model has {count} MoE layers "
                     f"(sum of depths); give one int or {count} values")
  return values


class MobileViTV2(nnx.Module):
  """The MoE supernet (or, with per-layer maxima, a standalone candidate)."""

  def __init__(self, *, num_classes: int, image_size: Sequence[int] = (32, 32),
               channels: int = 3, width_multiplier: float = 1.0,
               depths: Sequence[int] = (2, 4, 3), strides: Sequence[int] = (1, 1, 2, 2, 2, 2),
               patch_size: int = 2, expand_ratio: float = 2.0, ffn_multiplier: float = 2.0,
               max_experts: int | Sequence[int] = 8, max_top_k: int | Sequence[int] = 1,
               moe_settings: dict[str, Any] | None = None, rngs: nnx.Rngs):
    if len(depths) != 3 or min(depths) < 1:
      raise ValueError(f"depths must be 3 positive transformer depths, got {tuple(depths)}")
    if len(strides) != 6 or any(s not in (1, 2) for s in strides):
      raise ValueError(f"strides must be 6 values in {{1, 2}} (stem and 5 stages), got "
                       f"{tuple(strides)}")
    if not width_multiplier > 0 or num_classes < 1 or patch_size < 1:
      raise ValueError(f"need width_multiplier > 0, num_classes >= 1 and patch_size >= 1; got "
                       f"{width_multiplier}, {num_classes}, {patch_size}")
    image_size = tuple(image_size)
    layers.check_image_size(NAME, image_size, math.prod(strides))
    self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                       width_multiplier=width_multiplier, depths=tuple(depths),
                       strides=tuple(strides), patch_size=patch_size,
                       expand_ratio=expand_ratio, ffn_multiplier=ffn_multiplier,
                       max_experts=max_experts, max_top_k=max_top_k,
                       moe_settings=dict(moe_settings or {}))
    self.input_shape = (*image_size, channels)
    num_layers = sum(depths)
    self.max_experts = _per_layer(max_experts, num_layers, "max_experts")
    self.max_top_k = _per_layer(max_top_k, num_layers, "max_top_k")
    moe.check_arch(self.max_experts, self.max_top_k, max_experts=max(self.max_experts),
                   max_top_k=max(self.max_top_k))

    alpha = width_multiplier
    widths = [layers.make_divisible(min(max(32 * alpha, 16), 64), 8, 16)]
    widths += [layers.make_divisible(c * alpha, 16 if i == 0 else 8)
               for i, c in enumerate(_STAGE_WIDTHS)]
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

  def __call__(self, images: jax.Array, arch: Arch | None = None, *, train: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, num_classes] and MoE metrics for a candidate (None: every expert, max k).

    `key` drives the gate noise in training. Metrics: `aux_loss` (summed over layers),
    `drop_fraction` [L], `expert_counts` (a tuple of L arrays [E_l]).
    """
    layers.check_images(NAME, images, self.input_shape)
    if arch is None:
      arch = Arch(jnp.asarray(self.max_experts, jnp.int32), jnp.asarray(self.max_top_k, jnp.int32))
    layers_count = len(self.max_experts)
    if not jnp.shape(arch.num_experts) == jnp.shape(arch.top_k) == (layers_count,):
      raise ValueError(f"{NAME} takes one candidate, Arch with [{layers_count}] arrays; got "
                       f"shapes {jnp.shape(arch.num_experts)} and {jnp.shape(arch.top_k)}. "
                       f"For a population [P, {layers_count}] use jax.vmap over the arch.")
    x = self.stem(images, train)
    x = self.stage1(x, train)
    for block in self.stage2:
      x = block(x, train)
    metrics, first = [], 0
    for stage, (down, vit) in enumerate(zip(self.downsample, self.vit)):
      depth = len(vit.transformer)
      stage_key = None if key is None else jax.random.fold_in(key, stage)
      x, stage_metrics = vit(down(x, train), arch.num_experts[first:first + depth],
                             arch.top_k[first:first + depth], train=train, key=stage_key)
      metrics += stage_metrics
      first += depth
    logits = self.head(x.mean(axis=(1, 2)))
    return logits, {
        "aux_loss": sum(m["aux_loss"] for m in metrics),
        "drop_fraction": jnp.stack([m["drop_fraction"] for m in metrics]),
        "expert_counts": tuple(m["expert_counts"] for m in metrics),
    }

  def search_space(self) -> search_space.SearchSpace:
    """The space of this supernet: per-layer maxima, MoE layer shapes, non-MoE costs."""
    shapes, base_macs, base_params = [], 0, 0
    height, width = self.input_shape[:2]
    for block in (self.stem, self.stage1, *self.stage2):
      base_macs += block.macs(height, width)
      height, width = layers.out_size(height, block.stride), layers.out_size(width, block.stride)
    for down, vit in zip(self.downsample, self.vit):
      base_macs += down.macs(height, width)
      height, width = layers.out_size(height, down.stride), layers.out_size(width, down.stride)
      base_macs += vit.base_macs(height, width)
      shapes += [search_space.MoELayerShape(vit.dim, vit.hidden, height * width)
                 for _ in vit.transformer]
    base_macs += self.head.in_features * self.head.out_features
    for path, leaf in nnx.to_flat_state(nnx.state(self, nnx.Param)):
      if "ffn" not in path:
        base_params += math.prod(leaf.get_value().shape)
    return search_space.SearchSpace(max_experts=self.max_experts, max_top_k=self.max_top_k,
                                    layers=tuple(shapes), base_params=base_params,
                                    base_macs=base_macs)


def dense(**config: Any) -> MobileViTV2:
  """Dense MobileViT-V2: the supernet with one expert and top-1 in every layer."""
  return MobileViTV2(**{**config, "max_experts": 1, "max_top_k": 1})
