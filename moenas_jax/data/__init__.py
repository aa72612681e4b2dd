"""Data: datasets by name with a sensitive-group label per image, read without TensorFlow.

Every dataset is a TFDS builder prepared as `array_record` files and read through
`tfds.data_source` (random access, no TensorFlow). Examples are
`{"image": uint8 [H, W, C], "label": int, "group": int}`.
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from moenas_jax.data import fashion_tones

DATASETS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "fashion_tones": fashion_tones.FashionTones,
}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Prepared splits (random-access sources) and what the models and metrics need to know."""

  name: str
  splits: dict  # split name → tfds data source (len, [index], __getitems__)
  class_names: tuple[str, ...]
  group_names: tuple[str, ...]
  image_shape: tuple[int, int, int]


def open_dataset(name: str, data_dir: str) -> Dataset:
  """Prepares the dataset under `data_dir` once (array_record), then opens its splits."""
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  builder = DATASETS[name](data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  features = builder.info.features
  return Dataset(name=name, splits=dict(builder.as_data_source()),
                 class_names=tuple(features["label"].names),
                 group_names=tuple(features["group"].names),
                 image_shape=tuple(features["image"].shape))
