"""Tests of the FACET builder on a tiny release written in the official layout."""

import csv
import json
import logging

import numpy as np
import pytest
from PIL import Image

from moenas_jax import data
from moenas_jax.data import facet, pipeline

# The release's columns (annotations/annotations.csv), in its order.
HEADER = (["person_id", "filename", "class1", "class2"]
          + [f"gender_presentation_{g}" for g in ("masc", "fem", "non_binary", "na")]
          + [f"skin_tone_{t}" for t in range(1, 11)] + ["skin_tone_na"]
          + [f"age_presentation_{a}" for a in ("young", "middle", "older", "na")]
          + ["has_facial_hair", "has_tattoo", "has_cap", "visible_torso", "visible_face"]
          + [f"lighting_{name}" for name in ("underexposed", "dimly_lit", "well_lit", "na",
                                              "overexposed")]
          + ["bounding_box"])
RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 200, 0)
RED_BOX = {"x": 0, "y": 0, "width": 20, "height": 15}  # a.png is 40x30: red top-left quarter


def _row(person_id, filename, class1, box, tones=None, na=0, lighting=None):
  row = dict.fromkeys(HEADER, 0)
  row.update(person_id=person_id, filename=filename, class1=class1, class2="",
             bounding_box=json.dumps(box), skin_tone_na=na)
  for tone, votes in (tones or {}).items():
    row[f"skin_tone_{tone}"] = votes
  for name, votes in (lighting or {}).items():
    row[f"lighting_{name}"] = votes
  return row


def _release(folder):
  """11 hand-made people (5 kept, 6 skipped) and 15 more kept ones over a.png's red box."""
  (folder / "annotations").mkdir(parents=True)
  (folder / "imgs_1" / "nested").mkdir(parents=True)
  (folder / "imgs_2").mkdir()
  a = np.full((30, 40, 3), 128, np.uint8)
  a[:15, :20], a[15:, 20:] = RED, BLUE
  Image.fromarray(a).save(folder / "imgs_1" / "nested" / "a.png")
  Image.fromarray(np.full((20, 20, 3), GREEN, np.uint8)).save(folder / "imgs_2" / "b.jpg")
  (folder / "imgs_2" / "c.png").write_bytes(b"not a png")
  full = {"x": 0, "y": 0, "width": 20, "height": 20}
  rows = [
      _row(0, "a.png", "doctor", RED_BOX, {3: 2}, lighting={"well_lit": 1}),
      _row(1, "a.png", "nurse", {"x": 20, "y": 15, "width": 20, "height": 15}, {4: 1, 6: 1},
           lighting={"dimly_lit": 2, "well_lit": 1}),
      _row(2, "b.jpg", "doctor", full, {2: 1, 5: 1, 9: 1},
           lighting={"underexposed": 1, "overexposed": 1}),
      _row(3, "a.png", "doctor", {"x": 90, "y": 90, "width": 10, "height": 10}, {1: 1}),  # outside
      _row(4, "c.png", "doctor", full, {1: 1}),  # unreadable image
      _row(5, "d.png", "doctor", full, {1: 1}),  # missing image
      _row(6, "a.png", "doctor", RED_BOX, {1: 1}, na=2),  # NA outvotes the tones
      _row(7, "a.png", "doctor", RED_BOX),  # no votes at all
      _row(8, "a.png", "guitarist", RED_BOX, {1: 1}),  # another class
      _row(9, "a.png", "nurse", RED_BOX, {7: 1}, na=1),  # NA ties with a tone: kept
      _row(10, "a.png", "doctor", {"x": 30, "y": 20, "width": 20, "height": 20}, {8: 1}),  # clipped
  ]
  rows += [_row(11 + i, "a.png", ("doctor", "nurse")[i % 2], RED_BOX, {1 + i % 3: 1})
           for i in range(15)]
  with open(folder / "annotations" / "annotations.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, HEADER)
    writer.writeheader()
    writer.writerows(rows)
  return folder


def _read(dataset):
  """person_id → example, over every split."""
  return {int(e["person_id"]): e for source in dataset.splits.values()
          for e in source.__getitems__(list(range(len(source))))}


@pytest.mark.parametrize("tones, na, expected", [
    ({3: 2, 5: 1}, 0, 3),
    ({4: 1, 6: 1}, 0, 4),  # a tie of two: the lower one
    ({2: 1, 5: 1, 9: 1}, 0, 5),  # a tie of three: the median
    ({1: 1, 2: 1, 3: 1, 4: 1}, 0, 2),  # a tie of four: the lower median
    ({7: 1}, 1, 7),  # NA ties with the top tone: the tone
    ({7: 1}, 2, None),  # NA outvotes it
    ({}, 0, None),  # no votes
])
def test_majority_tone(tones, na, expected):
  votes = [tones.get(tone, 0) for tone in range(1, 11)]
  assert facet.majority_tone(votes, na) == expected


def test_prepares_crops_labels_groups_and_reports_skips(tmp_path, caplog):
  folder = _release(tmp_path / "facet")
  with caplog.at_level(logging.WARNING):
    dataset = data.open_dataset("facet", tmp_path / "tfds", manual_dir=folder,
                                classes=["doctor", "nurse"], image_size=8, seed=0)
  assert dataset.class_names == ("doctor", "nurse")
  assert dataset.group_names == tuple(f"MST {t}" for t in range(1, 11))
  assert dataset.image_shape == (8, 8, 3)
  assert "skipped 6 of 26 people" in caplog.text
  for part in ("1 of other classes", "2 without a skin tone (NA or no votes)",
               "1 with a missing image", "1 with an unreadable image",
               "1 with a box outside the image"):
    assert part in caplog.text
  # 20 people kept: 80/10/10 exactly.
  assert {k: len(v) for k, v in dataset.splits.items()} == {"train": 16, "validation": 2,
                                                           "test": 2}
  people = _read(dataset)
  assert sorted(people) == [0, 1, 2, 9, 10, *range(11, 26)]
  np.testing.assert_array_equal(people[0]["image"], np.full((8, 8, 3), RED, np.uint8))
  np.testing.assert_array_equal(people[1]["image"], np.full((8, 8, 3), BLUE, np.uint8))
  np.testing.assert_array_equal(people[10]["image"], np.full((8, 8, 3), BLUE, np.uint8))
  assert np.abs(people[2]["image"].astype(int) - GREEN).max() <= 8  # JPEG
  lighting = {name: i for i, name in enumerate(facet.LIGHTING)}
  expected = {0: (0, 3, "well_lit"), 1: (1, 4, "dimly_lit"), 2: (0, 5, "underexposed"),
              9: (1, 7, "na"), 10: (0, 8, "na")}
  for person, (label, tone, light) in expected.items():
    assert (people[person]["label"], people[person]["group"], people[person]["lighting"]) == (
        label, tone - 1, lighting[light]), person
  train = pipeline.read_split(dataset.splits["train"], 2, 10)  # extra features are ignored
  assert train["image"].shape == (16, 8, 8, 3)


def test_split_follows_the_seed(tmp_path):
  folder = _release(tmp_path / "facet")

  def split_ids(seed, where):
    dataset = data.open_dataset("facet", tmp_path / where, manual_dir=folder, image_size=4,
                                seed=seed)
    return {name: sorted(int(e["person_id"]) for e in source.__getitems__(
        list(range(len(source))))) for name, source in dataset.splits.items()}

  first = split_ids(0, "a")
  assert first == split_ids(0, "b")
  assert first != split_ids(1, "c")
  # All classes by default: the guitarist is kept too (21 people).
  everyone = [p for ids in first.values() for p in ids]
  assert len(everyone) == 21 and 8 in everyone


def test_missing_files_say_where_to_put_them(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=r"no annotations/annotations.csv in manual_dir .*: put "
                                       r"the annotations.csv of the FACET release there"):
    data.open_dataset("facet", tmp_path / "tfds", manual_dir=tmp_path / "empty")
  folder = _release(tmp_path / "facet")
  for name in ("imgs_1", "imgs_2"):
    (folder / name).rename(folder / f"old_{name}")
  with pytest.raises(ValueError, match=r"FACET needs its images in manual_dir .*: extract the "
                                       r"release's image archives there as images/ or imgs_1/"):
    data.open_dataset("facet", tmp_path / "tfds", manual_dir=folder)


def test_unknown_classes_are_named(tmp_path):
  folder = _release(tmp_path / "facet")
  with pytest.raises(ValueError, match=r"FACET classes \['pilot'\] are not in .*; it has "
                                       r"\['doctor', 'guitarist', 'nurse'\]"):
    data.open_dataset("facet", tmp_path / "tfds", manual_dir=folder, classes=["doctor", "pilot"])
