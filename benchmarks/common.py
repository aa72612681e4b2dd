"""What the search benchmarks share: the default search's trained supernet, read from (or
trained into) a workdir, and stand-alone training of a candidate with the final recipe."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx
from scipy import stats

from configs import default
from moenas_jax import checkpoint, export, search_space
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import final as final_stage
from moenas_jax.stages import supernet as supernet_stage

# Sections of the config that the supernet checkpoint depends on.
SUPERNET_KEYS = ("seed", "data", "model", "supernet")


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def set_overrides(config: Any, overrides: list[str]) -> None:
  """Sets each 'section.name=<Python literal>' of `overrides` (`--set`) in `config`."""
  for override in overrides:
    path, _, text = override.partition("=")
    *sections, name = path.split(".")
    target = config
    for section in sections:
      target = target[section]
    target[name] = ast.literal_eval(text)


def seed_interval(values: list[float]) -> dict:
  """Mean over seeds with its 95% t interval (None bounds for one seed), and the values."""
  values = np.asarray(values, np.float64)
  mean = float(values.mean())
  if len(values) < 2:
    return {"mean": mean, "low": None, "high": None, "per_seed": values.tolist()}
  half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
  return {"mean": mean, "low": mean - half, "high": mean + half, "per_seed": values.tolist()}


@dataclasses.dataclass
class Supernet:
  """The default config, its data and the trained supernet (model, split weights, space)."""

  config: Any
  data: data_stage.Data
  model: nnx.Module
  graphdef: nnx.GraphDef
  params: Any
  state: Any
  space: search_space.SearchSpace


def trained_supernet(workdir: str | Path, config: Any = None) -> Supernet:
  """The supernet of `config` (default: configs/default.py) from `workdir/checkpoints/supernet`
  (a finished search leaves it there), trained there first if missing. A workdir made with
  another model, supernet or data config is refused."""
  config = default.get_config() if config is None else config
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.check_config(workdir, config.to_dict(),
                          ignore=[key for key in config if key not in SUPERNET_KEYS])
  with contextlib.redirect_stdout(sys.stderr):  # dataset preparation prints progress
    data = data_stage.load_data(config, workdir)
  data_stage.check_data(config, data)
  model = supernet_stage.build_supernet(config, data)
  params, state = supernet_stage.train_supernet(config, model, data, workdir, log)
  nnx.update(model, params, state)
  graphdef = nnx.split(model, nnx.Param, ...)[0]
  return Supernet(config, data, model, graphdef, params, state, model.search_space())


def standalone(supernet: Supernet, arch: search_space.Arch, workdir: Path, name: str,
               seed: int | None = None) -> dict[str, Any]:
  """Test metrics of `arch` cut out of the supernet and trained with `config.train` (its
  objective, epochs; training seed `seed`, default config.seed), resumable in `workdir`."""
  config = supernet.config
  if seed is not None and seed != config.seed:
    config = config.copy_and_resolve_references()
    config.seed = seed
  _, results, _ = final_stage.train_and_evaluate(
      config, name, export.standalone(supernet.model, arch), supernet.data, workdir, log)
  return results
