"""Convolutional MoE VGG for CIFAR-size images: every 3x3 conv after the first has experts.

A VGG plan (`plan`: channel counts and "M" for a 2x2 max pool, VGG-11 by default, channels
times `width_multiplier`): the first conv is a dense `ConvBN` (`stem`), every later conv an
`conv_moe.MoEConvBN` (`convs`) of E x W channels, W = int(expert_ratio · channels), all of
them routed by one image router (`conv_moe.image_router`), so an expert is a pathway
through the network as in `resnet_moe`. A global average pool and a dense linear classifier
(`head`) end it. L = the plan's convs − 1 MoE layers; a candidate
`Arch(num_experts[L], top_k[L])` masks the router's scores per layer. Training computes all
experts and combines them with the straight-through gates, evaluation only each image's
chosen kernels (what `SearchSpace.macs` counts). With one expert everywhere there is no
router and the model is a plain VGG of W-channel convs.

Axis letters: B batch · E experts · K choices per image · C channels of an expert block.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen, nnx

from moenas_jax import moe, search_space
from moenas_jax.models import conv_moe, layers
from moenas_jax.models.conv_moe import MoEConvBN
from moenas_jax.search_space import Arch

NAME = "vgg_moe"
PLANS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}


def _check_plan(plan: str | Sequence[int | str]) -> tuple[int | str, ...]:
  if isinstance(plan, str):
    if plan not in PLANS:
      raise ValueError(f"{NAME} plan={plan!r} is not one of {sorted(PLANS)}; or give a "
                       f"sequence of channel counts and 'M' (max pool)")
    plan = PLANS[plan]
  plan = tuple(int(p) if isinstance(p, numbers.Integral) else p for p in plan)
  convs = [p for p in plan if p != "M"]
  if (any(not isinstance(p, int) or p < 1 for p in convs) or len(convs) < 2
      or plan[0] == "M"):
    raise ValueError(f"{NAME} plan={plan!r} must start with a conv and hold at least two "
                     f"convs: positive channel counts, and 'M' for a 2x2 max pool (e.g. "
                     f"(64, 'M', 128, 'M', 256))")
  return plan


def is_expert_kernel(path: tuple[Any, ...]) -> bool:
  """Whether a parameter path is an MoE conv kernel [3, 3, C_in, E · W] of `VGGMoE`."""
  return len(path) == 4 and path[0] == "convs" and path[2:] == ("conv", "kernel")


def expert_layers(params: nnx.State) -> list[tuple[int, int, list[tuple[Any, ...]]]]:
  """(E, W, kernel path) of each MoE conv, in order; [] for params of another family (a
  `VGGMoE` has top-level stem, convs, head and router)."""
  paths = [path for path, _ in nnx.to_flat_state(params)]
  if {path[0] for path in paths} != {"stem", "convs", "head", "router"}:
    return []
  convs = sorted({path[1] for path in paths if is_expert_kernel(path)})
  return conv_moe.expert_layers(params, [([("convs", i, "conv", "kernel")],
                                          ("convs", i, "norm", "scale")) for i in convs])


class VGGMoE(nnx.Module):
  """The VGG conv-MoE supernet (or, with per-layer maxima, a standalone candidate)."""

  def __init__(self, *, num_classes: int, image_size: Sequence[int] = (32, 32),
               channels: int = 3, plan: str | Sequence[int | str] = "vgg11",
               width_multiplier: float = 1.0, max_experts: int | Sequence[int] = 4,
               max_top_k: int | Sequence[int] = 1, expert_ratio: float = 0.5,
               router_depth: int = 8, router_width_multiplier: float = 0.5,
               load_balance_weight: float = 0.0, rngs: nnx.Rngs):
    plan = _check_plan(plan)
    conv_moe.check_options(NAME, width_multiplier=width_multiplier, num_classes=num_classes,
                           expert_ratio=expert_ratio, load_balance_weight=load_balance_weight)
    image_size = tuple(image_size)
    layers.check_image_size(NAME, image_size, 2 ** plan.count("M"))
    count = sum(p != "M" for p in plan) - 1
    what = "conv after the first (the plan's convs − 1)"
    self.max_experts = conv_moe.per_layer(max_experts, count, "max_experts", what)
    self.max_top_k = conv_moe.per_layer(max_top_k, count, "max_top_k", what)
    moe.check_arch(self.max_experts, self.max_top_k, max_experts=max(self.max_experts),
                   max_top_k=max(self.max_top_k))
    self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                       plan=plan, width_multiplier=width_multiplier,
                       max_experts=self.max_experts, max_top_k=self.max_top_k,
                       expert_ratio=expert_ratio, router_depth=router_depth,
                       router_width_multiplier=router_width_multiplier,
                       load_balance_weight=load_balance_weight)
    self.input_shape = (*image_size, channels)
    self.load_balance_weight = load_balance_weight
    sizes = [max(1, round(p * width_multiplier)) if p != "M" else p for p in plan]
    self.stem = layers.ConvBN(channels, sizes[0], 3, rngs=rngs)
    # After each conv (stem: -1, then MoE conv i), whether a max pool follows.
    pools = []
    self.convs = nnx.List()
    width = sizes[0]
    for size in sizes[1:]:
      if size == "M":
        pools.append(len(self.convs) - 1)
        continue
      i = len(self.convs)
      self.convs.append(MoEConvBN(width, max(1, int(expert_ratio * size)),
                                  experts=self.max_experts[i], rngs=rngs))
      width = self.convs[-1].width
    self.pools = tuple(pools)
    self.head = nnx.Linear(width, num_classes, rngs=rngs)
    self.router = conv_moe.image_router(
        scores=max(self.max_experts), image_size=image_size, channels=channels,
        depth=router_depth, width_multiplier=router_width_multiplier,
        stem_stride=layers.stem_stride_for(image_size, None), rngs=rngs)

  def __call__(self, images: jax.Array, arch: Arch | None = None, *, train: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, num_classes] and routing metrics for a candidate (None: the maxima), as
    `resnet_moe.ResNetMoE` (aux: aux_loss, load_balance_loss [L], expert_counts, and
    router_logits when there is a router). `key` is unused."""
    del key
    layers.check_images(NAME, images, self.input_shape)
    arch = conv_moe.default_arch(self.max_experts, self.max_top_k, arch, NAME)
    logits = None if self.router is None else self.router(images, train=train)[0]
    x = self._pool(self.stem(images, train), -1)
    metrics = []
    for i, conv in enumerate(self.convs):
      routing, layer_metrics = conv_moe.layer_routing(
          logits, arch.num_experts[i], arch.top_k[i], max_experts=self.max_experts[i],
          max_top_k=self.max_top_k[i], batch=x.shape[0], train=train)
      x = self._pool(conv(x, train, routing), i)
      metrics.append(layer_metrics)
    return (self.head(x.mean(axis=(1, 2))),
            conv_moe.aux_of(metrics, logits, self.load_balance_weight))

  def _pool(self, x: jax.Array, after: int) -> jax.Array:
    if after not in self.pools:
      return x
    return linen.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")

  def search_space(self) -> search_space.SearchSpace:
    """Per-layer maxima, the MoE convs' shapes, the router, and the stem's and classifier's
    costs (pools, norms and activations count no MACs)."""
    height, width = self.input_shape[:2]
    base_macs = self.stem.macs(height, width) + self.head.in_features * self.head.out_features
    if -1 in self.pools:
      height, width = layers.out_size(height, 2), layers.out_size(width, 2)
    shapes = []
    for i, conv in enumerate(self.convs):
      shapes.append(conv.shape(height, width))
      if i in self.pools:
        height, width = layers.out_size(height, 2), layers.out_size(width, 2)
    return search_space.SearchSpace(
        max_experts=self.max_experts, max_top_k=self.max_top_k, layers=tuple(shapes),
        base_params=conv_moe.base_params(self, is_expert_kernel), base_macs=base_macs,
        router=conv_moe.router_shape(self.router, self.input_shape))


def dense(**config: Any) -> VGGMoE:
  """The supernet's dense candidate: one expert (a plain conv of W channels) everywhere."""
  return VGGMoE(**{**config, "max_experts": 1, "max_top_k": 1})
