"""Building blocks shared by the model families: conv + batch norm, inverted residuals.

Each block can report its per-image multiply-accumulates analytically (`macs`) for an input
of a given spatial size, so the search space can price architectures without tracing.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moenas_jax.moe import ACTIVATIONS


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
  """Rounds channels to a multiple of divisor, never more than 10% below value (MobileNet)."""
  min_value = min_value or divisor
  rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
  return rounded + divisor if rounded < 0.9 * value else rounded


def out_size(size: int, stride: int) -> int:
  """Spatial size after a SAME-padded layer with this stride."""
  return math.ceil(size / stride)


@functools.partial(jax.jit, static_argnums=2)
def depthwise_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """SAME-padded depthwise convolution of x [B, H, W, C] by kernel [k, k, 1, C].

  Computed as k · k strided, shifted multiply-adds, which XLA fuses into one loop: on XLA:CPU
  that runs several times faster than the grouped `conv_general_dilated` (forward and
  gradient), with the same result as `nnx.Conv(..., feature_group_count=C, padding="SAME")`.
  Jitted under its own name, so `costs.count_macs` finds and counts it as a convolution.
  """
  batch, height, width, channels = x.shape
  size = kernel.shape[0]
  pads = jax.lax.padtype_to_pads((height, width), (size, size), (stride, stride), "SAME")
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)))
  rows, cols = out_size(height, stride), out_size(width, stride)
  out = None
  for i in range(size):
    for j in range(size):
      window = jax.lax.slice(x, (0, i, j, 0),
                             (batch, i + stride * (rows - 1) + 1, j + stride * (cols - 1) + 1,
                              channels), (1, stride, stride, 1))
      term = window * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


class ConvBN(nnx.Module):
  """Conv (no bias) → BatchNorm → optional activation; depthwise convs via `depthwise_conv`.

  `recalibrating` (set by `models.batch_statistics` on a traced copy): normalise with the
  batch's statistics and record them, also outside training.
  """

  recalibrating = False

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
               groups: int = 1, activation: str | None = "relu", rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride,
                         padding="SAME", feature_group_count=groups, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs)
    self.activation = activation
    self.kernel, self.stride, self.groups = kernel, stride, groups
    self.in_channels, self.out_channels = in_channels, out_channels

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    depthwise = self.groups > 1 and self.groups == self.in_channels == self.out_channels
    x = depthwise_conv(x, self.conv.kernel[...], self.stride) if depthwise else self.conv(x)
    x = self.norm(x, use_running_average=not (train or self.recalibrating))
    return ACTIVATIONS[self.activation](x) if self.activation else x

  def macs(self, height: int, width: int) -> int:
    positions = out_size(height, self.stride) * out_size(width, self.stride)
    return (positions * self.kernel ** 2 * (self.in_channels // self.groups)
            * self.out_channels)


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1x1 expand → 3x3 depthwise (stride) → 1x1 project, residual if able."""

  def __init__(self, in_channels: int, out_channels: int, *, stride: int, expand_ratio: float,
               activation: str, rngs: nnx.Rngs):
    hidden = int(round(in_channels * expand_ratio))
    self.expand = (ConvBN(in_channels, hidden, 1, activation=activation, rngs=rngs)
                   if expand_ratio != 1 else None)
    self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden,
                            activation=activation, rngs=rngs)
    self.project = ConvBN(hidden, out_channels, 1, activation=None, rngs=rngs)
    self.residual = stride == 1 and in_channels == out_channels
    self.stride = stride

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.expand(x, train) if self.expand is not None else x
    y = self.project(self.depthwise(y, train), train)
    return x + y if self.residual else y

  def macs(self, height: int, width: int) -> int:
    total = self.expand.macs(height, width) if self.expand is not None else 0
    total += self.depthwise.macs(height, width)
    return total + self.project.macs(out_size(height, self.stride), out_size(width, self.stride))


def stem_stride_for(image_size: tuple[int, int], stem_stride: int | None) -> int:
  """The stem's stride: as given, or by input size: 1 up to 32 px (the CIFAR layout), else 2,
  so a 64 px input costs what an edge net of its width should, not four times more."""
  if stem_stride is None:
    return 1 if min(image_size) <= 32 else 2
  if stem_stride not in (1, 2):
    raise ValueError(f"stem_stride must be 1, 2 or None (by input size), got {stem_stride!r}")
  return stem_stride


def check_image_size(model_name: str, image_size: tuple[int, int], downsampling: int) -> None:
  """Raises if the image is smaller than the model's total stride (the last map would be empty)."""
  if min(image_size) < downsampling:
    raise ValueError(f"{model_name} downsamples by {downsampling}, so it takes images of at "
                     f"least {downsampling}x{downsampling} px; got {image_size[0]}x"
                     f"{image_size[1]}. Use larger images or smaller strides in the config.")


def check_images(model_name: str, images: jax.Array, input_shape: tuple[int, int, int]) -> None:
  if images.ndim != 4 or tuple(images.shape[1:]) != tuple(input_shape):
    h, w, c = input_shape
    raise ValueError(f"{model_name} was built for images [B, {h}, {w}, {c}], got "
                     f"{tuple(images.shape)}; set image_size and channels in the model config")


def check_no_arch(model_name: str, arch: object) -> None:
  if arch is not None:
    raise ValueError(f"{model_name} is a dense model with no MoE layers; call it without an "
                     f"arch (got {arch!r})")


class DenseClassifier(nnx.Module):
  """Base of the dense baselines: `stem` → `blocks` → global average pool → linear `head`.

  Subclasses set NAME, input_shape, stem, blocks (layers called as `block(x, train)`) and head.
  """

  NAME = "dense"

  def __call__(self, images: jax.Array, arch: Any = None, *, train: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, dict[str, Any]]:
    """Logits [B, num_classes]; no MoE layers, so `arch` must be None and aux_loss is 0."""
    del key
    check_no_arch(self.NAME, arch)
    check_images(self.NAME, images, self.input_shape)
    x = self.stem(images, train)
    for block in self.blocks:
      x = block(x, train)
    return self.head(x.mean(axis=(1, 2))), {"aux_loss": jnp.zeros(())}
