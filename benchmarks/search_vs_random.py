"""Does regularized evolution beat random search at equal budget on one trained supernet?

Run: python -m benchmarks.search_vs_random --workdir=DIR   (one JSON object; progress on stderr)

The default search's setting (configs/default.py, Fashion-Tones). The supernet is read from
DIR/checkpoints/supernet (a finished default search leaves it there) or trained there first.
For each controller seed s in `--seeds` and each controller (`evolution`, `random`), the
search loop (`controllers.run`) proposes `search.candidates` candidates in batches of
`search.batch_size`, scored exactly as the search scores them (`stages.search.candidate_scorer`:
recalibrated batch norm, validation metrics, the reward). Scores depend on the architecture
only, so they are cached across runs (the results equal independent runs). Reported:

- `best_reward`: per controller, the final best validation reward of each seed;
- `curves`: per controller and seed, the best reward after every batch; `curve_mean`/`_sd`;
- `wins`: seeds where evolution's final best ≥ random's (ties count), and strictly greater;
- `test`: for the first `--test_seeds` seeds, each controller's winner trained stand-alone
  with config.train (its objective) and its test accuracy, disparity, worst group;
- `space`: the number of architectures in the space and the distinct ones each run scored;
- `noise`: the standard error of one validation reward (binomial, from the winners' accuracy
  and group accuracies: sqrt(a(1 − a)/n + Σ_g a_g(1 − a_g)/n_g)), and how many distinct
  architectures scored by any run lie within one such error of the best reward seen: when
  the best rewards of the two controllers differ by less than one standard error, and many
  architectures tie within it, the budget cannot tell the controllers apart.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from moenas_jax import controllers, search_space
from moenas_jax.stages import search as search_stage


def _space_size(space: search_space.SearchSpace) -> int:
  """Architectures in the space: per layer, 1 (one expert) + Σ_{n ≥ 2} min(K_max, n) top-ks."""
  return math.prod(1 + sum(min(k, n) for n in range(2, e + 1))
                   for e, k in zip(space.max_experts, space.max_top_k))


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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--test_seeds", type=int, default=3,
                      help="seeds whose winners are trained stand-alone and tested")
  args = parser.parse_args()
  begin = time.perf_counter()
  workdir = Path(args.workdir)
  supernet = common.trained_supernet(workdir)
  config, space = supernet.config, supernet.space
  evaluator = search_stage.population_evaluator(config, supernet.graphdef, supernet.data)
  score = search_stage.candidate_scorer(config, evaluator, supernet.params, supernet.state, space,
                                  supernet.data, log=common.log)
  memo: dict[tuple, dict] = {}

  def cached_score(archs, todo, cycle):
    candidates = search_space.unstack(archs)
    if any(candidates[i].key() not in memo for i in todo):
      for i, record in zip(todo, score(archs, todo, cycle)):
        memo[candidates[i].key()] = record
    return [memo[candidates[i].key()] for i in todo]

  cycles = config.search.candidates // config.search.batch_size
  runs: dict[str, dict[int, list[dict]]] = {"evolution": {}, "random": {}}
  for seed in args.seeds:
    for name in runs:
      common.log(f"[search_vs_random] {name}, seed {seed}")
      controller = controllers.make(name, space, population_size=config.search.population_size,
                                    tournament_size=config.search.tournament_size,
                                    batch_size=config.search.batch_size, seed=seed)
      out = workdir / "search_vs_random" / f"{name}_{seed}"
      runs[name][seed] = controllers.run(controller, space, cached_score, cycles=cycles,
                                         checkpoint_dir=out / "checkpoints",
                                         log_path=out / "candidates.jsonl")
  scored_seconds = time.perf_counter() - begin

  def curve(records):
    best, values = -np.inf, []
    for cycle in range(cycles):
      rewards = [r["reward"] for r in records if r["cycle"] == cycle]
      best = max([best, *rewards])
      values.append(round(float(best), 5))
    return values

  curves = {name: {seed: curve(records) for seed, records in by_seed.items()}
            for name, by_seed in runs.items()}
  best = {name: [c[seed][-1] for seed in args.seeds] for name, c in curves.items()}
  test = {}
  for seed in args.seeds[:args.test_seeds]:
    for name in runs:
      winner = max(runs[name][seed], key=lambda r: r["reward"])
      common.log(f"[search_vs_random] stand-alone training of {name} seed {seed}'s winner")
      results = common.standalone(supernet, search_space.from_json(winner["arch"]),
                                  workdir / "search_vs_random", f"winner_{name}_{seed}")
      test.setdefault(name, []).append({
          "seed": seed, "arch": winner["arch"], "validation_reward": winner["reward"],
          **{key: round(results[key], 4)
             for key in ("accuracy", "disparity", "worst_group_accuracy", "robustness")}})
  noise = _noise([r for by_seed in runs.values() for records in by_seed.values()
                   for r in records])
  wins = sum(e >= r for e, r in zip(best["evolution"], best["random"]))
  strict = sum(e > r for e, r in zip(best["evolution"], best["random"]))
  print(json.dumps({
      "seeds": args.seeds,
      "best_reward": best,
      "wins": {"evolution_at_least_random": wins, "evolution_above_random": strict,
               "of": len(args.seeds)},
      "curves": {name: {str(seed): values for seed, values in c.items()}
                 for name, c in curves.items()},
      "curve_mean": {name: np.mean(list(c.values()), 0).round(5).tolist()
                     for name, c in curves.items()},
      "curve_sd": {name: np.std(list(c.values()), 0).round(5).tolist()
                   for name, c in curves.items()},
      "test": test,
      "noise": noise,
      "space": {"architectures": _space_size(space),
                "distinct_scored": {name: [len(by_seed[s]) for s in args.seeds]
                                    for name, by_seed in runs.items()},
                "candidates_per_run": config.search.candidates,
                "batch_size": config.search.batch_size, "cycles": cycles},
      "settings": {"config": "configs/default.py", "workdir": str(workdir),
                   "population_size": config.search.population_size,
                   "tournament_size": config.search.tournament_size,
                   "bn_batches": config.search.bn_batches,
                   "train_objective": config.train.objective.to_dict()},
      "seconds": {"search_runs": round(scored_seconds, 1),
                  "total": round(time.perf_counter() - begin, 1)},
  }))


if __name__ == "__main__":
  main()
