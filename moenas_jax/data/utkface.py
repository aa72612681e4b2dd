"""UTKFace (aligned and cropped faces): a demographic fairness benchmark, read from manual_dir.

Give the folder holding `UTKFace.tar.gz` (or the extracted `UTKFace/` folder) of the public
release. Labels come from the file names `[age]_[gender]_[race]_[date&time].jpg.chip.jpg`
(gender 0 male, 1 female; race 0 White, 1 Black, 2 Asian, 3 Indian, 4 Others). Malformed names
and unreadable images are skipped, counted and reported in one warning.

Config: the task (`gender` or `age_group`) and the sensitive attribute (`race`, `gender` or
`age_group`), the image size, and the seed of the stratified 80/10/10 split by (label, group).
The images' licence is non-commercial research only: they are read from your copy, never
shipped.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from moenas_jax.data import images, splits

ARCHIVE = "UTKFace.tar.gz"
FOLDER = "UTKFace"
AGE_GROUPS = (("0-19", 0), ("20-39", 20), ("40-59", 40), ("60+", 60))
NAMES = {
    "gender": ("male", "female"),
    "race": ("White", "Black", "Asian", "Indian", "Others"),
    "age_group": tuple(name for name, _ in AGE_GROUPS),
}
TASKS = ("gender", "age_group")


@dataclasses.dataclass
class UTKFaceConfig(tfds.core.BuilderConfig):
  task: str = "gender"
  sensitive: str = "race"
  image_size: int = 64
  seed: int = 0
  fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)


def config_for(manual_dir: str, task: str = "gender", sensitive: str = "race",
               image_size: int = 64, seed: int = 0,
               fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> UTKFaceConfig:
  if task not in TASKS:
    raise ValueError(f"UTKFace task {task!r} is unknown; choose one of {list(TASKS)}")
  if sensitive not in NAMES:
    raise ValueError(f"UTKFace sensitive attribute {sensitive!r} is unknown; choose one of "
                     f"{sorted(NAMES)}")
  if task == sensitive:
    raise ValueError(f"task and sensitive attribute are both {task!r}; choose two different")
  if not (os.path.isfile(os.path.join(manual_dir, ARCHIVE))
          or os.path.isdir(os.path.join(manual_dir, FOLDER))):
    raise ValueError(f"UTKFace needs {ARCHIVE} (or its extracted {FOLDER}/ folder) in "
                     f"manual_dir {manual_dir!r}; download the aligned & cropped release there")
  return UTKFaceConfig(name=f"{task}_by_{sensitive}_{image_size}px_seed{seed}", task=task,
                       sensitive=sensitive, image_size=image_size, seed=seed,
                       fractions=tuple(fractions), description=f"{task} by {sensitive}")


def parse_name(filename: str) -> dict[str, int] | None:
  """Attributes from a UTKFace file name, or None if the name is malformed."""
  parts = os.path.basename(filename).split("_")
  if len(parts) < 4 or not all(p.isdigit() for p in parts[:3]):
    return None
  age, gender, race = (int(p) for p in parts[:3])
  if gender > 1 or race > 4 or age > 130:
    return None
  age_group = max(i for i, (_, start) in enumerate(AGE_GROUPS) if age >= start)
  return {"age": age, "gender": gender, "race": race, "age_group": age_group}


def _files(manual_dir: str) -> Iterator[tuple[str, bytes]]:
  """(file name, bytes) of every .jpg, from the extracted folder or else the archive."""
  folder = os.path.join(manual_dir, FOLDER)
  if os.path.isdir(folder):
    for name in sorted(os.listdir(folder)):
      if name.endswith(".jpg"):
        with open(os.path.join(folder, name), "rb") as f:
          yield name, f.read()
    return
  path = os.path.join(manual_dir, ARCHIVE)
  try:
    with tarfile.open(path, "r:gz") as archive:
      for member in archive:
        if member.isfile() and member.name.endswith(".jpg"):
          yield os.path.basename(member.name), archive.extractfile(member).read()
  except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
    raise ValueError(f"{path} is corrupt or truncated ({type(error).__name__}: {error}); "
                     f"download or copy it again, or give its extracted {FOLDER}/ folder "
                     f"instead") from error


class UTKFace(tfds.core.GeneratorBasedBuilder):
  """UTKFace faces with a task label and a sensitive group (see the module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {ARCHIVE} or its {FOLDER}/ folder in manual_dir."

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    size = config.image_size
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8),
        "label": tfds.features.ClassLabel(names=NAMES[config.task]),
        "group": tfds.features.ClassLabel(names=NAMES[config.sensitive]),
    }), homepage="https://susanqq.github.io/UTKFace/")

  def _split_generators(self, dl_manager):
    config = self.builder_config
    manual_dir = os.fspath(dl_manager.manual_dir)
    names, attributes, malformed = [], [], 0
    for name, _ in _files(manual_dir):
      parsed = parse_name(name)
      if parsed is None:
        malformed += 1
        continue
      names.append(name)
      attributes.append(parsed)
    if malformed:
      logging.warning("UTKFace: skipped %d files with malformed names (of %d)", malformed,
                      malformed + len(names))
    if not names:
      raise ValueError(f"no UTKFace image with a well-formed name in {manual_dir!r}")
    labels = np.array([a[config.task] for a in attributes])
    groups = np.array([a[config.sensitive] for a in attributes])
    split = splits.stratified_split(labels * 100 + groups, config.fractions, config.seed)
    assignment = {name: (i, int(s)) for i, (name, s) in enumerate(zip(names, split))}
    return {split_name: self._generate_examples(manual_dir, assignment, split_id, labels, groups)
            for split_id, split_name in enumerate(splits.SPLIT_NAMES)}

  def _generate_examples(self, manual_dir, assignment, split_id, labels, groups):
    size, unreadable = self.builder_config.image_size, 0
    for name, payload in _files(manual_dir):
      index, split = assignment.get(name, (None, None))
      if split != split_id:
        continue
      pixels = images.decode(payload, size)
      if pixels is None:
        unreadable += 1
        continue
      yield name, {"image": pixels, "label": int(labels[index]), "group": int(groups[index])}
    if unreadable:
      logging.warning("UTKFace %s: skipped %d unreadable images", splits.SPLIT_NAMES[split_id],
                      unreadable)
