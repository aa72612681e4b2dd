"""Data: datasets by name with a sensitive-group label per image, read without TensorFlow.

Every dataset is a TFDS builder prepared as `array_record` files and read through
`tfds.data_source` (random access, no TensorFlow). Examples are
`{"image": uint8 [H, W, C], "label": int, "group": int}` (FACET adds `lighting` and
`person_id`).
"""

from __future__ import annotations

import dataclasses
import os

import tensorflow_datasets as tfds

from moenas_jax.data import catalog, facet, fashion_tones, own_csv, own_npz, utkface

DATASETS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    "celeb_a": catalog.CelebAGroups,
    "cifar10_corrupted": catalog.Cifar10CorruptedGroups,
    "cifar10s": catalog.Cifar10S,
    "facet": facet.Facet,
    "fashion_tones": fashion_tones.FashionTones,
    "npz": own_npz.OwnNpz,
    "csv": own_csv.OwnCsv,
    "utkface": utkface.UTKFace,
}
# Datasets read from the user's files: name → (config from manual_dir and options).
_MANUAL_CONFIGS = {"npz": own_npz.config_for, "csv": own_csv.config_for,
                   "utkface": utkface.config_for, "facet": facet.config_for}
# Datasets made from the TFDS catalog (prepared once with TensorFlow, the [tf] extra):
# name → (config from options).
_CATALOG_CONFIGS = {"cifar10s": catalog.cifar10s_config,
                    "cifar10_corrupted": catalog.cifar10_corrupted_config,
                    "celeb_a": catalog.celeb_a_config}


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Prepared splits (random-access sources) and what the models and metrics need to know."""

  name: str
  splits: dict  # split name → tfds data source (len, [index], __getitems__)
  class_names: tuple[str, ...]
  group_names: tuple[str, ...]
  image_shape: tuple[int, int, int]


def _builder(name: str, data_dir: str, manual_dir: str | None, options: dict
             ) -> tfds.core.GeneratorBasedBuilder:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
  config = None
  if name in _MANUAL_CONFIGS:
    if not manual_dir:
      raise ValueError(f"dataset {name!r} reads your files: set manual_dir to their folder")
    config = _MANUAL_CONFIGS[name](os.fspath(manual_dir), **options)
  elif name in _CATALOG_CONFIGS:
    config = _CATALOG_CONFIGS[name](**options)
  elif options:
    raise ValueError(f"dataset {name!r} takes no options, got {sorted(options)}")
  return DATASETS[name](data_dir=os.fspath(data_dir), config=config, file_format="array_record")


def _dataset(name: str, builder: tfds.core.GeneratorBasedBuilder, splits: dict) -> Dataset:
  features = builder.info.features
  return Dataset(name=name, splits=splits, class_names=tuple(features["label"].names),
                 group_names=tuple(features["group"].names),
                 image_shape=tuple(features["image"].shape))


def describe_dataset(name: str, data_dir: str, manual_dir: str | None = None,
                     **options) -> Dataset:
  """The dataset's classes, groups and image shape, without preparing it (no `splits`).

  Checks the name, the options and that the files a manual dataset reads are there.
  """
  return _dataset(name, _builder(name, data_dir, manual_dir, options), {})


def open_dataset(name: str, data_dir: str, manual_dir: str | None = None,
                 **options) -> Dataset:
  """Prepares the dataset under `data_dir` once (array_record), then opens its splits.

  Datasets made from files you have (`npz`, `csv`, `utkface`, `facet`) read them from
  `manual_dir`; those from the TFDS catalog (`cifar10s`, `cifar10_corrupted`, `celeb_a`) need
  TensorFlow to prepare. `options` go to their config (e.g. `filename`, `task`, `sensitive`,
  `image_size`, `seed`).
  """
  builder = _builder(name, data_dir, manual_dir, options)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=os.fspath(manual_dir) if manual_dir else None))
  return _dataset(name, builder, dict(builder.as_data_source()))
