"""Fairness and robustness datasets made from the TFDS catalog: CIFAR-10S, CIFAR-10-C, CelebA.

Each is our own array_record builder filled from a catalog dataset, so that reading it later is
TensorFlow-free like every other dataset. The catalog copy is prepared once, under the same
data_dir, by `read_catalog`: TFDS downloads it and encodes it with TensorFlow, the `[tf]` extra
(`pip install "moenas_jax[tf]"`). Once our dataset is prepared, the catalog copy (and
`data_dir/downloads`) may be deleted.

- `cifar10s`: CIFAR-10S (Wang et al., CVPR 2020). Group 0 colour, 1 grayscale (Pillow's ITU-R
  601 luma, on all three channels). Train: in classes 0-4 (airplane .. deer) a share `skew`
  (95%) of the images is colour and the rest grayscale; classes 5-9 (dog .. truck) the reverse.
  Validation (a stratified `validation` share of CIFAR-10 train) and test (CIFAR-10 test):
  half of each class grayscale. Which images are grayscale, and the validation images, follow
  from the seed.
- `cifar10_corrupted`: CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019), an evaluation set: the
  CIFAR-10 test images under the chosen corruptions at the chosen severities, all in the
  `test` split; the group is the severity ("severity 1" ..) or, with group_by="corruption",
  the corruption. Preparing it downloads the whole CIFAR-10-C archive (about 3 GB) once.
- `celeb_a`: CelebA faces with the binary attribute `task` as label ("not Smiling",
  "Smiling") and the binary attribute `sensitive` as group ("not Male", "Male"); the official
  train/validation/test partition; each face is centre-cropped to a square and resized.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

from moenas_jax.data import images, splits

# (catalog name[/config], split) → random-access examples of that catalog dataset.
Source = Callable[[str, str], Sequence[dict]]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10S_GROUPS = ("colour", "grayscale")
CELEB_A_ATTRIBUTES = (
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair",
    "Bushy_Eyebrows", "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair",
    "Heavy_Makeup", "High_Cheekbones", "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes",
    "No_Beard", "Oval_Face", "Pale_Skin", "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks",
    "Sideburns", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat",
    "Wearing_Lipstick", "Wearing_Necklace", "Wearing_Necktie", "Young")
INSTALL_TF = 'pip install "moenas_jax[tf]"  (in a checkout: pip install -e ".[tf]")'


# ----------------------------------------------------------------------------------------------
# The catalog source: the only part that may need TensorFlow.

def require_tensorflow(name: str) -> None:
  if importlib.util.find_spec("tensorflow") is None:
    raise ImportError(f"preparing the TFDS catalog dataset {name!r} needs TensorFlow, which is "
                      f"not installed: {INSTALL_TF}")


def read_catalog(name: str, split: str, data_dir: str) -> Sequence[dict]:
  """Random-access NumPy examples of a TFDS catalog dataset, prepared under data_dir once.

  Preparing (download, then encoding) needs TensorFlow; reading a prepared copy does not.
  """
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    require_tensorflow(name)
    builder.download_and_prepare()
  return builder.as_data_source(split=split)


def _examples(source: Sequence[dict]) -> Iterator[dict]:
  for index in range(len(source)):
    yield source[index]


class _CatalogBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder filled from catalog datasets through `source` (default: `read_catalog`)."""

  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, *, source: Source | None = None, **kwargs):
    super().__init__(**kwargs)
    self._source = source or functools.partial(read_catalog,
                                               data_dir=os.fspath(self.data_dir_root))

  def _info_with(self, classes: Sequence[str], groups: Sequence[str]) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=classes),
        "group": tfds.features.ClassLabel(names=groups),
    }))


def _check_image_size(image_size: int) -> None:
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")


# ----------------------------------------------------------------------------------------------
# CIFAR-10S

@dataclasses.dataclass
class Cifar10SConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  skew: float = 0.95
  validation: float = 0.1
  seed: int = 0


def cifar10s_config(image_size: int = 32, skew: float = 0.95, validation: float = 0.1,
                    seed: int = 0) -> Cifar10SConfig:
  _check_image_size(image_size)
  if not 0.5 <= skew <= 1.0:
    raise ValueError(f"CIFAR-10S skew is the majority group's share of a class, in [0.5, 1]; "
                     f"got {skew}")
  if not 0.0 < validation < 1.0:
    raise ValueError(f"validation is the share of CIFAR-10 train held out, in (0, 1); got "
                     f"{validation}")
  name = f"{image_size}px_skew{skew}_val{validation}_seed{seed}".replace(".", "_")
  return Cifar10SConfig(name=name, image_size=image_size, skew=skew, validation=validation,
                        seed=seed, description=f"CIFAR-10S, {skew:.0%} skew")


def grayscale(pixels: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] RGB → the same shape in gray: Pillow's "L" (ITU-R 601 luma, integer
  rounding as Pillow computes it) on every channel."""
  rgb = pixels.astype(np.uint32)
  luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
  return np.repeat(luma[..., None], 3, axis=-1).astype(np.uint8)


def cifar10s_groups(labels: np.ndarray, majority_share: float,
                    rng: np.random.Generator) -> np.ndarray:
  """Group per example: in each class, round(share · count) examples (drawn from rng) in the
  class's majority group (colour for classes 0-4, grayscale for 5-9), the others in the other
  group. A share of 0.5 balances every class."""
  groups = np.zeros(len(labels), np.int32)
  for label in range(len(CIFAR10_CLASSES)):
    members = rng.permutation(np.flatnonzero(labels == label))
    majority = int(label >= len(CIFAR10_CLASSES) // 2)
    cut = round(majority_share * len(members))
    groups[members[:cut]] = majority
    groups[members[cut:]] = 1 - majority
  return groups


class Cifar10S(_CatalogBuilder):
  """CIFAR-10S: colour/grayscale skewed per class in train, balanced elsewhere."""

  def _info(self) -> tfds.core.DatasetInfo:
    return self._info_with(CIFAR10_CLASSES, CIFAR10S_GROUPS)

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    data = {}
    for split in ("train", "test"):
      examples = list(_examples(self._source("cifar10", split)))
      data[split] = (np.stack([e["image"] for e in examples]),
                     np.array([e["label"] for e in examples], np.int32))
    train_images, train_labels = data["train"]
    held = splits.stratified_split(train_labels,
                                   (1 - config.validation, config.validation, 0.0), config.seed)
    parts = {"train": (train_images[held == 0], train_labels[held == 0]),
             "validation": (train_images[held == 1], train_labels[held == 1]),
             "test": data["test"]}
    generators = {}
    for index, split in enumerate(splits.SPLIT_NAMES):
      pixels, labels = parts[split]
      share = config.skew if split == "train" else 0.5
      groups = cifar10s_groups(labels, share, np.random.default_rng([config.seed, index]))
      generators[split] = self._generate_examples(pixels, labels, groups)
    return generators

  def _generate_examples(self, all_pixels, labels, groups):
    size = self.builder_config.image_size
    for index, (pixels, label, group) in enumerate(zip(all_pixels, labels, groups)):
      pixels = grayscale(pixels) if group else pixels
      yield index, {"image": images.resize(pixels, size), "label": label, "group": group}


# ----------------------------------------------------------------------------------------------
# CIFAR-10-C

@dataclasses.dataclass
class Cifar10CorruptedConfig(tfds.core.BuilderConfig):
  corruptions: tuple[str, ...] = ("brightness", "contrast")
  severities: tuple[int, ...] = (1, 2, 3, 4, 5)
  group_by: str = "severity"
  image_size: int = 32


def known_corruptions() -> tuple[str, ...]:
  """The corruption names of the catalog's cifar10_corrupted (its configs are name_severity)."""
  configs = tfds.builder_cls("cifar10_corrupted").BUILDER_CONFIGS
  return tuple(sorted({config.corruption for config in configs}))


def cifar10_corrupted_config(corruptions: Sequence[str] = ("brightness", "contrast"),
                             severities: Sequence[int] = (1, 2, 3, 4, 5),
                             group_by: str = "severity",
                             image_size: int = 32) -> Cifar10CorruptedConfig:
  _check_image_size(image_size)
  corruptions, severities = tuple(corruptions), tuple(int(s) for s in severities)
  unknown = sorted(set(corruptions) - set(known_corruptions()))
  if unknown or not corruptions:
    raise ValueError(f"CIFAR-10-C corruptions {unknown or list(corruptions)} are not known; "
                     f"choose from {list(known_corruptions())}")
  if not severities or not set(severities) <= {1, 2, 3, 4, 5}:
    raise ValueError(f"CIFAR-10-C severities must be among 1..5, got {list(severities)}")
  if group_by not in ("severity", "corruption"):
    raise ValueError(f"group_by must be 'severity' or 'corruption', got {group_by!r}")
  if len(set(corruptions)) < len(corruptions) or len(set(severities)) < len(severities):
    raise ValueError(f"corruptions {list(corruptions)} and severities {list(severities)} must "
                     f"not repeat")
  name = "_".join([*corruptions, "s" + "".join(map(str, severities)), "by", group_by,
                   f"{image_size}px"])
  return Cifar10CorruptedConfig(name=name, corruptions=corruptions, severities=severities,
                                group_by=group_by, image_size=image_size,
                                description=f"CIFAR-10-C by {group_by}")


class Cifar10CorruptedGroups(_CatalogBuilder):
  """CIFAR-10-C test images with their severity (or corruption) as the group."""

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    groups = (tuple(f"severity {s}" for s in config.severities) if config.group_by == "severity"
              else config.corruptions)
    return self._info_with(CIFAR10_CLASSES, groups)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"test": self._generate_examples()}

  def _generate_examples(self):
    config = self.builder_config
    for c, corruption in enumerate(config.corruptions):
      for s, severity in enumerate(config.severities):
        group = s if config.group_by == "severity" else c
        source = self._source(f"cifar10_corrupted/{corruption}_{severity}", "test")
        for index, example in enumerate(_examples(source)):
          yield f"{corruption}_{severity}_{index}", {
              "image": images.resize(example["image"], config.image_size),
              "label": example["label"], "group": group}


# ----------------------------------------------------------------------------------------------
# CelebA

@dataclasses.dataclass
class CelebAConfig(tfds.core.BuilderConfig):
  task: str = "Smiling"
  sensitive: str = "Male"
  image_size: int = 64


def celeb_a_config(task: str = "Smiling", sensitive: str = "Male",
                   image_size: int = 64) -> CelebAConfig:
  _check_image_size(image_size)
  for role, attribute in (("task", task), ("sensitive", sensitive)):
    if attribute not in CELEB_A_ATTRIBUTES:
      raise ValueError(f"CelebA {role} attribute {attribute!r} is unknown; choose one of "
                       f"{list(CELEB_A_ATTRIBUTES)}")
  if task == sensitive:
    raise ValueError(f"task and sensitive attribute are both {task!r}; choose two different")
  return CelebAConfig(name=f"{task}_by_{sensitive}_{image_size}px", task=task,
                      sensitive=sensitive, image_size=image_size,
                      description=f"CelebA {task} by {sensitive}")


def centre_square(pixels: np.ndarray) -> np.ndarray:
  """The largest centred square of an [H, W, C] image (CelebA's 218x178 → rows 20..197)."""
  height, width = pixels.shape[:2]
  side = min(height, width)
  top, left = (height - side) // 2, (width - side) // 2
  return pixels[top:top + side, left:left + side]


class CelebAGroups(_CatalogBuilder):
  """CelebA with a task attribute as label and a sensitive attribute as group."""

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    return self._info_with((f"not {config.task}", config.task),
                          (f"not {config.sensitive}", config.sensitive))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in splits.SPLIT_NAMES}

  def _generate_examples(self, split):
    config = self.builder_config
    for index, example in enumerate(_examples(self._source("celeb_a", split))):
      yield index, {
          "image": images.resize(centre_square(example["image"]), config.image_size),
          "label": int(example["attributes"][config.task]),
          "group": int(example["attributes"][config.sensitive])}
