"""Tests of the embedded Fashion-Tones dataset: its archive, its rendering, how it is made."""

import gzip
import os

import numpy as np
import pytest

from moenas_jax.data import fashion_tones


def test_the_archive_is_small_and_follows_the_protocol():
  assert os.path.getsize(fashion_tones.ARCHIVE) <= 5 * 1024 * 1024
  for split, per_class in fashion_tones.PER_CLASS.items():
    data = fashion_tones.load(split)
    assert data["image"].shape == (10 * per_class, 28, 28, 3)
    assert data["image"].dtype == np.uint8
    for label in range(10):
      groups = data["group"][data["label"] == label]
      dark = int((groups == 1).sum())
      # Train: 95% of every class light; validation and test: balanced.
      assert dark == (per_class // 20 if split == "train" else per_class // 2), (split, label)


def test_render_paints_tone_over_background():
  gray = np.array([[[0, 255]]], np.uint8).repeat(2, axis=0)  # background pixel, full garment
  images = fashion_tones.render(gray, np.array([0, 1]))
  np.testing.assert_array_equal(images[0, 0, 0], [0, 0, 0])
  np.testing.assert_array_equal(images[0, 0, 1], np.round(255 * fashion_tones.TONES[0]))
  np.testing.assert_array_equal(images[1, 0, 0], [217, 217, 217])  # 0.85 * 255
  np.testing.assert_array_equal(images[1, 0, 1], np.round(255 * fashion_tones.TONES[1]))


def _write_idx(path, array, header):
  with gzip.open(path, "wb") as f:
    f.write(bytes(header) + array.astype(np.uint8).tobytes())


def test_make_is_deterministic_with_disjoint_splits(tmp_path):
  # A fake source: 650 training and 220 test images per class, each image unique
  # (its index written in its first two pixels).
  for prefix, per_class, header_size in (("train", 650, 16), ("t10k", 220, 16)):
    count = 10 * per_class
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(count) % 256, np.arange(count) // 256
    _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, [0] * header_size)
    _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10, [0] * 8)
  first, second = fashion_tones.make(str(tmp_path)), fashion_tones.make(str(tmp_path))
  for name in first:
    np.testing.assert_array_equal(first[name], second[name])
  ids = first["images"][:, 0, 0].astype(int) + 256 * first["images"][:, 0, 1].astype(int)
  train_ids = set(ids[first["splits"] == 0])
  validation_ids = set(ids[first["splits"] == 1])
  assert len(train_ids) == 5000 and len(validation_ids) == 1000
  assert not train_ids & validation_ids
  # Labels follow the source: image i has label i % 10.
  np.testing.assert_array_equal(ids[first["splits"] < 2] % 10, first["labels"][first["splits"] < 2])


def test_unknown_split_is_refused():
  with pytest.raises(ValueError, match="unknown split 'dev'; Fashion-Tones has"):
    fashion_tones.load("dev")
