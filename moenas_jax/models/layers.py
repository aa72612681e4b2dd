"""Building blocks shared by the model families: conv + batch norm, inverted residuals.

Each block can report its per-image multiply-accumulates analytically (`macs`) for an input
of a given spatial size, so the search space can price architectures without tracing.
"""

from __future__ import annotations

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


class ConvBN(nnx.Module):
  """Conv (no bias) → BatchNorm → optional activation."""

  def __init__(self, in_channels: int, out_channels: int, kernel: int, *, stride: int = 1,
               groups: int = 1, activation: str | None = "relu", rngs: nnx.Rngs):
    self.conv = nnx.Conv(in_channels, out_channels, (kernel, kernel), strides=stride,
                         padding="SAME", feature_group_count=groups, use_bias=False, rngs=rngs)
    self.norm = nnx.BatchNorm(out_channels, momentum=0.9, rngs=rngs)
    self.activation = activation
    self.kernel, self.stride, self.groups = kernel, stride, groups
    self.in_channels, self.out_channels = in_channels, out_channels

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.norm(self.conv(x), use_running_average=not train)
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
