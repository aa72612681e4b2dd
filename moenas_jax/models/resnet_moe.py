"""Convolutional MoE ResNet for CIFAR-size images (AdvMoE style, Zhang et al. ICCV 2023).

The layout of `resnet.ResNet` (depth 6n + 2: a dense 3x3 stem, three stages of n blocks),
with every 3x3 conv of a residual block an `MoEConvBN`: E x W output channels, expert e owning
the channel block [eW, (e+1)W), W = int(expert_ratio · planes) for the whole network (the
inference saving: ratio 0.5 halves every block's width). The stem, the 1x1 projection
shortcuts, the batch norms (on the W combined channels, shared by the experts) and the
classifier stay dense. One small CIFAR ResNet, the top-level `router` (depth `router_depth`,
width `router_width_multiplier`), scores each image once: [B, E_r] logits, E_r the largest
expert count; every block uses the same scores, so an expert is a whole pathway.

Per block b a candidate `Arch(num_experts[L], top_k[L])` (L = 3 · (depth − 2) / 6) masks the
scores to the first num_experts[b] experts; top-1 picks the argmax with a straight-through
one-hot (forward an exact one-hot, gradient the identity to the softmax probabilities, as the
reference passes it to the scores); top-k > 1 gates the k best by their softmax probabilities
renormalised over the k. Training computes all E x W channels and combines them with the
gates (the straight-through gradient needs every expert's output); evaluation gathers each
image's k chosen kernels and computes only those (what `SearchSpace.macs` counts). A block
with one expert is a plain conv of W channels; with one expert everywhere there is no router,
and at expert_ratio 1 the model is `resnet.ResNet`.

The shared pieces (routing, `MoEConvBN`, the router) are in `conv_moe`.

Axis letters: B batch · E experts · K choices per image · C channels of an expert block.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from moenas_jax import moe, search_space
from moenas_jax.models import conv_moe, layers
from moenas_jax.models.conv_moe import MoEConvBN, dense_gates, route  # noqa: F401
from moenas_jax.search_space import Arch

NAME = "resnet_moe"


class MoEBlock(nnx.Module):
  """A basic residual block of two `MoEConvBN`s sharing one routing, plus a dense shortcut."""

  def __init__(self, in_channels: int, width: int, stride: int, *, max_experts: int,
               max_top_k: int, rngs: nnx.Rngs):
    self.first = MoEConvBN(in_channels, width, experts=max_experts, stride=stride, rngs=rngs)
    self.second = MoEConvBN(width, width, experts=max_experts, activation=None, rngs=rngs)
    self.shortcut = (layers.ConvBN(in_channels, width, 1, stride=stride, activation=None,
                                   rngs=rngs)
                     if stride != 1 or in_channels != width else None)
    self.max_experts, self.max_top_k, self.stride = max_experts, max_top_k, stride

  def __call__(self, x: jax.Array, logits: jax.Array | None, num_experts: jax.Array,
               top_k: jax.Array, train: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """y and the block's metrics (`conv_moe.layer_routing`)."""
    routing, metrics = conv_moe.layer_routing(
        logits, num_experts, top_k, max_experts=self.max_experts, max_top_k=self.max_top_k,
        batch=x.shape[0], train=train)
    y = self.second(self.first(x, train, routing), train, routing)
    skip = self.shortcut(x, train) if self.shortcut is not None else x
    return jax.nn.relu(y + skip), metrics


def is_expert_kernel(path: tuple[Any, ...]) -> bool:
  """Whether a parameter path is an MoE conv kernel [3, 3, C_in, E · W] of `ResNetMoE`."""
  return (len(path) == 5 and path[0] == "blocks" and path[2] in ("first", "second")
          and path[3:] == ("conv", "kernel"))


def expert_layers(params: nnx.State) -> list[tuple[int, int, list[tuple[Any, ...]]]]:
  """(E, W, kernel paths) of each MoE block, in block order; [] for params of another
  family (a `ResNetMoE` has top-level stem, blocks, head and router)."""
  paths = [path for path, _ in nnx.to_flat_state(params)]
  if {path[0] for path in paths} != {"stem", "blocks", "head", "router"}:
    return []
  blocks = sorted({path[1] for path in paths if is_expert_kernel(path)})
  return conv_moe.expert_layers(params, [
      ([("blocks", b, conv, "conv", "kernel") for conv in ("first", "second")],
       ("blocks", b, "first", "norm", "scale")) for b in blocks])


class ResNetMoE(nnx.Module):
  """The convolutional MoE supernet (or, with per-block maxima, a standalone candidate)."""

  def __init__(self, *, num_classes: int, image_size: Sequence[int] = (32, 32),
               channels: int = 3, depth: int = 20, width_multiplier: float = 1.0,
               stem_stride: int | None = None, max_experts: int | Sequence[int] = 4,
               max_top_k: int | Sequence[int] = 1, expert_ratio: float = 0.5,
               router_depth: int = 8, router_width_multiplier: float = 0.5,
               load_balance_weight: float = 0.0, rngs: nnx.Rngs):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"{NAME} depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got "
                       f"{depth}")
    conv_moe.check_options(NAME, width_multiplier=width_multiplier, num_classes=num_classes,
                           expert_ratio=expert_ratio, load_balance_weight=load_balance_weight)
    image_size = tuple(image_size)
    stem_stride = layers.stem_stride_for(image_size, stem_stride)
    layers.check_image_size(NAME, image_size, 4 * stem_stride)
    per_stage = (depth - 2) // 6
    what = "residual block (3 · (depth − 2) / 6 blocks)"
    self.max_experts = conv_moe.per_layer(max_experts, 3 * per_stage, "max_experts", what)
    self.max_top_k = conv_moe.per_layer(max_top_k, 3 * per_stage, "max_top_k", what)
    moe.check_arch(self.max_experts, self.max_top_k, max_experts=max(self.max_experts),
                   max_top_k=max(self.max_top_k))
    self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                       depth=depth, width_multiplier=width_multiplier, stem_stride=stem_stride,
                       max_experts=self.max_experts, max_top_k=self.max_top_k,
                       expert_ratio=expert_ratio, router_depth=router_depth,
                       router_width_multiplier=router_width_multiplier,
                       load_balance_weight=load_balance_weight)
    self.input_shape = (*image_size, channels)
    self.load_balance_weight = load_balance_weight
    planes = [max(1, round(c * width_multiplier)) for c in (16, 32, 64)]
    self.stem = layers.ConvBN(channels, planes[0], 3, stride=stem_stride, rngs=rngs)
    self.blocks = nnx.List()
    width = planes[0]
    for stage, out in enumerate(planes):
      for i in range(per_stage):
        b = len(self.blocks)
        self.blocks.append(MoEBlock(width, max(1, int(expert_ratio * out)),
                                    2 if stage > 0 and i == 0 else 1,
                                    max_experts=self.max_experts[b],
                                    max_top_k=self.max_top_k[b], rngs=rngs))
        width = self.blocks[-1].first.width
    self.head = nnx.Linear(width, num_classes, rngs=rngs)
    self.router = conv_moe.image_router(
        scores=max(self.max_experts), image_size=image_size, channels=channels,
        depth=router_depth, width_multiplier=router_width_multiplier, stem_stride=stem_stride,
        rngs=rngs)

  def __call__(self, images: jax.Array, arch: Arch | None = None, *, train: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, num_classes] and routing metrics for a candidate (None: the maxima).

    aux: `aux_loss` (load_balance_weight · Σ_b load_balance_loss), `load_balance_loss` [L],
    `expert_counts` (L arrays [E_b]: images routed to each expert, kept choices) and, when
    the model has a router, `router_logits` [B, E_r]. `key` is unused (no gate noise).
    """
    del key
    layers.check_images(NAME, images, self.input_shape)
    arch = conv_moe.default_arch(self.max_experts, self.max_top_k, arch, NAME)
    logits = None if self.router is None else self.router(images, train=train)[0]
    x = self.stem(images, train)
    metrics = []
    for b, block in enumerate(self.blocks):
      x, block_metrics = block(x, logits, arch.num_experts[b], arch.top_k[b], train)
      metrics.append(block_metrics)
    return (self.head(x.mean(axis=(1, 2))),
            conv_moe.aux_of(metrics, logits, self.load_balance_weight))

  def search_space(self) -> search_space.SearchSpace:
    """Per-block maxima, the MoE blocks' conv shapes, the router, and everything else's
    costs (stem, shortcuts, batch norms, classifier)."""
    height, width = self.input_shape[:2]
    base_macs = self.stem.macs(height, width) + self.head.in_features * self.head.out_features
    height, width = (layers.out_size(s, self.stem.stride) for s in (height, width))
    shapes = []
    for block in self.blocks:
      if block.shortcut is not None:
        base_macs += block.shortcut.macs(height, width)
      height, width = (layers.out_size(s, block.stride) for s in (height, width))
      shapes.append(search_space.ConvMoELayerShape(block.first.in_channels, block.first.width,
                                                   height * width))
    return search_space.SearchSpace(
        max_experts=self.max_experts, max_top_k=self.max_top_k, layers=tuple(shapes),
        base_params=conv_moe.base_params(self, is_expert_kernel), base_macs=base_macs,
        router=conv_moe.router_shape(self.router, self.input_shape))


def dense(**config: Any) -> ResNetMoE:
  """The supernet's dense candidate: one expert (a plain conv of W channels) everywhere."""
  return ResNetMoE(**{**config, "max_experts": 1, "max_top_k": 1})
