"""`run_search(config, workdir)`: the whole pipeline, resumable at every stage.

settings checked (`settings.check`) → data (`stages.data`) → with `supernet.frozen_stages`,
the frozen trunk and its cached features (`stages.trunk`: supernet training, the search and
final training read them and train the tail alone) → supernet training (`stages.supernet`)
→ the controller's search (`stages.search`: population evaluator, reward, Pareto archive)
→ pruning of the winner, final training of it and of the baselines (one recipe), test
metrics (`stages.final`) → export (`workdir/final/`) → report (`workdir/results/`). Each
stage checkpoints under `workdir/checkpoints/<stage>/`; running the same command again
continues from the last completed step of the stage it was in and ends with the same
results as an uninterrupted run (every key comes from `config.seed`).
`run_baselines` adds baselines to a finished search.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from absl import logging
from flax import nnx

from moenas_jax import (
  candidate_log,
  checkpoint,
  export,
  metrics,
  models,
  reward,
  search_space,
  settings,
)
from moenas_jax import report as report_lib
from moenas_jax.compilation import count_compilations
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import final as final_stage
from moenas_jax.stages import search as search_stage
from moenas_jax.stages import supernet as supernet_stage
from moenas_jax.stages import trunk as trunk_stage

# Config keys that do not change results: a resume with other values goes on.
RESUME_IGNORES = (*checkpoint.IGNORED_CONFIG_KEYS, "search.chunk_size", "data.data_dir")
# Config keys a later `run_baselines` may change in a finished workdir.
_BASELINE_KEYS = (*RESUME_IGNORES, "baselines", "baseline_options")
# The jitted functions whose compilations the summary reports (per stage).
_COMPILED = ("trunk_features", "supernet_step", "proxy_step", "bn_recalibrate",
             "population_counts", "train_step", "adversarial_counts", "usage_counts")


def prepare(config: Any, workdir: Path, ignore: tuple[str, ...] = RESUME_IGNORES,
            extra: dict[str, Any] | None = None) -> None:
  """Checks every config field (`settings.ConfigError`), then claims the workdir:
  writes its config.json, or refuses one made with another config."""
  settings.check(config, data_stage.data_dir(config, workdir))
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.check_config(workdir, {**config.to_dict(), **(extra or {})},
                          override=config.override_workdir, ignore=ignore)


def trained_supernet(config: Any, supernet_model: nnx.Module, data: data_stage.Data,
                     workdir: Path, log: Callable[[str], None],
                     lap: Callable[[str], None] = lambda stage: None
                     ) -> data_stage.Data | None:
  """Trains the supernet's weights into `supernet_model` (resumable); with
  `supernet.frozen_stages`, first its trunk (`stages.trunk`), then its tail on the trunk's
  features, the model left taking features. Returns those features (None without a trunk).
  `lap(stage)` marks the end of "trunk" and of "supernet"."""
  features = None
  if config.supernet.frozen_stages:
    features = trunk_stage.freeze_trunk(config, supernet_model, data, workdir, log)
    lap("trunk")
  nnx.update(supernet_model, *supernet_stage.train_supernet(
      config, supernet_model, features or data, workdir, log))
  lap("supernet")
  return features


def run_search(config: Any, workdir: str | os.PathLike,
               log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Runs (or resumes) the whole search; returns the summary also written to results/."""
  workdir = Path(workdir)
  prepare(config, workdir)
  timing: dict[str, float] = {}
  compilations: dict[str, dict[str, int]] = {}
  clock, counted = time.perf_counter(), 0

  def lap(stage: str) -> None:
    """The stage's time and its compilations of the `_COMPILED` functions."""
    nonlocal clock, counted
    now = time.perf_counter()
    timing[stage] = round(now - clock, 2)
    names = collections.Counter(compiled.names[counted:])
    compilations[stage] = {name: names[f"jit({name})"] + names[name] for name in _COMPILED
                           if names[f"jit({name})"] + names[name]}
    clock, counted = now, len(compiled.names)

  with count_compilations() as compiled:
    data = data_stage.load_data(config, workdir)
    log(f"[data] {config.data.name}: {len(data.train['label'])} train, "
        f"{len(data.search['label'])} {config.data.search_split}, {len(data.test['label'])} "
        f"{config.data.test_split}; groups {', '.join(data.group_names)}")
    data_stage.check_data(config, data)
    supernet_model = supernet_stage.build_supernet(config, data)
    space = supernet_model.search_space()
    lap("data_and_model")

    features = trained_supernet(config, supernet_model, data, workdir, log, lap)
    searched = features or data
    graphdef, params, state = models.split(supernet_model)
    evaluator = search_stage.population_evaluator(config, graphdef, searched)
    candidates = search_stage.run_controller(
        config, graphdef, params, state, space, searched, workdir, log,
        evaluator=None if config.search.proxy_steps else evaluator)
    best = max(candidates, key=lambda record: record["reward"])
    archive = reward.ParetoArchive(settings.reward_spec(config))  # feasible candidates only
    for record in candidates:
      archive.add(record)
    lap("search")
    if features is not None:  # pruning and tests run the whole model on images
      supernet_model.freeze_trunk(0)
      graphdef = models.split(supernet_model)[0]

    found = search_space.from_json(best["arch"])
    pruned_arch, pruned_params, pruning, before, after = final_stage.prune_found(
        config, graphdef, params, state, space, found, data, evaluator)
    log(f"[prune] {search_space.to_dict(found)} → {search_space.to_dict(pruned_arch)}: params "
        f"{before['params']:,} → {after['params']:,}")
    lap("prune")

    found_model, trained, found_predictions = final_stage.train_and_evaluate(
        config, "final", export.standalone(nnx.merge(graphdef, pruned_params, state),
                                           pruned_arch), data, workdir, log,
        features=features)
    lap("final")
    baselines, predictions = final_stage.train_baselines(config, supernet_model, data, workdir,
                                                         log)
    predictions["found"] = found_predictions
    final_stage.save_predictions(workdir / "results" / final_stage.PREDICTIONS, predictions)
    lap("baselines")

    export.save(workdir / "final", found_model, model_name=config.model.name,
                arch=pruned_arch, class_names=data.class_names, group_names=data.group_names)
  summary = {
      "best": best, "pareto": archive.front,
      "final": {"trained": trained, "before_pruning": before, "after_pruning": after,
                "arch": search_space.to_dict(pruned_arch), "pruning": pruning,
                "objective": config.train.objective.name},
      "baselines": baselines,
      "comparison": final_stage.comparisons(config, data, predictions, baselines),
      "group_counts": data.group_counts(),
      "timing": timing,
      "compilations": compilations,
  }
  report_lib.write_report(workdir / "results", summary, candidates, data.group_names)
  log("\n" + report_lib.results_table(summary))
  return metrics.to_python(summary)


def run_baselines(config: Any, workdir: str | os.PathLike,
                  log: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Trains and tests the baselines for a finished search and rewrites its report.

  Baselines already in the summary under the same name are replaced; others are kept. The
  paired comparisons with the found model are recomputed for every baseline.
  """
  workdir = Path(workdir)
  summary_path = workdir / "results" / "summary.json"
  if not summary_path.exists():
    raise FileNotFoundError(f"{summary_path} does not exist: run the search in {workdir} first "
                            f"(python -m launch.search --workdir={workdir})")
  prepare(config, workdir, ignore=_BASELINE_KEYS)
  data = data_stage.load_data(config, workdir)
  data_stage.check_data(config, data)
  supernet_model = supernet_stage.build_supernet(config, data)
  if trained_supernet(config, supernet_model, data, workdir, log) is not None:
    supernet_model.freeze_trunk(0)
  new, new_predictions = final_stage.train_baselines(config, supernet_model, data, workdir, log)
  predictions_path = workdir / "results" / final_stage.PREDICTIONS
  predictions = {**final_stage.load_predictions(predictions_path), **new_predictions}
  final_stage.save_predictions(predictions_path, predictions)
  summary = checkpoint.read_json(summary_path)
  names = {b["name"] for b in new}
  summary["baselines"] = [b for b in summary["baselines"] if b["name"] not in names] + new
  summary["comparison"] = final_stage.comparisons(config, data, predictions,
                                                  summary["baselines"])
  report_lib.write_report(workdir / "results", summary,
                          candidate_log.read(workdir / "results" / "candidates.jsonl"),
                          data.group_names)
  log("\n" + report_lib.results_table(summary))
  return summary
