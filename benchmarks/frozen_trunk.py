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

Per run: the stage times (s; "trunk" is trunk training or loading plus feature caching),
seconds per supernet step, and the found model's test metrics after final training (and on
the supernet's weights, before it). `speedup`: full ÷ frozen of the supernet time per step,
of the search, and of trunk + supernet + search. `quality_cost`: frozen − full of the found
model's test accuracy, disparity, worst-group accuracy and robustness.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from benchmarks import common, seeds
from moenas_jax import search

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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--frozen_stages", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--runs", nargs="+", default=["full", "frozen", "frozen_loaded"],
                      help="which of the runs (full first: the others compare with it)")
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

  print(json.dumps({
      "steps": args.steps, "frozen_stages": args.frozen_stages, "seed": args.seed,
      "overrides": args.overrides, "runs": rows,
      "speedup": {name: speedup(row) for name, row in rows.items() if name != "full"},
      "quality_cost": {name: {metric: round(row["found"][metric] - full["found"][metric], 4)
                              for metric in METRICS if full["found"].get(metric) is not None}
                       for name, row in rows.items() if name != "full"},
      "seconds": round(time.perf_counter() - begin, 1),
  }))


if __name__ == "__main__":
  main()
