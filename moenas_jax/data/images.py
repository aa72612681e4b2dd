"""Decoding image files into fixed-size uint8 arrays (Pillow; any common format)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def decode(payload: bytes, size: int, channels: int = 3) -> np.ndarray | None:
  """uint8 [size, size, channels] (bilinear resize), or None if the bytes are no image."""
  try:
    with Image.open(io.BytesIO(payload)) as image:
      image = image.convert("RGB" if channels == 3 else "L").resize((size, size),
                                                                   Image.BILINEAR)
      pixels = np.asarray(image, np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError):
    return None
  return pixels if channels == 3 else pixels[..., None]
