"""Fashion-Tones: the embedded default dataset, a Fashion-MNIST fairness benchmark.

Fashion-MNIST garments (MIT licence, Zalando Research) rendered in one of two tones, the
sensitive attribute: group 0 "light" and group 1 "dark" (RGB tints, like the two ends of a
skin-tone scale; the dark tone also has less contrast against the black background, as dark
skin under poor exposure). As in CIFAR-10S (Wang et al., CVPR 2020) the tone is skewed per
class in the training split (`TRAIN_SKEW` of each class in its majority tone) and balanced
(50/50 per class) in validation and test, so what a model learns from the skew shows on test.

The package ships `embedded/fashion_tones.npz` (grayscale garments, labels, groups, split
ids; `render` tints them). It is made from the original Fashion-MNIST files, which Debian
packages, by this module:

    apt-get install dataset-fashion-mnist
    python -m moenas_jax.data.fashion_tones   # writes moenas_jax/data/embedded/...npz

The selection is deterministic (seed 0): the same files give the same archive.
"""

from __future__ import annotations

import argparse
import gzip
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from moenas_jax.data.splits import SPLIT_NAMES

CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
               "sneaker", "bag", "ankle boot")
GROUP_NAMES = ("light", "dark")
TONES = np.array([[0.96, 0.80, 0.69], [0.35, 0.22, 0.14]], np.float32)  # RGB per group
BACKGROUNDS = np.array([[0.0, 0.0, 0.0], [0.85, 0.85, 0.85]], np.float32)
PER_CLASS = {"train": 500, "validation": 100, "test": 200}
TRAIN_SKEW = 0.95
# Majority tone of each class in the training split.
MAJORITY_GROUP = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
ARCHIVE = pathlib.Path(__file__).parent / "embedded" / "fashion_tones.npz"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"


def render(gray: np.ndarray, groups: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28] garments and their groups → uint8 [N, 28, 28, 3] images.

  A garment of coverage x ∈ [0, 1] per pixel is painted in its group's tone over its group's
  background: light garments on black, dark garments on a light background.
  """
  coverage = gray[..., None].astype(np.float32) / 255.0
  tone = TONES[groups][:, None, None, :]
  background = BACKGROUNDS[groups][:, None, None, :]
  return np.round(255.0 * (coverage * tone + (1.0 - coverage) * background)).astype(np.uint8)


def load(split: str) -> dict[str, np.ndarray]:
  """One split of the shipped archive: rendered uint8 images [N, 28, 28, 3], labels, groups."""
  if split not in SPLIT_NAMES:
    raise ValueError(f"unknown split {split!r}; Fashion-Tones has {list(SPLIT_NAMES)}")
  with np.load(ARCHIVE) as archive:
    chosen = archive["splits"] == SPLIT_NAMES.index(split)
    gray, labels, groups = (archive[name][chosen] for name in ("images", "labels", "groups"))
  return {"image": render(gray, groups), "label": labels, "group": groups}


class FashionTones(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of Fashion-Tones from the shipped archive (nothing to download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "8,000 images; light 95% of every class in train, 50/50 elsewhere."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(28, 28, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
            "group": tfds.features.ClassLabel(names=GROUP_NAMES),
        }),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in SPLIT_NAMES}

  def _generate_examples(self, split: str):
    data = load(split)
    for index in range(len(data["label"])):
      yield index, {name: values[index] for name, values in data.items()}


def _read_idx(path: str, offset: int) -> np.ndarray:
  with gzip.open(path) as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def _tones(count: int, label: int, split: str, rng: np.random.Generator) -> np.ndarray:
  """Group ids of one class in one split: skewed in train, balanced elsewhere."""
  if split == "train":
    majority = MAJORITY_GROUP[label]
    tones = np.full(count, 1 - majority, np.int32)
    tones[:round(count * TRAIN_SKEW)] = majority
  else:
    tones = np.arange(count, dtype=np.int32) % 2
  return rng.permutation(tones)


def make(source_dir: str, seed: int = 0) -> dict[str, np.ndarray]:
  """Selects the subset and assigns tones; returns the arrays of the archive."""
  rng = np.random.default_rng(seed)

  def read(name: str, offset: int) -> np.ndarray:
    return _read_idx(os.path.join(source_dir, name), offset)

  original = {
      "train": (read("train-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
                read("train-labels-idx1-ubyte.gz", 8)),
      "test": (read("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
               read("t10k-labels-idx1-ubyte.gz", 8)),
  }
  # Train and validation: disjoint images of the original training split; test: its test split.
  parts = {name: [] for name in ("images", "labels", "groups", "splits")}
  for label in range(len(CLASS_NAMES)):
    order = {name: rng.permutation(np.flatnonzero(targets == label))
             for name, (_, targets) in original.items()}
    start = {"train": 0, "validation": PER_CLASS["train"], "test": 0}
    for split_id, split in enumerate(SPLIT_NAMES):
      source = "test" if split == "test" else "train"
      count = PER_CLASS[split]
      chosen = order[source][start[split]:start[split] + count]
      parts["images"].append(original[source][0][chosen])
      parts["labels"].append(np.full(count, label, np.int32))
      parts["groups"].append(_tones(count, label, split, rng))
      parts["splits"].append(np.full(count, split_id, np.int32))
  return {name: np.concatenate(values) for name, values in parts.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description="Make the embedded Fashion-Tones archive.")
  parser.add_argument("--source_dir", default=DEBIAN_DIR)
  parser.add_argument("--output", default=str(ARCHIVE))
  args = parser.parse_args()
  arrays = make(args.source_dir)
  tmp = args.output + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, args.output)
  print(f"wrote {args.output}: {os.path.getsize(args.output) / 1e6:.2f} MB, "
        f"{len(arrays['labels'])} images")


if __name__ == "__main__":
  main()
