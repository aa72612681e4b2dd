"""The whole search over several seeds: mean ± sd per model and the paired difference per seed.

Run: python -m benchmarks.seeds --workdir=DIR [--seeds 0 1 2] [--set search.bn_batches=5 ...]
(one JSON object; progress on stderr)

Runs `search.run_search` with configs/default.py (and the `--set` overrides, Python literals)
for each seed in DIR/seed_<s> (resumable: a finished seed is only read back), then reports,
from each summary.json:

- `models`: per model row (the found model trained stand-alone, each baseline) and metric
  (test accuracy, disparity, worst-group accuracy, robustness), the values per seed and
  their mean and sd;
- `paired`: per seed and baseline, found − baseline with its 95% paired bootstrap interval
  (summary["comparison"]) for accuracy, disparity and worst-group accuracy;
- `criterion`: per seed, against the dense model trained with ERM (the user's starting
  point; `<model>_dense_erm`, or `<model>_dense` when the search itself trains with ERM):
  found disparity ≤ half of its, the paired interval of the disparity difference below 0,
  and accuracy at most 1 point lower (`met` when all three hold).

The found model is the best of many candidates on validation (winner's curse): its test
scores, not its search score, are the ones compared here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import common
from configs import default
from moenas_jax import search

METRICS = ("accuracy", "disparity", "worst_group_accuracy", "robustness")


def _config(seed: int, overrides: list[str]):
  config = default.get_config()
  common.set_overrides(config, overrides)
  config.seed = seed
  return config


def _rows(summary: dict) -> dict[str, dict]:
  return {"found": summary["final"]["trained"],
          **{row["name"]: row["metrics"] for row in summary["baselines"]}}


def _reference(config, summary) -> str:
  names = [row["name"] for row in summary["baselines"]]
  dense = f"{config.model.name}_dense"
  return f"{dense}_erm" if f"{dense}_erm" in names else dense


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                      help="config overrides, e.g. search.bn_batches=5")
  args = parser.parse_args()
  begin = time.perf_counter()
  summaries, configs = {}, {}
  for seed in args.seeds:
    configs[seed] = _config(seed, args.overrides)
    workdir = Path(args.workdir) / f"seed_{seed}"
    path = workdir / "results" / "summary.json"
    if path.exists():
      common.log(f"[seeds] seed {seed}: reading {path}")
      summaries[seed] = json.loads(path.read_text())
    else:
      common.log(f"[seeds] seed {seed}: searching in {workdir}")
      with contextlib.redirect_stdout(sys.stderr):  # dataset preparation prints progress
        summaries[seed] = search.run_search(configs[seed], workdir, log=common.log)

  rows = {seed: _rows(summary) for seed, summary in summaries.items()}
  names = list(rows[args.seeds[0]])
  models = {}
  for name in names:
    models[name] = {}
    for metric in METRICS:
      values = [rows[seed][name].get(metric) for seed in args.seeds]
      finite = [v for v in values if v is not None]
      models[name][metric] = {"per_seed": values,
                              "mean": round(float(np.mean(finite)), 4) if finite else None,
                              "sd": round(float(np.std(finite, ddof=1)), 4)
                              if len(finite) > 1 else None}
  paired = {str(seed): {c["baseline"]: c["found_minus_baseline"]
                        for c in summaries[seed].get("comparison") or []}
            for seed in args.seeds}
  criterion = {}
  for seed in args.seeds:
    reference = _reference(configs[seed], summaries[seed])
    found, base = rows[seed]["found"], rows[seed][reference]
    difference = paired[str(seed)].get(reference) or {}
    half = found["disparity"] <= base["disparity"] / 2
    excludes_zero = (difference.get("disparity") or {}).get("high") is not None and \
        difference["disparity"]["high"] < 0
    accuracy = found["accuracy"] >= base["accuracy"] - 0.01
    criterion[str(seed)] = {"reference": reference, "found_disparity": found["disparity"],
                            "reference_disparity": base["disparity"],
                            "at_most_half": bool(half), "interval_below_zero": bool(excludes_zero),
                            "accuracy_within_1_point": bool(accuracy),
                            "met": bool(half and excludes_zero and accuracy)}
  print(json.dumps({
      "seeds": args.seeds, "overrides": args.overrides, "models": models, "paired": paired,
      "criterion": criterion,
      "archs": {str(seed): summaries[seed]["final"]["arch"] for seed in args.seeds},
      "timing": {str(seed): summaries[seed].get("timing") for seed in args.seeds},
      "seconds": round(time.perf_counter() - begin, 1),
  }))


if __name__ == "__main__":
  main()
