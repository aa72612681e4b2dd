"""Tests of the catalog-backed datasets, fed without TensorFlow: hand-made sources and mock_data."""

import collections
import importlib.util
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from moenas_jax import data
from moenas_jax.data import catalog, pipeline


def _prepare(builder_cls, config, data_dir, source):
  builder = builder_cls(data_dir=os.fspath(data_dir), config=config, source=source,
                        file_format="array_record")
  builder.download_and_prepare()
  return {split: pipeline.read_split(s, len(builder.info.features["label"].names),
                                     len(builder.info.features["group"].names), split)
          for split, s in builder.as_data_source().items()}


def _cifar10(per_class):
  """A fake `cifar10` source: random 32x32 images, `per_class[split]` of each class."""
  rng = np.random.default_rng(7)
  examples = {split: [{"image": rng.integers(0, 256, (32, 32, 3), np.uint8), "label": label}
                      for label in range(10) for _ in range(count)]
              for split, count in per_class.items()}
  calls = []

  def source(name, split):
    calls.append((name, split))
    return examples[split]

  return source, examples, calls


def _cells(split):
  """Counts [N classes, 2 groups]."""
  return np.bincount(split["label"] * 2 + split["group"], minlength=20).reshape(10, 2)


def test_grayscale_is_pillows_luma():
  pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
  gray = catalog.grayscale(pixels)
  np.testing.assert_array_equal(gray[..., 0], np.asarray(Image.fromarray(pixels).convert("L")))
  np.testing.assert_array_equal(gray[..., 0], gray[..., 2])
  # 0.299 · 255 = 76.2 → 76; 0.587 · 255 = 149.7 → 150; 0.114 · 255 = 29.1 → 29.
  np.testing.assert_array_equal(
      catalog.grayscale(np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8))[:, 0],
      [76, 150, 29])


def test_cifar10s_skews_train_and_balances_evaluation(tmp_path):
  source, examples, calls = _cifar10({"train": 20, "test": 4})
  config = catalog.cifar10s_config(seed=0)
  prepared = _prepare(catalog.Cifar10S, config, tmp_path / "a", source)
  assert sorted(calls) == [("cifar10", "test"), ("cifar10", "train")]
  # 20 train images per class: 2 held out for validation, 18 left; round(0.95 · 18) = 17.
  expected_train = np.array([[17, 1]] * 5 + [[1, 17]] * 5)
  np.testing.assert_array_equal(_cells(prepared["train"]), expected_train)
  np.testing.assert_array_equal(_cells(prepared["validation"]), np.ones((10, 2)))
  np.testing.assert_array_equal(_cells(prepared["test"]), np.full((10, 2), 2))
  # Every source image once: as it is (colour) or in Pillow's gray (grayscale).
  for split, parts in (("train", ("train", "validation")), ("test", ("test",))):
    colour = {e["image"].tobytes() for e in examples[split]}
    gray = {catalog.grayscale(e["image"]).tobytes() for e in examples[split]}
    made = [(p["image"][i].tobytes(), p["group"][i]) for p in map(prepared.get, parts)
            for i in range(len(p["label"]))]
    assert len({image for image, _ in made}) == len(examples[split])
    assert all(image in (gray if group else colour) for image, group in made)
  # The same seed gives the same dataset; another seed another choice of images.
  again = _prepare(catalog.Cifar10S, config, tmp_path / "b", source)
  for split in prepared:
    for key in ("image", "label", "group"):
      np.testing.assert_array_equal(prepared[split][key], again[split][key])
  other = _prepare(catalog.Cifar10S, catalog.cifar10s_config(seed=1), tmp_path / "c", source)
  np.testing.assert_array_equal(_cells(other["train"]), expected_train)
  assert not np.array_equal(other["train"]["image"], prepared["train"]["image"])


def test_cifar10s_resizes(tmp_path):
  source, _, _ = _cifar10({"train": 10, "test": 2})
  prepared = _prepare(catalog.Cifar10S, catalog.cifar10s_config(image_size=8, skew=1.0),
                      tmp_path, source)
  assert prepared["train"]["image"].shape == (90, 8, 8, 3)
  np.testing.assert_array_equal(_cells(prepared["train"]),
                                [[9, 0]] * 5 + [[0, 9]] * 5)  # skew 1: no minority at all


def test_cifar10_corrupted_groups_by_severity_or_corruption(tmp_path):
  calls = []

  def source(name, split):
    calls.append((name, split))
    severity = int(name[-1])
    return [{"image": np.full((32, 32, 3), 10 * severity, np.uint8), "label": label}
            for label in range(3)]

  prepared = _prepare(catalog.Cifar10CorruptedGroups, catalog.cifar10_corrupted_config(
      corruptions=["fog", "brightness"], severities=[2, 5]), tmp_path / "a", source)
  assert sorted(calls) == [(f"cifar10_corrupted/{c}_{s}", "test")
                           for c in ("brightness", "fog") for s in (2, 5)]
  test = prepared["test"]
  assert list(prepared) == ["test"] and len(test["label"]) == 12
  np.testing.assert_array_equal(np.bincount(test["group"]), [6, 6])
  # Group 0 is severity 2 (pixels 20), group 1 severity 5 (pixels 50).
  np.testing.assert_array_equal(test["image"][:, 0, 0, 0], np.where(test["group"], 50, 20))
  by_corruption = _prepare(catalog.Cifar10CorruptedGroups, catalog.cifar10_corrupted_config(
      corruptions=["fog", "brightness"], severities=[2, 5], group_by="corruption",
      image_size=4), tmp_path / "b", source)["test"]
  assert by_corruption["image"].shape == (12, 4, 4, 3)
  np.testing.assert_array_equal(np.bincount(by_corruption["group"]), [6, 6])
  builder = catalog.Cifar10CorruptedGroups(
      data_dir=os.fspath(tmp_path / "b"), file_format="array_record",
      config=catalog.cifar10_corrupted_config(corruptions=["fog", "brightness"],
                                              severities=[2, 5], group_by="corruption",
                                              image_size=4))
  assert builder.info.features["group"].names == ["fog", "brightness"]


def _celeb_a(task_values, group_values):
  """Fake CelebA faces: 12x8, blue in the centre 8x8 square, red in the 2 rows above/below."""
  face = np.full((12, 8, 3), (0, 0, 255), np.uint8)
  face[:2], face[-2:] = (255, 0, 0), (255, 0, 0)
  attributes = dict.fromkeys(catalog.CELEB_A_ATTRIBUTES, False)
  return [{"image": face, "attributes": {**attributes, "Smiling": t, "Pale_Skin": g}}
          for t, g in zip(task_values, group_values)]


def test_celeb_a_takes_task_and_sensitive_attributes(tmp_path):
  faces = {"train": _celeb_a([True, False, True, True], [False, False, True, True]),
           "validation": _celeb_a([False], [True]),
           "test": _celeb_a([True, False], [True, False])}
  config = catalog.celeb_a_config(task="Smiling", sensitive="Pale_Skin", image_size=4)
  prepared = _prepare(catalog.CelebAGroups, config, tmp_path,
                      lambda name, split: faces[split] if name == "celeb_a" else None)
  # (label, group) of each face, in any order (TFDS shuffles the records).
  pairs = {split: collections.Counter(zip(p["label"].tolist(), p["group"].tolist()))
           for split, p in prepared.items()}
  assert pairs == {"train": {(1, 0): 1, (0, 0): 1, (1, 1): 2}, "validation": {(0, 1): 1},
                   "test": {(1, 1): 1, (0, 0): 1}}
  # The centre square holds no red row: every pixel of the resized face is blue.
  np.testing.assert_array_equal(prepared["test"]["image"],
                                np.broadcast_to(np.array([0, 0, 255], np.uint8), (2, 4, 4, 3)))
  builder = catalog.CelebAGroups(data_dir=os.fspath(tmp_path), config=config,
                                 file_format="array_record")
  assert builder.info.features["label"].names == ["not Smiling", "Smiling"]
  assert builder.info.features["group"].names == ["not Pale_Skin", "Pale_Skin"]


def test_the_catalog_reader_fits_the_catalog_features(tmp_path, monkeypatch):
  # mock_data serves random examples with each catalog dataset's real features, no TensorFlow.
  monkeypatch.setattr(catalog, "require_tensorflow", lambda name: None)

  def mocked(name, split):
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE):
      source = catalog.read_catalog(name, split, os.fspath(tmp_path / "catalog"))
      return [source[i] for i in range(len(source))]

  assert set(mocked("celeb_a", "test")[0]["attributes"]) == set(catalog.CELEB_A_ATTRIBUTES)
  cifar10s = _prepare(catalog.Cifar10S, catalog.cifar10s_config(), tmp_path / "s", mocked)
  assert {k: len(v["label"]) for k, v in cifar10s.items()} == {"train": 11, "validation": 1,
                                                               "test": 12}
  corrupted = _prepare(catalog.Cifar10CorruptedGroups, catalog.cifar10_corrupted_config(
      corruptions=["brightness"], severities=[1, 3]), tmp_path / "c", mocked)
  np.testing.assert_array_equal(np.bincount(corrupted["test"]["group"]), [12, 12])
  celeb_a = _prepare(catalog.CelebAGroups, catalog.celeb_a_config(image_size=8),
                     tmp_path / "a", mocked)
  assert celeb_a["train"]["image"].shape == (12, 8, 8, 3)


@pytest.mark.parametrize("name, options, message", [
    ("cifar10s", {"skew": 0.3}, r"skew .* in \[0.5, 1\]; got 0.3"),
    ("cifar10_corrupted", {"corruptions": ["rain"]}, r"corruptions \['rain'\] are not known"),
    ("cifar10_corrupted", {"severities": [0, 1]}, r"severities must be among 1..5"),
    ("cifar10_corrupted", {"group_by": "class"}, r"group_by must be 'severity' or"),
    ("celeb_a", {"task": "Happy"}, r"task attribute 'Happy' is unknown"),
    ("celeb_a", {"task": "Male", "sensitive": "Male"}, r"both 'Male'"),
])
def test_bad_options_are_named(tmp_path, name, options, message):
  with pytest.raises(ValueError, match=message):
    data.open_dataset(name, tmp_path, **options)


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is not None,
                    reason="TensorFlow is installed: preparing would download CIFAR-10")
def test_preparing_without_tensorflow_says_how_to_install_it(tmp_path):
  with pytest.raises(ImportError, match=r"preparing the TFDS catalog dataset 'cifar10' needs "
                                        r"TensorFlow.*pip install \"moenas_jax\[tf\]\""):
    data.open_dataset("cifar10s", tmp_path)


def test_a_prepared_dataset_opens_without_the_catalog_or_tensorflow(tmp_path,
                                                                    opens_without_tensorflow):
  source, _, _ = _cifar10({"train": 10, "test": 2})
  _prepare(catalog.Cifar10S, catalog.cifar10s_config(image_size=8, seed=3), tmp_path / "tfds",
           source)
  # open_dataset's own source (the catalog) is never asked: the prepared files are reused.
  dataset = data.open_dataset("cifar10s", tmp_path / "tfds", image_size=8, seed=3)
  assert dataset.class_names == catalog.CIFAR10_CLASSES
  assert dataset.group_names == ("colour", "grayscale")
  assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 90, "validation": 10,
                                                           "test": 20}
  # In a fresh process, with a `tensorflow` on the path that records any import of it.
  opens_without_tensorflow(tmp_path, "cifar10s", image_size=8, seed=3)
  assert collections.Counter(dataset.splits["test"][i]["group"] for i in range(20)) == {0: 10,
                                                                                         1: 10}
