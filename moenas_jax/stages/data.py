"""Stage 0: the splits a search reads, in memory, and the checks that need their sizes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from moenas_jax import hosts, objectives, settings
from moenas_jax.data import open_dataset, pipeline


@dataclasses.dataclass
class Data:
  """The splits a search reads, in memory, and the dataset's names."""

  train: pipeline.Examples
  held: pipeline.Examples
  search: pipeline.Examples
  # The part of the search split scored under lighting changes; a frozen trunk's features:
  # one split per lighting change (`stages.trunk`).
  robust: pipeline.Examples | list[pipeline.Examples]
  test: pipeline.Examples
  class_names: tuple[str, ...]
  group_names: tuple[str, ...]
  image_shape: tuple[int, int, int]

  def group_counts(self) -> dict[str, np.ndarray]:
    """Examples per group in the training and test splits."""
    return {split: np.bincount(examples["group"], minlength=len(self.group_names))
            for split, examples in (("train", self.train), ("test", self.test))}


def data_dir(config: Any, workdir: Path) -> Path:
  """Where the dataset is prepared: `config.data.data_dir`, or `<workdir>/data`."""
  return Path(config.data.data_dir or workdir / "data")


def load_data(config: Any, workdir: Path) -> Data:
  """Prepares (once, on process 0) and reads the dataset named by `config.data`."""
  cfg = config.data
  dataset = hosts.writer_first("dataset", lambda: open_dataset(
      cfg.name, data_dir(config, workdir), manual_dir=cfg.manual_dir or None,
      **dict(cfg.options)))
  classes, groups = len(dataset.class_names), len(dataset.group_names)
  missing = {"train", cfg.search_split, cfg.test_split} - set(dataset.splits)
  if missing:
    raise settings.ConfigError(
        "data.search_split" if cfg.search_split in missing else "data.test_split",
        cfg.search_split if cfg.search_split in missing else cfg.test_split,
        f"dataset {cfg.name!r} has no such split", f"use one of {sorted(dataset.splits)}")
  read = {name: pipeline.read_split(dataset.splits[name], classes, groups, name)
          for name in {"train", cfg.search_split, cfg.test_split}}
  train, search, test = read["train"], read[cfg.search_split], read[cfg.test_split]
  if cfg.train_size:
    train = pipeline.held_train_subset(train, cfg.train_size, config.seed + 1)
  if cfg.eval_size:
    search = pipeline.held_train_subset(search, cfg.eval_size, config.seed + 2)
    test = pipeline.held_train_subset(test, cfg.eval_size, config.seed + 3)
  return Data(train=train,
              held=pipeline.held_train_subset(train, cfg.held_train_size, config.seed),
              search=search, test=test,
              robust=pipeline.held_train_subset(search, config.search.robustness_size,
                                                config.seed + 4),
              class_names=dataset.class_names, group_names=dataset.group_names,
              image_shape=dataset.image_shape)


def objective(config: Any, section: str, data: Data, name: str | None = None
              ) -> objectives.Objective:
  """The training objective of `config.<section>.objective` (its `name` replaced if given),
  its weights from the training split's units."""
  chosen = settings.objective_settings(config, section)
  if name is not None:
    chosen = dataclasses.replace(chosen, name=name)
  return objectives.Objective.from_examples(chosen, data.train, len(data.class_names),
                                            data.group_names, data.class_names)


def check_data(config: Any, data: Data, sections: tuple[str, ...] = ("supernet", "train")
               ) -> None:
  """The config rules that need the data (`settings.check_data`), before anything compiles:
  batch sizes within the training split, and each section's objective buildable on it."""
  settings.check_data(config, len(data.train["label"]),
                      lambda section: objective(config, section, data), sections)
