"""FACET (Meta, ICCV 2023): people in photos by class, with their Monk skin tone as the group.

FACET cannot be downloaded automatically (licence). Give manual_dir the official release,
extracted:

    manual_dir/
      annotations/annotations.csv   one row per person (the release's columns; used here:
                                    person_id, filename, class1, bounding_box, skin_tone_1 ..
                                    skin_tone_10, skin_tone_na and the lighting_* columns)
      images/ or imgs_1/, imgs_2/, ...   the image archives, extracted at any depth; an image
                                    is found by the file name in the `filename` column

`bounding_box` is a dict string `{"x": .., "y": .., "width": .., "height": ..}` in pixels of the
stored image (x, y the top-left corner; no EXIF rotation is applied). Each person is one
example:
- image: the box, clipped to the image, cropped and resized to image_size (RGB, bilinear; the
  aspect ratio is not kept).
- label: `class1` (FACET's primary class; `class2` is ignored), one of `classes` (default:
  every class in the annotations); people of other classes are skipped.
- group: the Monk skin tone 1..10 with the most annotator votes (`skin_tone_k` counts the
  annotators who chose tone k). A tie between tones goes to the lower median of the tied
  tones (3 and 4 → 3; 2, 5 and 9 → 5). People whose `skin_tone_na` votes outnumber the top
  tone's, or with no tone vote at all, are skipped; a tie between NA and a tone keeps the tone.
- lighting: the most voted of `LIGHTING` (ties go to the earlier name; no votes → "na"),
  an extra feature for robustness analysis by lighting condition.
- person_id: FACET's id, to join the other annotations (age, gender presentation, hair, ...).

People with an unreadable or missing image, a malformed annotation or a box wholly outside
their image are skipped; all skips are counted and reported in one warning. The split is
stratified by (class, tone), 80/10/10 from the seed by default.
"""

from __future__ import annotations

import ast
import collections
import csv
import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from moenas_jax.data import images, manual, splits

ANNOTATIONS = os.path.join("annotations", "annotations.csv")
IMAGE_FOLDER_HELP = "images/ or imgs_1/, imgs_2/, ... folders"
TONES = tuple(range(1, 11))
GROUP_NAMES = tuple(f"MST {tone}" for tone in TONES)  # Monk Skin Tone scale
LIGHTING = ("well_lit", "dimly_lit", "underexposed", "overexposed", "na")
COLUMNS = ("person_id", "filename", "class1", "bounding_box", "skin_tone_na",
           *(f"skin_tone_{tone}" for tone in TONES), *(f"lighting_{name}" for name in LIGHTING))


@dataclasses.dataclass
class FacetConfig(tfds.core.BuilderConfig):
  annotations: str = ""
  classes: tuple[str, ...] = ()
  image_size: int = 64
  seed: int = 0
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


class _Person(NamedTuple):
  row: int
  path: str
  box: images.Box
  label: int
  group: int
  lighting: int
  person_id: int


def majority_tone(votes: Sequence[int], na_votes: int) -> int | None:
  """Monk skin tone (1..10) from the annotators' votes per tone; None when NA wins or no votes.

  Ties between tones go to the lower median of the tied tones; a tie with NA keeps the tone.
  """
  votes = np.asarray(votes)
  top = votes.max()
  if top == 0 or na_votes > top:
    return None
  tied = np.flatnonzero(votes == top) + 1
  return int(tied[(len(tied) - 1) // 2])


def majority_lighting(votes: Sequence[int]) -> int:
  """Index in LIGHTING with the most votes (the earlier name on ties; "na" without votes)."""
  return int(np.argmax(votes)) if max(votes) > 0 else LIGHTING.index("na")


def _read_rows(path: str) -> list[dict[str, str]]:
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
      raise ValueError(f"{path} is not FACET's annotations.csv: missing the columns {missing}")
    return list(reader)


def _image_folders(manual_dir: str) -> list[str]:
  return sorted(os.path.join(manual_dir, name) for name in os.listdir(manual_dir)
                if (name == "images" or name.startswith("imgs"))
                and os.path.isdir(os.path.join(manual_dir, name)))


def config_for(manual_dir: str, classes: Sequence[str] | None = None, image_size: int = 64,
               seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
               annotations: str = ANNOTATIONS) -> FacetConfig:
  """A config named after the annotations' content, the classes and the image/split settings."""
  path = manual.locate(manual_dir, annotations, "annotations.csv of the FACET release")
  if not _image_folders(manual_dir):
    raise ValueError(f"FACET needs its images in manual_dir {manual_dir!r}: extract the "
                     f"release's image archives there as {IMAGE_FOLDER_HELP}")
  if image_size < 1:
    raise ValueError(f"image_size must be positive, got {image_size}")
  present = sorted({row["class1"] for row in _read_rows(path)})
  classes = tuple(classes) if classes else tuple(present)
  unknown = sorted(set(classes) - set(present))
  if unknown:
    raise ValueError(f"FACET classes {unknown} are not in {path}; it has {present}")
  return FacetConfig(name=manual.content_name("facet", path, classes, image_size, seed,
                                              fractions),
                     annotations=path, classes=classes, image_size=image_size, seed=seed,
                     fractions=tuple(fractions), description=f"FACET {len(classes)} classes")


def _parse(row: dict[str, str]) -> tuple[int, images.Box, int | None, int]:
  """(person_id, box, tone, lighting) of a row; ValueError/SyntaxError if malformed."""
  box = ast.literal_eval(row["bounding_box"])
  left, top = round(float(box["x"])), round(float(box["y"]))
  right = left + round(float(box["width"]))
  bottom = top + round(float(box["height"]))
  tone = majority_tone([int(float(row[f"skin_tone_{t}"])) for t in TONES],
                       int(float(row["skin_tone_na"])))
  lighting = majority_lighting([int(float(row[f"lighting_{name}"])) for name in LIGHTING])
  return int(row["person_id"]), (left, top, right, bottom), tone, lighting


class Facet(tfds.core.GeneratorBasedBuilder):
  """FACET person crops with class labels and skin-tone groups (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = (f"Put FACET's {ANNOTATIONS} and its images ({IMAGE_FOLDER_HELP})"
                                  " in manual_dir.")

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=config.classes),
        "group": tfds.features.ClassLabel(names=GROUP_NAMES),
        "lighting": tfds.features.ClassLabel(names=LIGHTING),
        "person_id": tfds.features.Scalar(dtype=np.int64),
    }), homepage="https://facet.metademolab.com")

  def _split_generators(self, dl_manager):
    config = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    found = {}  # file name → path, over every image folder
    for folder in _image_folders(manual_dir):
      for root, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
          found.setdefault(name, os.path.join(root, name))
    rows = _read_rows(config.annotations)
    skipped, people = collections.Counter(), []
    dimensions = functools.cache(images.dimensions)  # an image's header is read once
    for index, row in enumerate(rows):
      if row["class1"] not in config.classes:
        skipped["of other classes"] += 1
        continue
      try:
        person_id, box, tone, lighting = _parse(row)
      except (ValueError, SyntaxError, KeyError, TypeError):
        skipped["with a malformed annotation"] += 1
        continue
      path = found.get(os.path.basename(row["filename"]))
      if tone is None:
        skipped["without a skin tone (NA or no votes)"] += 1
      elif path is None:
        skipped["with a missing image"] += 1
      elif (size := dimensions(path)) is None:
        skipped["with an unreadable image"] += 1
      elif (inside := images.clip(box, *size)) is None:
        skipped["with a box outside the image"] += 1
      else:
        people.append(_Person(index, path, inside, config.classes.index(row["class1"]),
                              tone - 1, lighting, person_id))
    if skipped:
      logging.warning("FACET: skipped %d of %d people: %s", sum(skipped.values()), len(rows),
                      ", ".join(f"{count} {why}" for why, count in skipped.items()))
    if not people:
      raise ValueError(f"no usable FACET person in {config.annotations} (see the warning)")
    strata = np.array([p.label * len(TONES) + p.group for p in people])
    split = splits.stratified_split(strata, config.fractions, config.seed)
    return {name: self._generate_examples([p for p, s in zip(people, split) if s == i], name)
            for i, name in enumerate(splits.SPLIT_NAMES) if (split == i).any()}

  def _generate_examples(self, people, split_name):
    by_image = collections.defaultdict(list)
    for person in people:
      by_image[person.path].append(person)
    unreadable = 0
    for path in sorted(by_image):
      with open(path, "rb") as f:
        crops = images.decode_crops(f.read(), [p.box for p in by_image[path]],
                                    self.builder_config.image_size)
      if crops is None:
        unreadable += len(by_image[path])
        continue
      for p, crop in zip(by_image[path], crops):
        yield p.row, {"image": crop, "label": p.label, "group": p.group, "lighting": p.lighting,
                      "person_id": p.person_id}
    if unreadable:
      logging.warning("FACET %s: skipped %d people whose image could not be decoded",
                      split_name, unreadable)
