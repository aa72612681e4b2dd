"""One model outside the search: trained from scratch (`run_train`) or fine-tuned (`run_finetune`).

Both use the recipe of `config.train` (resumable, `checkpoints/<stage>`), the search's test
metrics, and export the result to `workdir/final` with its metrics in
`workdir/results/<stage>.json`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import logging
from flax import nnx

from moenas_jax import checkpoint, export, metrics, models, report, search, search_space, train
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import final as final_stage
from moenas_jax.stages import supernet as supernet_stage


def _train_evaluate_export(config: Any, model: nnx.Module, model_name: str, arch: Any,
                           data: data_stage.Data, workdir: Path, stage: str,
                           log: Callable[[str], None]) -> dict[str, Any]:
  """Trains (resumably) and tests a standalone model, exports it to workdir/final."""
  model, results, _ = final_stage.train_and_evaluate(config, stage, model, data, workdir, log)
  export.save(workdir / "final", model, model_name=model_name, arch=arch,
              class_names=data.class_names, group_names=data.group_names)
  checkpoint.write_json_atomic(workdir / "results" / f"{stage}.json",
                               metrics.to_python({"model": model_name, "metrics": results}))
  log("\n" + report.results_table({"baselines": [{"name": model_name, "metrics": results}]}))
  return results


def run_train(config: Any, workdir: str | os.PathLike, model_name: str, arch: Any = None,
              log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Trains one model from scratch with `config.train` and exports it to workdir/final.

  `model_name` is a family of `models.MODELS` (`<config.model.name>_dense` is built with
  `config.model`'s options, another family with `config.baseline_options[model_name]`), or,
  with `arch`, the supernet of `config.model` cut to that candidate (`export.standalone`).
  """
  workdir = Path(workdir)
  if model_name not in models.MODELS:
    raise ValueError(f"unknown model {model_name!r}; valid names: {sorted(models.MODELS)}")
  search.prepare(config, workdir, extra={
      "train_model": model_name, "train_arch": arch and search_space.to_dict(arch)})
  data = data_stage.load_data(config, workdir)
  data_stage.check_data(config, data, ("train",))
  if arch is not None:
    supernet_model = supernet_stage.build_supernet(config, data)
    model = export.standalone(supernet_model, supernet_model.search_space().validate(arch))
    model_name = config.model.name
  else:
    model = final_stage.baseline(config, model_name, None, data)
  return _train_evaluate_export(config, model, model_name, arch, data, workdir, "train", log)


def run_finetune(config: Any, workdir: str | os.PathLike, source: str | os.PathLike,
                 log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Fine-tunes an exported model on `config.data` (a new head if the classes differ)."""
  workdir = Path(workdir)
  exported = export.load(source)
  search.prepare(config, workdir, extra={"finetune_from": str(source)})
  data = data_stage.load_data(config, workdir)
  data_stage.check_data(config, data, ("train",))
  if tuple(exported.metadata["input_shape"]) != tuple(data.image_shape):
    raise ValueError(f"the model in {source} takes images {exported.metadata['input_shape']} "
                     f"but dataset {config.data.name!r} has {list(data.image_shape)}; set the "
                     f"dataset's image size (e.g. --config.data.options.image_size=...)")
  model = exported.model
  if model.config["num_classes"] != len(data.class_names):
    log(f"[finetune] new head: {model.config['num_classes']} → {len(data.class_names)} classes")
    model = train.replace_head(model, len(data.class_names), rngs=nnx.Rngs(config.seed))
  arch = exported.metadata["arch"] and search_space.from_json(exported.metadata["arch"])
  return _train_evaluate_export(config, model, exported.metadata["model"], arch, data, workdir,
                                "finetune", log)
