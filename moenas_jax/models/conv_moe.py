"""Shared pieces of the convolutional MoE families (`resnet_moe`, `vgg_moe`).

Experts are channel groups: an `MoEConvBN` is a 3x3 conv with E blocks of W output channels,
expert e owning the channel block [eW, (e+1)W), gate-combined into W channels, then a batch
norm shared by the experts. One image router (a small CIFAR `resnet.ResNet`, `image_router`)
scores each image once, [B, E_r] logits (E_r the largest expert count); every MoE layer uses
the same scores, masked to its candidate's first num_experts, so an expert is a pathway.

Routing is per image: `route` and `layer_routing` look at nothing but the image's own scores,
so a padded evaluation row changes no other row's routing (there is no capacity to share),
and the statistics (`expert_counts`, `load_balance_loss`) are per-batch sums and means that
`prune.expert_usage` takes per image (one image per call, padded rows masked out) exactly as
it does for the MoE feed-forward families.

Axis letters: B batch · E experts · K choices per image · C channels of an expert block.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moenas_jax import search_space
from moenas_jax.models import layers, resnet

Path = tuple[Any, ...]
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def route(logits: jax.Array, num_experts: jax.Array, top_k: jax.Array, *,
          max_top_k: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(choices [B, K] int32, gates [B, K], probabilities [B, E]) of one layer.

  The softmax covers the first num_experts of the E logits; choices ≥ top_k get gate 0.
  top_k = 1: gate 1 + (p − stop_gradient(p)) (straight-through, exactly 1 forward); else p
  renormalised over the kept choices.
  """
  active = jnp.arange(logits.shape[-1]) < num_experts
  probs = jax.nn.softmax(jnp.where(active, logits.astype(jnp.float32), -jnp.inf), axis=-1)
  values, choices = jax.lax.top_k(probs, max_top_k)
  kept = jnp.where(jnp.arange(max_top_k) < top_k, values, 0.0)
  first = jnp.arange(max_top_k) == 0
  straight = jnp.where(first, 1.0 + (values - jax.lax.stop_gradient(values)), 0.0)
  gates = jnp.where(top_k == 1, straight, kept / kept.sum(-1, keepdims=True))
  return choices, gates, probs


def dense_gates(choices: jax.Array, gates: jax.Array, probs: jax.Array,
                top_k: jax.Array) -> jax.Array:
  """Gates [B, E] over all experts; top-1 is one-hot + p − stop_gradient(p), so every
  expert's probability gets the gradient of its output (the straight-through identity)."""
  chosen = jax.nn.one_hot(choices, probs.shape[-1])  # [B, K, E]
  straight = chosen[:, 0] + (probs - jax.lax.stop_gradient(probs))  # forward: exact
  return jnp.where(top_k == 1, straight, (chosen * gates[..., None]).sum(1))


def layer_routing(logits: jax.Array | None, num_experts: jax.Array, top_k: jax.Array, *,
                  max_experts: int, max_top_k: int, batch: int, train: bool
                  ) -> tuple[tuple | None, dict[str, jax.Array]]:
  """(routing for `MoEConvBN`, metrics) of one MoE layer with E = max_experts.

  Metrics: `expert_counts` [E] (images per expert, kept choices; a one-expert layer counts
  every image) and `load_balance_loss` (n · Σ f_e P_e over the active experts, f the share of
  first choices, P the mean probability; 1 for one expert). Arch values are clipped to the
  layer's valid ranges (validation is on the host).
  """
  if max_experts == 1:
    return None, {"expert_counts": jnp.full((1,), batch, jnp.int32),
                  "load_balance_loss": jnp.ones((), jnp.float32)}
  num_experts = jnp.clip(num_experts, 1, max_experts)
  top_k = jnp.clip(top_k, 1, jnp.minimum(max_top_k, num_experts))
  choices, gates, probs = route(logits[:, :max_experts], num_experts, top_k,
                                max_top_k=max_top_k)
  routing = (choices, gates, dense_gates(choices, gates, probs, top_k) if train else None)
  chosen = jax.nn.one_hot(choices, max_experts, dtype=jnp.int32)  # [B, K, E]
  kept = (jnp.arange(max_top_k) < top_k)[None, :, None]
  first = chosen[:, 0].mean(0, dtype=jnp.float32)
  return routing, {"expert_counts": (chosen * kept).sum((0, 1)),
                   "load_balance_loss": num_experts * (first * probs.mean(0)).sum()}


class MoEConvBN(layers.ConvBN):
  """A 3x3 conv with `experts` blocks of `width` output channels, gate-combined, then batch
  norm and activation on the `width` combined channels. One expert: a plain `ConvBN`."""

  def __init__(self, in_channels: int, width: int, *, experts: int, stride: int = 1,
               activation: str | None = "relu", rngs: nnx.Rngs):
    super().__init__(in_channels, experts * width, 3, stride=stride, activation=activation,
                     rngs=rngs)
    self.norm = nnx.BatchNorm(width, momentum=0.9, rngs=rngs)
    self.experts, self.width = experts, width

  def __call__(self, x: jax.Array, train: bool, routing: tuple | None = None) -> jax.Array:
    """`routing`: (choices [B, K], gates [B, K], dense gates [B, E] in training) from
    `layer_routing`; None if one expert."""
    if routing is None:
      y = self.conv(x)
    elif train:  # every expert, so every probability gets its straight-through gradient
      y = self.conv(x)
      y = jnp.einsum("bhwec,be->bhwc", y.reshape(*y.shape[:-1], self.experts, self.width),
                     routing[2].astype(y.dtype))
    else:
      y = self._chosen(x, *routing[:2])
    y = self.norm(y, use_running_average=not (train or self.recalibrating))
    return layers.ACTIVATIONS[self.activation](y) if self.activation else y

  def _chosen(self, x: jax.Array, choices: jax.Array, gates: jax.Array) -> jax.Array:
    """Only each image's K chosen expert blocks: a conv per image with its gathered kernel."""
    kernel = self.conv.kernel[...].reshape(3, 3, self.in_channels, self.experts, self.width)
    kernels = jnp.take(kernel, choices, axis=3)  # [3, 3, C_in, B, K, C]

    def one(image, image_kernel):  # [H, W, C_in], [3, 3, C_in, K, C] → [H', W', K, C]
      out = jax.lax.conv_general_dilated(
          image[None], image_kernel.reshape(3, 3, self.in_channels, -1),
          (self.stride, self.stride), "SAME", dimension_numbers=_DIMENSIONS)
      return out[0].reshape(*out.shape[1:3], -1, self.width)

    y = jax.vmap(one, in_axes=(0, 3))(x, kernels)  # [B, H', W', K, C]
    return jnp.einsum("bhwkc,bk->bhwc", y, gates.astype(y.dtype))

  def shape(self, height: int, width: int) -> search_space.ConvMoELayerShape:
    """The layer's cost shape on a height x width input (one conv: no second conv)."""
    positions = layers.out_size(height, self.stride) * layers.out_size(width, self.stride)
    return search_space.ConvMoELayerShape(self.in_channels, self.width, positions,
                                          second_conv=False)


def image_router(*, scores: int, image_size: tuple[int, int], channels: int, depth: int,
                 width_multiplier: float, stem_stride: int,
                 rngs: nnx.Rngs) -> resnet.ResNet | None:
  """The image router, a CIFAR ResNet with `scores` outputs (None for one expert)."""
  return (resnet.ResNet(num_classes=scores, image_size=image_size, channels=channels,
                        depth=depth, width_multiplier=width_multiplier,
                        stem_stride=stem_stride, rngs=rngs)
          if scores > 1 else None)


def router_shape(router: resnet.ResNet | None, image_size: Sequence[int]
                 ) -> search_space.ImageRouterShape | None:
  """The router's costs for `SearchSpace`: body params and MACs, and its head's inputs."""
  if router is None:
    return None
  body = sum(math.prod(leaf.get_value().shape)
             for path, leaf in nnx.to_flat_state(nnx.state(router, nnx.Param))
             if path[0] != "head")
  return search_space.ImageRouterShape(body, router.body_macs(*image_size[:2]),
                                       router.head.in_features)


def base_params(model: nnx.Module, is_expert_kernel: Callable[[Path], bool]) -> int:
  """Parameters of `model` outside its router and its expert kernels."""
  return sum(math.prod(leaf.get_value().shape)
             for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))
             if path[0] != "router" and not is_expert_kernel(path))


def per_layer(value: int | Sequence[int], count: int, name: str, what: str) -> tuple[int, ...]:
  """One int per MoE layer, from one int or a sequence of `count` ints."""
  values = (value,) * count if isinstance(value, numbers.Integral) else tuple(value)
  if len(values) != count or any(not isinstance(v, numbers.Integral) for v in values):
    raise ValueError(f"{name}={value!r} must be one int or {count} ints, one per {what}")
  return tuple(int(v) for v in values)


def expert_layers(params: nnx.State, layout: Sequence[tuple[Sequence[Path], Path]]
                  ) -> list[tuple[int, int, list[Path]]]:
  """(E, W, kernel paths) of each MoE layer of a conv-MoE model's params.

  `layout`: per MoE layer, the paths of its `MoEConvBN` kernels ([3, 3, C_in, E · W], sharing
  one routing) and of one of their norms' scales ([W]).
  """
  flat = {path: variable.get_value().shape for path, variable in nnx.to_flat_state(params)}
  result = []
  for kernels, scale in layout:
    width = flat[scale][0]
    result.append((flat[kernels[0]][-1] // width, width, list(kernels)))
  return result


def check_options(name: str, *, width_multiplier: float, num_classes: int,
                  expert_ratio: float, load_balance_weight: float) -> None:
  if not width_multiplier > 0 or num_classes < 1:
    raise ValueError(f"need width_multiplier > 0 and num_classes >= 1, got "
                     f"{width_multiplier}, {num_classes}")
  if not 0 < expert_ratio <= 1:
    raise ValueError(f"{name} expert_ratio={expert_ratio!r} must be in (0, 1]: each expert's "
                     f"share of a layer's channels (0.5 in AdvMoE)")
  if not load_balance_weight >= 0:
    raise ValueError(f"load_balance_weight={load_balance_weight!r} must be >= 0 (0: none)")


def aux_of(metrics: list[dict[str, jax.Array]], logits: jax.Array | None,
           load_balance_weight: float) -> dict[str, Any]:
  """The model's aux dict from its layers' metrics (see `layer_routing`)."""
  balance = jnp.stack([m["load_balance_loss"] for m in metrics])
  aux = {"aux_loss": load_balance_weight * balance.sum(), "load_balance_loss": balance,
         "expert_counts": tuple(m["expert_counts"] for m in metrics)}
  if logits is not None:
    aux["router_logits"] = logits
  return aux


def default_arch(max_experts: Sequence[int], max_top_k: Sequence[int], arch: Any,
                 name: str) -> Any:
  """The maxima for arch=None; refuses a population or a wrong length."""
  if arch is None:
    arch = search_space.Arch(jnp.asarray(max_experts, jnp.int32),
                             jnp.asarray(max_top_k, jnp.int32))
  count = len(max_experts)
  if not jnp.shape(arch.num_experts) == jnp.shape(arch.top_k) == (count,):
    raise ValueError(f"{name} takes one candidate, Arch with [{count}] arrays; got shapes "
                     f"{jnp.shape(arch.num_experts)} and {jnp.shape(arch.top_k)}. For a "
                     f"population [P, {count}] use jax.vmap over the arch.")
  return arch
