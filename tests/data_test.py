"""Tests of the dataset table and the TF-free read path."""

import logging

import numpy as np
import pytest
from PIL import Image

from moenas_jax import data
from moenas_jax.data import fashion_tones, pipeline


def test_fashion_tones_prepares_and_reads_every_split(tmp_path):
  dataset = data.open_dataset("fashion_tones", tmp_path)
  assert dataset.class_names == fashion_tones.CLASS_NAMES
  assert dataset.group_names == ("light", "dark")
  assert dataset.image_shape == (28, 28, 3)
  for split, per_class in fashion_tones.PER_CLASS.items():
    source = dataset.splits[split]
    assert len(source) == 10 * per_class
    example = source[0]
    assert example["image"].shape == (28, 28, 3) and example["image"].dtype == np.uint8
  # The records are the archive's examples (in TFDS order): same label/group counts.
  test = pipeline.read_split(dataset.splits["test"], len(dataset.class_names),
                             len(dataset.group_names), name="test")
  expected = fashion_tones.load("test")
  np.testing.assert_array_equal(np.bincount(test["label"] * 2 + test["group"]),
                                np.bincount(expected["label"] * 2 + expected["group"]))
  assert sorted(map(bytes, test["image"])) == sorted(map(bytes, expected["image"]))
  # A second open reuses the prepared files.
  assert len(data.open_dataset("fashion_tones", tmp_path).splits["train"]) == 5000


def test_reading_never_imports_tensorflow(tmp_path, opens_without_tensorflow):
  opens_without_tensorflow(tmp_path, "fashion_tones")


def test_unknown_dataset_lists_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'cifar'; known datasets: celeb_a, "
                     "cifar10_corrupted, cifar10s, csv, facet, fashion_tones, npz, utkface"):
    data.open_dataset("cifar", tmp_path)


def _write_npz(folder, **arrays):
  folder.mkdir(parents=True, exist_ok=True)
  np.savez(folder / "data.npz", **arrays)
  return folder


def test_own_npz_with_given_splits_and_names(tmp_path):
  images = np.arange(12 * 4 * 4, dtype=np.uint8).reshape(12, 4, 4)  # grayscale [N, H, W]
  folder = _write_npz(tmp_path / "mine", images=images, labels=np.arange(12) % 3,
                      groups=np.arange(12) % 2, class_names=np.array(["a", "b", "c"]),
                      split=np.array(["train"] * 8 + ["validation"] * 2 + ["test"] * 2))
  dataset = data.open_dataset("npz", tmp_path / "tfds", manual_dir=folder)
  assert dataset.class_names == ("a", "b", "c") and dataset.group_names == ("0", "1")
  assert dataset.image_shape == (4, 4, 1)
  assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 8, "validation": 2,
                                                           "test": 2}
  test = pipeline.read_split(dataset.splits["test"], 3, 2)
  np.testing.assert_array_equal(np.sort(test["image"][:, 0, 0, 0]), images[10:, 0, 0])


def test_own_npz_without_splits_is_split_by_label_and_group(tmp_path):
  folder = _write_npz(tmp_path / "mine", images=np.zeros((40, 2, 2, 3), np.uint8),
                      labels=np.arange(40) % 2, groups=(np.arange(40) // 2) % 2)
  dataset = data.open_dataset("npz", tmp_path / "tfds", manual_dir=folder, seed=3)
  assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 32, "validation": 4,
                                                           "test": 4}


@pytest.mark.parametrize("arrays, message", [
    (dict(images=np.zeros((4, 2, 2, 3), np.uint8), labels=np.zeros(4, int)),
     "has no 'groups' array"),
    (dict(images=np.zeros((4, 2, 2, 3), np.float32), labels=np.zeros(4, int),
          groups=np.zeros(4, int)), "images must be uint8"),
    (dict(images=np.zeros((4, 2, 2, 3), np.uint8), labels=np.zeros(4, int),
          groups=np.zeros(4, int), split=np.array(["train", "dev", "test", "test"])),
     r"split values \[.dev.\] are not 0/1/2"),
    # Only groups is short: labels match the 4 images, groups has 3 values.
    (dict(images=np.zeros((4, 2, 2, 3), np.uint8), labels=np.zeros(4, int),
          groups=np.zeros(3, int)),
     r"groups has length 3 but images has length 4; give groups one value per image"),
    (dict(images=np.zeros((4, 2, 2, 3), np.uint8), labels=np.zeros((4, 1), int),
          groups=np.zeros(4, int)), r"labels has shape \(4, 1\) but images has length 4"),
    (dict(images=np.zeros((4, 2, 2, 3), np.uint8), labels=np.zeros(4, int),
          groups=np.zeros(4, int), split=np.array(["train"] * 5)),
     "split has length 5 but images has length 4"),
    (dict(images=np.zeros((4, 2), np.uint8), labels=np.zeros(4, int), groups=np.zeros(4, int)),
     r"images have shape \(4, 2\); they must be \[N, H, W\] or \[N, H, W, C\]"),
])
def test_own_npz_errors_name_the_fix(tmp_path, arrays, message):
  folder = _write_npz(tmp_path / "mine", **arrays)
  with pytest.raises(ValueError, match=message):
    data.open_dataset("npz", tmp_path / "tfds", manual_dir=folder)


def test_own_npz_needs_its_folder_and_file(tmp_path):
  with pytest.raises(ValueError, match="reads your files: set manual_dir"):
    data.open_dataset("npz", tmp_path)
  with pytest.raises(ValueError, match="no data.npz in manual_dir"):
    data.open_dataset("npz", tmp_path, manual_dir=tmp_path)


def _write_csv(folder, rows, header="image,label,group,split"):
  (folder / "pics").mkdir(parents=True)
  for name, value, fmt in {(r[0], r[4], r[5]) for r in rows if r[4] is not None}:
    Image.fromarray(np.full((6, 9, 3), value, np.uint8)).save(folder / "pics" / name, format=fmt)
  lines = [header] + [",".join(f"pics/{r[0]}" if i == 0 else str(r[i]) for i in range(4))
                      for r in rows]
  (folder / "data.csv").write_text("\n".join(lines) + "\n")
  return folder


def test_own_csv_reads_images_of_any_format_and_names(tmp_path, caplog):
  rows = [(f"{i}.{'png' if i % 2 else 'jpg'}", ["cat", "dog"][i % 2], i % 3,
           "train" if i < 6 else "test", 30 * i, "PNG" if i % 2 else "JPEG") for i in range(8)]
  rows.append(("missing.png", "cat", 0, "test", None, None))
  folder = _write_csv(tmp_path / "mine", rows)
  with caplog.at_level(logging.WARNING):
    dataset = data.open_dataset("csv", tmp_path / "tfds", manual_dir=folder, image_size=4)
  assert dataset.class_names == ("cat", "dog") and dataset.group_names == ("0", "1", "2")
  assert dataset.image_shape == (4, 4, 3)
  assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 6, "test": 2}
  assert "skipped 1 missing or unreadable images" in caplog.text
  train = pipeline.read_split(dataset.splits["train"], 2, 3)
  # Sorted pixel values: JPEGs near 0, 60, 120 between the exact PNGs 30, 90, 150.
  np.testing.assert_array_equal(np.sort(train["image"][:, 0, 0, 0])[1::2], [30, 90, 150])


def test_own_csv_needs_its_columns(tmp_path):
  folder = _write_csv(tmp_path / "mine", [("a.png", 0, 0, 0, 9, "PNG")],
                      header="image,class,group,split")
  with pytest.raises(ValueError, match=r"the header needs the columns \['image', 'label', "
                                       r"'group'\]"):
    data.open_dataset("csv", tmp_path / "tfds", manual_dir=folder)
