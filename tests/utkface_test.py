"""Tests of the UTKFace builder on a small archive written in the release's layout."""

import io
import logging
import tarfile

import numpy as np
import pytest
from PIL import Image

from moenas_jax import data
from moenas_jax.data import pipeline, utkface


def _jpeg(value):
  buffer = io.BytesIO()
  Image.fromarray(np.full((20, 20, 3), value, np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


def _archive(folder):
  """40 faces (every gender x race cell, ages 10..85), 2 malformed names, 1 corrupt image."""
  files = {}
  for i in range(40):
    age, gender, race = 10 + 2 * i, i % 2, (i // 2) % 5
    files[f"{age}_{gender}_{race}_2017011{i:06d}.jpg.chip.jpg"] = _jpeg(5 * i)
  files["39_1_20170116174525125.jpg.chip.jpg"] = _jpeg(1)  # a field missing
  files["61_3_2_20170109150557335.jpg.chip.jpg"] = _jpeg(2)  # gender 3 does not exist
  files["30_1_1_20170109150557336.jpg.chip.jpg"] = b"not a jpeg"
  folder.mkdir()
  with tarfile.open(folder / utkface.ARCHIVE, "w:gz") as archive:
    for name, payload in files.items():
      info = tarfile.TarInfo(f"{utkface.FOLDER}/{name}")
      info.size = len(payload)
      archive.addfile(info, io.BytesIO(payload))
  return folder


def test_parse_name():
  assert utkface.parse_name("26_0_1_20170117195838909.jpg.chip.jpg") == {
      "age": 26, "gender": 0, "race": 1, "age_group": 1}
  assert utkface.parse_name("UTKFace/75_1_4_x.jpg.chip.jpg")["age_group"] == 3
  for bad in ("39_1_20170116174525125.jpg.chip.jpg", "a_1_2_3.jpg", "30_2_1_x.jpg",
              "30_1_5_x.jpg"):
    assert utkface.parse_name(bad) is None, bad


def test_prepares_gender_by_race_with_skips_reported(tmp_path, caplog):
  folder = _archive(tmp_path / "manual")
  with caplog.at_level(logging.WARNING):
    dataset = data.open_dataset("utkface", tmp_path / "tfds", manual_dir=folder,
                                image_size=16, seed=0)
  assert dataset.class_names == ("male", "female")
  assert dataset.group_names == ("White", "Black", "Asian", "Indian", "Others")
  assert dataset.image_shape == (16, 16, 3)
  sizes = {name: len(source) for name, source in dataset.splits.items()}
  # 41 well-formed names: 80/10/10 by (gender, race) cell; the corrupt one is then skipped.
  assert sum(sizes.values()) == 40 and sizes["validation"] >= 3 and sizes["test"] >= 3
  assert "skipped 2 files with malformed names (of 43)" in caplog.text
  assert "skipped 1 unreadable images" in caplog.text
  train = pipeline.read_split(dataset.splits["train"], 2, 5)
  assert set(train["group"].tolist()) == set(range(5))


def test_age_group_task_by_gender(tmp_path):
  folder = _archive(tmp_path / "manual")
  dataset = data.open_dataset("utkface", tmp_path / "tfds", manual_dir=folder, image_size=8,
                              task="age_group", sensitive="gender")
  assert dataset.class_names == ("0-19", "20-39", "40-59", "60+")
  assert dataset.group_names == ("male", "female")


@pytest.mark.parametrize("options, message", [
    (dict(task="race"), "task 'race' is unknown"),
    (dict(sensitive="skin"), "sensitive attribute 'skin' is unknown"),
    (dict(task="gender", sensitive="gender"), "both 'gender'"),
])
def test_bad_options_are_named(tmp_path, options, message):
  folder = _archive(tmp_path / "manual")
  with pytest.raises(ValueError, match=message):
    data.open_dataset("utkface", tmp_path / "tfds", manual_dir=folder, **options)


def test_a_missing_archive_says_where_to_put_it(tmp_path):
  with pytest.raises(ValueError, match=r"UTKFace needs UTKFace.tar.gz \(or its extracted "
                                       r"UTKFace/ folder\) in manual_dir"):
    data.open_dataset("utkface", tmp_path / "tfds", manual_dir=tmp_path)


@pytest.mark.parametrize("keep", [0.5, 0.02])
def test_a_truncated_archive_is_named_with_the_fix(tmp_path, keep):
  folder = _archive(tmp_path / "manual")
  path = folder / utkface.ARCHIVE
  payload = path.read_bytes()
  path.write_bytes(payload[:int(len(payload) * keep)])
  with pytest.raises(ValueError, match=r"UTKFace.tar.gz is corrupt or truncated .*; download or "
                                       r"copy it again"):
    data.open_dataset("utkface", tmp_path / "tfds", manual_dir=folder)
