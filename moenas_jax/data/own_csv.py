"""Your own data, no code: a TFDS builder for a CSV of `image,label,group` rows.

The CSV (in `manual_dir`, default name `data.csv`) has a header with at least `image`, `label`
and `group`, optionally `split` (0/1/2 or train/validation/test; without it a stratified
80/10/10 split by (label, group) is drawn from the seed). Image paths are relative to the CSV;
any format Pillow reads; every image is resized to `image_size` (RGB, or grayscale with
`channels=1`). Labels and groups may be integers (names "0", "1", ...) or names (sorted).
Missing or unreadable images are skipped, counted and reported in one warning.
"""

from __future__ import annotations

import csv
import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from moenas_jax.data import images, manual, splits

COLUMNS = ("image", "label", "group")


@dataclasses.dataclass
class CsvConfig(tfds.core.BuilderConfig):
  path: str = ""
  image_size: int = 64
  channels: int = 3
  seed: int = 0
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


def _read_rows(path: str) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path}: the header needs the columns {list(COLUMNS)} (optionally "
                       f"split); missing {missing} in {reader.fieldnames}")
    rows = list(reader)
  if not rows:
    raise ValueError(f"{path} has a header but no rows")
  return rows


def _ids(values: list[str]) -> tuple[np.ndarray, tuple[str, ...]]:
  """Integer ids and names: integers stay (names "0".."max"), names are sorted."""
  if all(v.strip().isdigit() for v in values):
    ids = np.array([int(v) for v in values], np.int32)
    return ids, tuple(str(i) for i in range(int(ids.max()) + 1))
  names = tuple(sorted(set(values)))
  return np.array([names.index(v) for v in values], np.int32), names


def config_for(manual_dir: str, filename: str = "data.csv", image_size: int = 64,
               channels: int = 3, seed: int = 0,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> CsvConfig:
  """A config named after the CSV's content and the image and split settings."""
  path = manual.locate(manual_dir, filename, "CSV of image,label,group rows")
  if channels not in (1, 3) or image_size < 1:
    raise ValueError(f"channels must be 1 or 3 and image_size positive, got {channels}, "
                     f"{image_size}")
  return CsvConfig(name=manual.content_name("csv", path, image_size, channels, seed, fractions),
                   path=path, image_size=image_size, channels=channels, seed=seed,
                   fractions=tuple(fractions))


class OwnCsv(tfds.core.GeneratorBasedBuilder):
  """Images listed in a CSV with their labels and groups (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    rows = _read_rows(config.path)
    _, class_names = _ids([r["label"] for r in rows])
    _, group_names = _ids([r["group"] for r in rows])
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(
            shape=(config.image_size, config.image_size, config.channels), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=class_names),
        "group": tfds.features.ClassLabel(names=group_names),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    rows = _read_rows(config.path)
    labels, _ = _ids([r["label"] for r in rows])
    groups, _ = _ids([r["group"] for r in rows])
    given = [r["split"] for r in rows] if "split" in rows[0] else None
    split = splits.resolve(given, labels, groups, config.fractions, config.seed, config.path)
    folder = os.path.dirname(config.path)
    return {name: self._generate_examples(folder, rows, labels, groups,
                                          np.flatnonzero(split == i), name)
            for i, name in enumerate(splits.SPLIT_NAMES) if (split == i).any()}

  def _generate_examples(self, folder, rows, labels, groups, indices, split_name):
    config, skipped = self.builder_config, 0
    for index in indices:
      path = os.path.join(folder, rows[index]["image"])
      pixels = None
      if os.path.isfile(path):
        with open(path, "rb") as f:
          pixels = images.decode(f.read(), config.image_size, config.channels)
      if pixels is None:
        skipped += 1
        continue
      yield int(index), {"image": pixels, "label": int(labels[index]),
                         "group": int(groups[index])}
    if skipped:
      logging.warning("%s (%s): skipped %d missing or unreadable images", config.path,
                      split_name, skipped)
