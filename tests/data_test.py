"""Tests of the dataset table and the TF-free read path."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

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


def test_reading_never_imports_tensorflow(tmp_path):
  # A stub `tensorflow` on the path that records any import: TFDS and etils would use it if
  # they imported TensorFlow, as they might where the [tf] extra is installed.
  stub = tmp_path / "stub" / "tensorflow"
  stub.mkdir(parents=True)
  marker = tmp_path / "imported"
  (stub / "__init__.py").write_text(
      f"open({str(marker)!r}, 'w').close()\nraise ImportError('stub tensorflow')\n")
  script = textwrap.dedent(f"""
      import sys
      from moenas_jax import data
      dataset = data.open_dataset("fashion_tones", {str(tmp_path / "tfds")!r})
      dataset.splits["train"][0]
      assert "tensorflow" not in sys.modules
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(stub.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
  assert not marker.exists()


def test_unknown_dataset_lists_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'cifar'; known datasets: fashion_tones"):
    data.open_dataset("cifar", tmp_path)
