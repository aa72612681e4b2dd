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


def mask_channels(x: jax.Array, count: jax.Array | int) -> jax.Array:
  """x [..., C] with the channels from `count` on set to 0 (a width gene's active prefix)."""
  return x * (jnp.arange(x.shape[-1]) < count).astype(x.dtype)


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
    return self.costs(height, width)[1]

  def costs(self, height: int, width: int, in_channels: int | None = None,
            out_channels: int | None = None) -> tuple[int, int]:
    """(params, MACs per image) at these channel counts (None: as built), as the same layer
    built at them (a depthwise conv stays depthwise): the kernel and the norm's scale and
    bias; the conv's MACs."""
    cin = self.in_channels if in_channels is None else in_channels
    cout = self.out_channels if out_channels is None else out_channels
    fan_in = 1 if self.groups == self.in_channels else cin // self.groups
    positions = out_size(height, self.stride) * out_size(width, self.stride)
    kernel = self.kernel ** 2 * fan_in * cout
    return kernel + 2 * cout, positions * kernel


class InvertedResidual(nnx.Module):
  """MobileNetV2 block: 1x1 expand → 3x3 depthwise (stride) → 1x1 project, residual if able."""

  def __init__(self, in_channels: int, out_channels: int, *, stride: int, expand_ratio: float,
               activation: str, rngs: nnx.Rngs):
    self.expand_ratio = expand_ratio
    hidden = self.hidden_for(in_channels)
    self.expand = (ConvBN(in_channels, hidden, 1, activation=activation, rngs=rngs)
                   if expand_ratio != 1 else None)
    self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden,
                            activation=activation, rngs=rngs)
    self.project = ConvBN(hidden, out_channels, 1, activation=None, rngs=rngs)
    self.residual = stride == 1 and in_channels == out_channels
    self.stride = stride
    self.in_channels, self.out_channels = in_channels, out_channels

  def hidden_for(self, in_channels: int) -> int:
    """The expanded width of the block built for `in_channels` inputs."""
    return int(round(in_channels * self.expand_ratio))

  def __call__(self, x: jax.Array, train: bool,
               active: tuple[Any, Any, Any] | None = None) -> jax.Array:
    """`active`: traced (input, hidden, output) channel counts of a width candidate, whose
    other channels are 0 in x and are set to 0 here; a residual joins equal active widths
    (stride 1), as in the block built at those widths. None: every channel."""
    if active is None:
      y = self.expand(x, train) if self.expand is not None else x
      y = self.project(self.depthwise(y, train), train)
      return x + y if self.residual else y
    inputs, hidden, outputs = active
    y = mask_channels(self.expand(x, train), hidden) if self.expand is not None else x
    y = mask_channels(self.project(mask_channels(self.depthwise(y, train), hidden), train),
                      outputs)
    if self.stride != 1:
      return y
    width = self.out_channels
    shortcut = x[..., :width] if x.shape[-1] >= width else jnp.pad(
        x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])
    return y + jnp.where(inputs == outputs, shortcut, 0)

  def macs(self, height: int, width: int) -> int:
    return self.costs(height, width)[1]

  def costs(self, height: int, width: int, in_channels: int | None = None,
            out_channels: int | None = None) -> tuple[int, int]:
    """(params, MACs per image) of the block built for these channel counts (None: as
    built)."""
    cin = self.in_channels if in_channels is None else in_channels
    hidden = self.hidden_for(cin)
    parts = [self.depthwise.costs(height, width, hidden, hidden),
             self.project.costs(out_size(height, self.stride), out_size(width, self.stride),
                                hidden, out_channels)]
    if self.expand is not None:
      parts.append(self.expand.costs(height, width, cin, hidden))
    return tuple(sum(part[i] for part in parts) for i in range(2))


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
