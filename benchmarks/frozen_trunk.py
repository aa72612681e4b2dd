"""The whole search with and without a frozen trunk: the time of supernet training and of the
search, and the found model's test quality, side by side (same seed, same machine).

Run: python -m benchmarks.frozen_trunk --workdir=DIR [--steps 400] [--frozen_stages 3]
     [--runs full frozen frozen_loaded] [--set search.candidates=48 ...]
     (one JSON object; progress on stderr)

Three searches of configs/default.py (with the `--set` overrides, Python literals), each in
DIR/<name> (resumable: a finished one is only read back):

- `full`: `steps` supernet steps of the whole supernet on images;
- `frozen`: `frozen_stages` frozen, the trunk trained with the whole supernet for steps / 2
  steps, then steps / 2 steps of the tail on the cached features (the same number of steps);
- `frozen_loaded`: the trunk loaded from `full`'s exported model (trained once elsewhere,
  FaHaNa's case), then `steps` steps of the tail.

Then `interleaved` (`--rounds` > 0): in one process, the default supernet's training step and
the scoring of one evaluation batch by P = search.batch_size candidates, whole model on images
against the tail on cached features, called in turn after a warm-up (medians of seconds per
call), so the ratios hold on a shared, noisy machine where stage times (which include
compiling) do not.

Per run: the stage times (s; "trunk" is trunk training or loading plus feature caching),
seconds per supernet step, and the found model's test metrics after final training (and on
the supernet's weights, before it). `speedup`: full ÷ frozen of the supernet time per step,
of the search, and of trunk + supernet + search. `quality_cost`: frozen − full of the found
model's test accuracy, disparity, worst-group accuracy and robustness.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks import common, seeds
from moenas_jax import models, population, search, settings, supernet, trunk
from moenas_jax.data import pipeline
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import supernet as supernet_stage

METRICS = ("accuracy", "disparity", "worst_group_accuracy", "robustness")
STAGES = ("trunk", "supernet", "search")


def _configs(args) -> dict:
  full = seeds._config(args.seed, args.overrides)
  full.supernet.steps = args.steps
  frozen = seeds._config(args.seed, args.overrides)
  frozen.supernet.update(frozen_stages=args.frozen_stages, trunk_steps=args.steps // 2,
                         steps=args.steps - args.steps // 2)
  loaded = seeds._config(args.seed, args.overrides)
  loaded.supernet.update(frozen_stages=args.frozen_stages, steps=args.steps,
                         trunk_checkpoint=str(Path(args.workdir).absolute() / "full" / "final"))
  return {"full": full, "frozen": frozen, "frozen_loaded": loaded}


def _run(name: str, config, workdir: Path) -> dict:
  path = workdir / "results" / "summary.json"
  if path.exists():
    common.log(f"[frozen_trunk] {name}: reading {path}")
    return json.loads(path.read_text())
  common.log(f"[frozen_trunk] {name}: searching in {workdir}")
  with contextlib.redirect_stdout(sys.stderr):  # dataset preparation prints progress
    return search.run_search(config, workdir, log=common.log)


def _row(config, summary: dict) -> dict:
  timing = summary["timing"]
  return {
      "timing": {stage: timing.get(stage, 0.0) for stage in STAGES},
      "seconds_per_supernet_step": round(timing["supernet"] / config.supernet.steps, 4),
      "found": {metric: summary["final"]["trained"][metric] for metric in METRICS},
      "found_supernet_weights": {metric: summary["final"]["before_pruning"][metric]
                                 for metric in METRICS},
      "arch": summary["final"]["arch"],
      "compilations": summary["compilations"],
  }


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
  """Median seconds per call of each function, the functions called in turn each round."""
  for call in calls.values():
    jax.block_until_ready(call())  # compiles
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: round(float(np.median(values)), 4) for name, values in times.items()}


def _step_and_score_times(config, workdir: Path, stages: int, rounds: int) -> dict:
  """Seconds per supernet step and per scored batch, whole model vs tail (`_interleaved`)."""
  data = data_stage.load_data(config, workdir)
  whole = supernet_stage.build_supernet(config, data)
  tail = nnx.clone(whole)
  tail.freeze_trunk(stages)
  cache = trunk.FeatureCache(tail, config.data.eval_batch_size)
  cfg = config.supernet
  rows = {key: values[:cfg.batch_size] for key, values in data.train.items()}
  examples = {key: values[:config.data.eval_batch_size] for key, values in data.search.items()}
  archs = whole.search_space().sample_population(jax.random.key(config.seed),
                                                 config.search.batch_size)
  calls = {}
  for name, model, trained, scored in (
      ("whole", whole, rows, examples),
      ("tail", tail, cache.features(rows), cache.features(examples))):
    graphdef, params, state = models.split(model)
    trainer = supernet.SupernetTrainer(
        graphdef, model.search_space(), archs_per_step=cfg.archs_per_step,
        optimizer=settings.supernet_optimizer(config), frozen=model.frozen_names(),
        objective=data_stage.objective(config, "supernet", data))
    carry = [jax.tree.map(jnp.copy, (params, state, trainer.init(params)))]  # donated

    inputs = next(pipeline.train_batches(trained, cfg.batch_size, config.seed, 0))

    def step(trainer=trainer, carry=carry, inputs=inputs):
      *carry[0], logs = trainer.step(*carry[0], inputs, jax.random.key(0))
      return logs

    evaluator = population.PopulationEvaluator(
        graphdef, num_classes=len(data.class_names), num_groups=len(data.group_names),
        batch_size=config.data.eval_batch_size, chunk_size=config.search.chunk_size or None)
    calls[f"supernet_step_{name}"] = step
    calls[f"score_batch_{name}"] = functools.partial(evaluator.counts, params, state, archs,
                                                     scored)
  seconds = _interleaved(calls, rounds)
  return {"seconds": seconds,
          "supernet_step_speedup": round(seconds["supernet_step_whole"]
                                         / seconds["supernet_step_tail"], 2),
          "score_batch_speedup": round(seconds["score_batch_whole"]
                                       / seconds["score_batch_tail"], 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--frozen_stages", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--runs", nargs="+", default=["full", "frozen", "frozen_loaded"],
                      help="which of the runs (full first: the others compare with it)")
  parser.add_argument("--rounds", type=int, default=20,
                      help="rounds of the interleaved step and scoring times (0: none)")
  parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                      help="config overrides, e.g. search.candidates=48")
  args = parser.parse_args()
  begin = time.perf_counter()
  configs = _configs(args)
  rows = {name: _row(config, _run(name, config, Path(args.workdir) / name))
          for name, config in configs.items() if name in {"full", *args.runs}}
  full = rows["full"]

  def speedup(row):
    end_to_end = sum(full["timing"].values()) / sum(row["timing"].values())
    return {"supernet_per_step": round(full["seconds_per_supernet_step"]
                                       / row["seconds_per_supernet_step"], 2),
            "search": round(full["timing"]["search"] / row["timing"]["search"], 2),
            "trunk_supernet_search": round(end_to_end, 2)}

  interleaved = (_step_and_score_times(configs["full"], Path(args.workdir) / "interleaved",
                                       args.frozen_stages, args.rounds)
                 if args.rounds else None)
  print(json.dumps({
      "steps": args.steps, "frozen_stages": args.frozen_stages, "seed": args.seed,
      "overrides": args.overrides, "runs": rows,
      "speedup": {name: speedup(row) for name, row in rows.items() if name != "full"},
      "quality_cost": {name: {metric: round(row["found"][metric] - full["found"][metric], 4)
                              for metric in METRICS if full["found"].get(metric) is not None}
                       for name, row in rows.items() if name != "full"},
      "interleaved": interleaved, "seconds": round(time.perf_counter() - begin, 1),
  }))


if __name__ == "__main__":
  main()
