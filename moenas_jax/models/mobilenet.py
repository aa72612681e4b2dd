"""MobileNetV2 (Sandler et al. 2018) for small images: a dense edge baseline.

The ImageNet layout with width multiplier α (0.35 to 1.0); the second stage keeps stride 1 (the
usual CIFAR adaptation), and the stem's stride follows the input (`layers.stem_stride_for`: 1 up
to 32 px, 2 above), an 8x or 16x total downsampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from flax import nnx

from moenas_jax.models import layers

NAME = "mobilenet_v2"
# (expansion t, channels c, blocks n, stride s) per stage.
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
           (6, 160, 3, 2), (6, 320, 1, 1))


class MobileNetV2(layers.DenseClassifier):

  NAME = NAME

  def __init__(self, *, num_classes: int, image_size: Sequence[int] = (32, 32),
               channels: int = 3, width_multiplier: float = 1.0, stem_stride: int | None = None,
               rngs: nnx.Rngs):
    if not 0 < width_multiplier <= 4 or num_classes < 1:
      raise ValueError(f"need 0 < width_multiplier <= 4 and num_classes >= 1; got "
                       f"{width_multiplier}, {num_classes}")
    image_size = tuple(image_size)
    stem_stride = layers.stem_stride_for(image_size, stem_stride)
    layers.check_image_size(NAME, image_size,
                            stem_stride * math.prod(s for *_, s in _STAGES))
    self.config = dict(num_classes=num_classes, image_size=image_size, channels=channels,
                       width_multiplier=width_multiplier, stem_stride=stem_stride)
    self.input_shape = (*image_size, channels)
    width = layers.make_divisible(32 * width_multiplier)
    self.stem = layers.ConvBN(channels, width, 3, stride=stem_stride, activation="relu6",
                              rngs=rngs)
    self.blocks = nnx.List()
    for expand, out, count, stride in _STAGES:
      out = layers.make_divisible(out * width_multiplier)
      for i in range(count):
        self.blocks.append(layers.InvertedResidual(
            width, out, stride=stride if i == 0 else 1, expand_ratio=expand,
            activation="relu6", rngs=rngs))
        width = out
    last = layers.make_divisible(1280 * max(1.0, width_multiplier))
    self.blocks.append(layers.ConvBN(width, last, 1, activation="relu6", rngs=rngs))
    self.head = nnx.Linear(last, num_classes, rngs=rngs)
