"""Search strategies at equal budget on one trained supernet: evolution, random, bo, optuna, llm.

Run: python -m benchmarks.controllers --workdir=DIR   (one JSON object; progress on stderr)

The default search's setting (configs/default.py, Fashion-Tones). The supernet is read from
DIR/checkpoints/supernet (a finished default search leaves it there) or trained there first.
For each controller seed s in `--seeds` and each controller of `--controllers` (those whose
extra is not installed are skipped, and named), the search loop (`controllers.run`) proposes
`search.candidates` candidates in batches of `search.batch_size`, scored exactly as the search
scores them (`stages.search.candidate_scorer`: recalibrated batch norm, validation metrics,
the reward). Scores depend on the architecture only, so they are cached across runs (the
results equal independent runs; the evaluation time of a candidate is measured when it is
first scored), also across invocations: DIR/controllers/scores.jsonl keeps them, so adding a
controller or seeds later scores only new architectures. Reported:

- `best_reward`: per controller, the final best validation reward of each seed;
- `curves`: per controller and seed, the best reward after every batch; `curve_mean`/`_sd`;
- `budget`: candidates per run; `budget_to_match_evolution`: per controller, per seed the
  candidates scored until its best reaches evolution's final best of that seed (null where
  it never does), and their mean (null unless every seed reaches it);
- `candidates_scored`: per controller and seed, the distinct architectures scored;
- `seconds_per_batch`: per controller, the mean wall time of its `ask` + `tell` per batch
  (controller overhead), and `evaluation_seconds_per_candidate` (the scorer's, uncached);
- `hypervolume`: per controller and seed, the hypervolume dominated by the scored candidates
  within the hard budgets, in (1 − accuracy, disparity, params / largest candidate's params),
  all minimised, reference point (1, 1, 1): the volume of the Pareto front's dominated region;
- `llm_validity`: the share of the llm controller's proposals that were valid before repair
  (per seed; null when llm did not run);
- `noise`: the standard error of one validation reward at the top (binomial) and how many
  distinct architectures lie within one such error of the best reward seen.
A plot `controllers.png` in DIR: best reward against candidates scored, one line per
controller (mean over seeds) with a band of ± one standard deviation.
"""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from benchmarks import common
from moenas_jax import controllers, reward, search_space, settings
from moenas_jax.stages import search as search_stage

NAMES = ("evolution", "random", "bo", "optuna", "llm")


def _objectives(records: list[dict], largest_params: float) -> np.ndarray:
  return np.asarray([[1 - r["metrics"]["accuracy"], r["metrics"]["disparity"],
                      r["metrics"]["params"] / largest_params] for r in records], np.float64)


def _noise(records: list[dict]) -> dict:
  """Standard error of one reward at the top, and the architectures within it of the best."""
  unique = {json.dumps(r["arch"], sort_keys=True): r for r in records}
  best = max(unique.values(), key=lambda r: r["reward"])
  m = best["metrics"]
  n = np.asarray(m["group_count"], np.float64)
  a, groups = m["accuracy"], np.asarray(m["group_accuracy"], np.float64)
  se = float(np.sqrt(a * (1 - a) / n.sum() + np.sum(groups * (1 - groups) / n)))
  within = sum(r["reward"] >= best["reward"] - se for r in unique.values())
  return {"reward_standard_error": round(se, 4), "best_reward_seen": round(best["reward"], 4),
          "architectures_within_one_error_of_best": within,
          "distinct_architectures_scored": len(unique)}


class _Timed:
  """A controller whose `ask` + `tell` wall time per batch is recorded in `seconds` (its
  other methods pass through)."""

  def __init__(self, controller):
    self.controller, self.seconds, self.batch_size = controller, [], controller.batch_size
    self._clock = 0.0

  def ask(self):
    start = time.perf_counter()
    archs = self.controller.ask()
    self._clock = time.perf_counter() - start
    return archs

  def tell(self, archs, rewards):
    start = time.perf_counter()
    self.controller.tell(archs, rewards)
    self.seconds.append(self._clock + time.perf_counter() - start)

  def __getattr__(self, name):  # state_dict, and what a controller may add (observe, ...)
    return getattr(self.controller, name)


def _read_lines(path: Path) -> list[dict]:
  """The JSON lines of `path` (none if it is missing; a torn last line is dropped)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      break
  return records


def _curve(records: list[dict], cycles: int) -> list[float]:
  best, values = -np.inf, []
  for cycle in range(cycles):
    best = max([best, *(r["reward"] for r in records if r["cycle"] == cycle)])
    values.append(round(float(best), 5))
  return values


def _plot(curves: dict[str, dict[int, list[float]]], batch_size: int, path: Path) -> None:
  figure = Figure(figsize=(6, 4))
  axes = figure.add_subplot()
  for name, by_seed in curves.items():
    values = np.asarray(list(by_seed.values()))
    x = batch_size * np.arange(1, values.shape[1] + 1)
    mean, sd = values.mean(0), values.std(0)
    axes.plot(x, mean, label=name)
    axes.fill_between(x, mean - sd, mean + sd, alpha=0.2)
  axes.set_xlabel("candidates scored")
  axes.set_ylabel("best validation reward")
  axes.legend()
  figure.tight_layout()
  figure.savefig(path, dpi=120)


def _available(names: list[str], options: dict) -> tuple[list[str], dict[str, str]]:
  """(controllers whose settings build, {name: why not} for those whose extra is missing)."""
  kept, skipped = [], {}
  for name in names:
    if name not in controllers.NAMES:
      skipped[name] = f"not a controller of this version (one of {', '.join(controllers.NAMES)})"
      continue
    try:
      controllers.settings(name, **options)
      kept.append(name)
    except ImportError as error:
      skipped[name] = str(error)
  return kept, skipped


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--controllers", nargs="+", default=list(NAMES), choices=NAMES)
  parser.add_argument("--config", default="default", choices=("default", "smoke"),
                      help="configs/<name>.py; smoke: a quick check of this script")
  args = parser.parse_args()
  if "evolution" not in args.controllers:
    parser.error("--controllers must include evolution (the reference of the budgets)")
  begin = time.perf_counter()
  workdir = Path(args.workdir)
  supernet = common.trained_supernet(workdir, importlib.import_module(
      f"configs.{args.config}").get_config())
  config, space = supernet.config, supernet.space
  evaluator = search_stage.population_evaluator(config, supernet.graphdef, supernet.data)
  score = search_stage.candidate_scorer(config, evaluator, supernet.params, supernet.state,
                                        space, supernet.data, log=common.log)
  # Scores of this supernet by architecture, kept in the workdir: a later run (another
  # controller, more seeds) scores only what no run has scored.
  memo_path = workdir / "controllers" / "scores.jsonl"
  memo = {search_space.from_json(r["arch"]).key(): r for r in _read_lines(memo_path)}
  evaluation_seconds: list[float] = []

  def cached_score(archs, todo, cycle):
    candidates = search_space.unstack(archs)
    fresh = [i for i in todo if candidates[i].key() not in memo]
    if fresh:
      start = time.perf_counter()
      scored = score(archs, np.asarray(fresh), cycle)
      evaluation_seconds.append((time.perf_counter() - start) / len(fresh))
      with open(memo_path, "a") as lines:
        for i, record in zip(fresh, scored):
          memo[candidates[i].key()] = record
          lines.write(json.dumps({"arch": search_space.to_dict(candidates[i]), **record}) + "\n")
    return [memo[candidates[i].key()] for i in todo]

  options = settings.controller_options(config)
  names, skipped = _available(args.controllers, {**options, "seed": 0})
  cycles, size = config.search.candidates // config.search.batch_size, config.search.batch_size
  runs = {name: {} for name in names}
  overhead = {name: [] for name in names}
  validity = {}
  for seed in args.seeds:
    for name in names:
      common.log(f"[controllers] {name}, seed {seed}")
      controller = _Timed(controllers.make(name, space, **{**options, "seed": seed}))
      out = workdir / "controllers" / f"{name}_{seed}"
      shutil.rmtree(out, ignore_errors=True)  # a fresh run (the scores are cached anyway)
      runs[name][seed] = controllers.run(controller, space, cached_score, cycles=cycles,
                                         checkpoint_dir=out / "checkpoints",
                                         log_path=out / "candidates.jsonl")
      overhead[name].extend(controller.seconds)
      stats = getattr(controller.controller, "stats", None)
      if stats is not None:
        validity.setdefault(name, []).append(stats().get("llm_validity"))
  curves = {name: {seed: _curve(records, cycles) for seed, records in by_seed.items()}
            for name, by_seed in runs.items()}
  best = {name: [c[seed][-1] for seed in args.seeds] for name, c in curves.items()}

  def to_match(name):
    per_seed = []
    for seed, target in zip(args.seeds, best["evolution"]):
      reached = [i for i, value in enumerate(curves[name][seed]) if value >= target]
      per_seed.append((reached[0] + 1) * size if reached else None)
    mean = None if None in per_seed else float(np.mean(per_seed))
    return {"per_seed": per_seed, "mean": mean}

  budgets = {term.metric: term.budget for term in settings.reward_spec(config).budgets}
  largest = float(space.params(space.largest()))

  def volume(records):
    feasible = [r for r in records
                if all(r["metrics"][metric] <= budget for metric, budget in budgets.items())]
    return round(reward.hypervolume(_objectives(feasible, largest), np.ones(3)), 5)

  _plot(curves, size, workdir / "controllers.png")
  print(json.dumps({
      "seeds": args.seeds,
      "controllers": names,
      "skipped": skipped,
      "best_reward": best,
      "best_reward_mean": {name: round(float(np.mean(v)), 5) for name, v in best.items()},
      "best_reward_sd": {name: round(float(np.std(v)), 5) for name, v in best.items()},
      "budget": config.search.candidates,
      "budget_to_match_evolution": {name: to_match(name) for name in names},
      "curves": {name: {str(seed): values for seed, values in c.items()}
                 for name, c in curves.items()},
      "curve_mean": {name: np.mean(list(c.values()), 0).round(5).tolist()
                     for name, c in curves.items()},
      "curve_sd": {name: np.std(list(c.values()), 0).round(5).tolist()
                   for name, c in curves.items()},
      "candidates_scored": {name: [len({json.dumps(r["arch"]) for r in runs[name][s]})
                                   for s in args.seeds] for name in names},
      "seconds_per_batch": {name: round(float(np.mean(v)), 4) for name, v in overhead.items()},
      "evaluation_seconds_per_candidate": (round(float(np.mean(evaluation_seconds)), 4)
                                           if evaluation_seconds else None),  # all cached
      "hypervolume": {name: [volume(runs[name][s]) for s in args.seeds] for name in names},
      "llm_validity": validity.get("llm"),
      "noise": _noise([r for by_seed in runs.values() for records in by_seed.values()
                       for r in records]),
      "settings": {"config": f"configs/{args.config}.py", "workdir": str(workdir),
                   "batch_size": size, "cycles": cycles, "bn_batches": config.search.bn_batches,
                   "budgets": budgets},
      "seconds": round(time.perf_counter() - begin, 1),
  }))


if __name__ == "__main__":
  main()
