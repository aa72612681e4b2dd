"""Decoding, cropping and resizing images into fixed-size uint8 arrays (Pillow; any format)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image

Box = tuple[int, int, int, int]  # (left, top, right, bottom) in pixels, right and bottom excluded
_UNREADABLE = (OSError, ValueError, Image.DecompressionBombError)


def decode(payload: bytes, size: int, channels: int = 3) -> np.ndarray | None:
  """uint8 [size, size, channels] (bilinear resize), or None if the bytes are no image."""
  crops = decode_crops(payload, [None], size, channels)
  return None if crops is None else crops[0]


def decode_crops(payload: bytes, boxes: Sequence[Box | None], size: int,
                 channels: int = 3) -> list[np.ndarray] | None:
  """uint8 [size, size, channels] per box (None: the whole image), decoding the image once;
  None if the bytes are no image. Boxes must lie inside the image (see `clip`)."""
  try:
    with Image.open(io.BytesIO(payload)) as image:
      image = image.convert("RGB" if channels == 3 else "L")
      crops = [np.asarray((image if box is None else image.crop(box)).resize(
          (size, size), Image.BILINEAR), np.uint8) for box in boxes]
  except _UNREADABLE:
    return None
  return crops if channels == 3 else [crop[..., None] for crop in crops]


def dimensions(path: str) -> tuple[int, int] | None:
  """(width, height) from the file's header (no decoding), or None if it is no image."""
  try:
    with Image.open(path) as image:
      return image.size
  except _UNREADABLE:
    return None


def clip(box: Box, width: int, height: int) -> Box | None:
  """The part of the box inside a width x height image, or None if no pixel of it is."""
  left, top = max(box[0], 0), max(box[1], 0)
  right, bottom = min(box[2], width), min(box[3], height)
  return (left, top, right, bottom) if left < right and top < bottom else None


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] → uint8 [size, size, 3], bilinear as in `decode` (unchanged at that size)."""
  if pixels.shape[:2] == (size, size):
    return pixels
  return np.asarray(Image.fromarray(pixels).resize((size, size), Image.BILINEAR), np.uint8)
