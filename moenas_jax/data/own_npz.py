"""Your own data, no code: a TFDS builder for an `.npz` of images, labels and groups.

The file (in `manual_dir`, default name `data.npz`) holds `images` (uint8 [N, H, W, C] or
[N, H, W]), `labels` and `groups` (ints [N]); optionally `split` ([N], 0/1/2 or
"train"/"validation"/"test"; without it a stratified 80/10/10 split by (label, group) is drawn
from the seed), `class_names` and `group_names`.
"""

from __future__ import annotations

import dataclasses
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from moenas_jax.data import manual, splits


@dataclasses.dataclass
class NpzConfig(tfds.core.BuilderConfig):
  """Where the file is and how to split it; the config name identifies the file's content."""

  path: str = ""
  seed: int = 0
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


def config_for(manual_dir: str, filename: str = "data.npz", seed: int = 0,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> NpzConfig:
  """A config named after the file's content and the split settings."""
  path = manual.locate(manual_dir, filename, ".npz with images, labels and groups")
  return NpzConfig(name=manual.content_name("npz", path, seed, fractions), path=path, seed=seed,
                   fractions=tuple(fractions))


def _read(path: str, names: tuple[str, ...]) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as archive:
    return {name: archive[name] for name in names if name in archive}


def _image_shape(path: str) -> tuple[int, ...]:
  """Shape of `images` from the .npy header, without loading the pixels."""
  with zipfile.ZipFile(path) as archive, archive.open("images.npy") as f:
    major, _ = np.lib.format.read_magic(f)
    read_header = (np.lib.format.read_array_header_1_0 if major == 1
                   else np.lib.format.read_array_header_2_0)
    shape, _, _ = read_header(f)
  return tuple(shape)


class OwnNpz(tfds.core.GeneratorBasedBuilder):
  """Images, labels and groups from one .npz file (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []

  def _info(self) -> tfds.core.DatasetInfo:
    path = self.builder_config.path
    meta = _read(path, ("labels", "groups", "split", "class_names", "group_names"))
    for name in ("labels", "groups"):
      if name not in meta:
        raise ValueError(f"{path} has no {name!r} array; it needs images, labels and groups")
    shape = _image_shape(path)
    if len(shape) not in (3, 4):
      raise ValueError(f"{path}: images have shape {shape}; they must be [N, H, W] or "
                       f"[N, H, W, C]")
    for name in ("labels", "groups", "split"):
      if name in meta and meta[name].shape != (shape[0],):
        size = (f"length {len(meta[name])}" if meta[name].ndim == 1
                else f"shape {meta[name].shape}")
        raise ValueError(f"{path}: {name} has {size} but images has length {shape[0]}; give "
                         f"{name} one value per image (shape [{shape[0]}])")
    names = {key: [str(n) for n in meta[f"{key}_names"]] if f"{key}_names" in meta else
             [str(i) for i in range(int(meta[ids].max()) + 1)]
             for key, ids in (("class", "labels"), ("group", "groups"))}
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(*shape[1:3], shape[3] if len(shape) == 4 else 1),
                                      dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=names["class"]),
        "group": tfds.features.ClassLabel(names=names["group"]),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    arrays = _read(config.path, ("images", "labels", "groups", "split"))
    if arrays["images"].dtype != np.uint8:
      raise ValueError(f"{config.path}: images must be uint8 (0..255), got "
                       f"{arrays['images'].dtype}")
    split = splits.resolve(arrays.get("split"), arrays["labels"], arrays["groups"],
                           config.fractions, config.seed, config.path)
    images = arrays["images"] if arrays["images"].ndim == 4 else arrays["images"][..., None]
    return {name: self._generate_examples(images, arrays["labels"], arrays["groups"],
                                          np.flatnonzero(split == i))
            for i, name in enumerate(splits.SPLIT_NAMES) if (split == i).any()}

  def _generate_examples(self, images, labels, groups, indices):
    for index in indices:
      yield int(index), {"image": images[index], "label": int(labels[index]),
                         "group": int(groups[index])}
