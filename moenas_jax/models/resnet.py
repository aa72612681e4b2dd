"""CIFAR-style ResNet (He et al. 2016): ResNet-8/14/20/32..., a dense edge baseline.

Depth 6n + 2: a 3x3 stem, three stages of n basic blocks at 16, 32, 64 channels (times
`width_multiplier`), strides 1, 2, 2, projection shortcuts where the shape changes. The stem's
stride follows the input (`layers.stem_stride_for`: 1 up to 32 px, 2 above).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx

from moenas_jax.models import layers

NAME = "resnet"


class BasicBlock(nnx.Module):
  """3x3 conv → 3x3 conv, plus an identity or 1x1 projection shortcut, then ReLU."""

  def __init__(self, in_channels: int, out_channels: int, stride: int, *, rngs: nnx.Rngs):
    self.first = layers.ConvBN(in_channels, out_channels, 3, stride=stride, rngs=rngs)
    self.second = layers.ConvBN(out_channels, out_channels, 3, activation=None, rngs=rngs)
    self.shortcut = (layers.ConvBN(in_channels, out_channels, 1, stride=stride, activation=None,
                                   rngs=rngs)
                     if stride != 1 or in_channels != out_channels else None)
    self.stride = stride

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = self.second(self.first(x, train), train)
    skip = self.shortcut(x, train) if self.shortcut is not None else x
    return jax.nn.relu(y + skip)

  def macs(self, height: int, width: int) -> int:
    total = self.first.macs(height, width) + (self.shortcut.macs(height, width)
                                              if self.shortcut is not None else 0)
    return total + self.second.macs(layers.out_size(height, self.stride),
                                    layers.out_size(width, self.stride))


class ResNet(layers.DenseClassifier):

  NAME = NAME

  def __init__(self, *, num_classes: int, image_size: Sequence[int] = (32, 32),
               channels: int = 3, depth: int = 20, width_multiplier: float = 1.0,
               stem_stride: int | None = None, rngs: nnx.Rngs):
    if depth < 8 or (depth - 2) % 6:
      raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), got "
                       f"{depth}")
    if not width_multiplier > 0 or num_classes < 1:
      raise ValueError(f"need width_multiplier > 0 and num_classes >= 1, got "
                       f"{width_multiplier}, {num_classes}")
    image_size = tuple(image_size)
    stem_stride = layers.stem_stride_for(image_size, stem_stride)
    layers.check_image_size(NAME, image_size, 4 * stem_stride)
    self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                       depth=depth, width_multiplier=width_multiplier, stem_stride=stem_stride)
    self.input_shape = (*image_size, channels)
    widths = [max(1, round(c * width_multiplier)) for c in (16, 32, 64)]
    self.stem = layers.ConvBN(channels, widths[0], 3, stride=stem_stride, rngs=rngs)
    self.blocks = nnx.List()
    width = widths[0]
    for stage, out in enumerate(widths):
      for i in range((depth - 2) // 6):
        stride = 2 if stage > 0 and i == 0 else 1
        self.blocks.append(BasicBlock(width, out, stride, rngs=rngs))
        width = out
    self.head = nnx.Linear(width, num_classes, rngs=rngs)

  def body_macs(self, height: int, width: int) -> int:
    """MACs per image of the stem and the blocks on a height x width input (not the head)."""
    total = 0
    for block in (self.stem, *self.blocks):
      total += block.macs(height, width)
      height, width = layers.out_size(height, block.stride), layers.out_size(width, block.stride)
    return total
