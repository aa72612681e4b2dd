"""Measured latency: builds the table on this machine, then checks it on exported candidates.

Run: python -m benchmarks.latency --output=latency.json [--config=default|smoke|<configs name>]
     (prints one JSON object; progress on stderr)

This is also how to build the table for a search (`config.search.latency_table`): run it on
the target device with the search's config. It builds the config's supernet (weights from
initialisation: timing does not depend on them), measures `latency.measure_table` at
`--batch_size` (1 image: the edge case) and saves it to `--output`; its constant is fitted on
`--calibration` candidates (the smallest, the largest and sampled ones, from `--seed`). Then
`--candidates` other candidates sampled with `--seed`, sorted by MACs, are exported
(`export.standalone`) and timed end to end with the same `latency.time_calls` (repeats
interleaved across the candidates). Printed: `latency_error`, the mean absolute relative error
|predicted − measured| / measured, `max_error`, each candidate's predicted and measured ms, the
table's device and the seconds. `calibration_drift`: each calibration candidate timed again
with the others, over its time in the table's calibration: far from 1, the machine's speed changed
between the table and the validation (a shared machine's neighbours), and the error shows that,
not the table. `latency_error_rescaled`: the error with the predictions scaled by the mean
drift (a diagnostic; the validation candidates play no part in it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time

import jax
import numpy as np

from moenas_jax import latency, search_space
from moenas_jax.data import describe_dataset
from moenas_jax.stages import supernet as supernet_stage


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def validation_candidates(space: search_space.SearchSpace, count: int, seed: int,
                          exclude: list[search_space.Arch]) -> list[search_space.Arch]:
  """`count` distinct sampled candidates, none in `exclude`, sorted by MACs."""
  chosen = latency.distinct_candidates(space, count, jax.random.key(seed), exclude)
  if len(chosen) < count:
    raise ValueError(f"the space has only {len(chosen)} candidates besides the calibration "
                     f"ones; lower --candidates to at most {len(chosen)}")
  return [chosen[i] for i in np.argsort(space.macs(search_space.stack(chosen)), kind="stable")]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", required=True, help="where the table (JSON) is written")
  parser.add_argument("--config", default="default", help="a module of configs/")
  parser.add_argument("--batch_size", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=2000)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--candidates", type=int, default=10)
  parser.add_argument("--calibration", type=int, default=8,
                      help="candidates the constant is fitted on (the smallest, the largest "
                           "and sampled ones)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  begin = time.perf_counter()
  config = importlib.import_module(f"configs.{args.config}").get_config()
  with tempfile.TemporaryDirectory() as data_dir:
    dataset = describe_dataset(config.data.name, config.data.data_dir or data_dir,
                               manual_dir=config.data.manual_dir or None,
                               **dict(config.data.options))
  supernet = supernet_stage.build_supernet(config, dataset)
  space = supernet.search_space()
  _log(f"supernet built in {time.perf_counter() - begin:.1f} s; measuring the table")
  start = time.perf_counter()
  table = latency.measure_table(supernet, batch_size=args.batch_size, repeats=args.repeats,
                                warmup=args.warmup, calibration_size=args.calibration,
                                seed=args.seed)
  latency.save(args.output, table)
  table_seconds = time.perf_counter() - start
  _log(f"table in {table_seconds:.1f} s (constant {table.constant_ms:.3f} ms); validating")
  start = time.perf_counter()
  calibration = [search_space.from_json(arch) for arch in table.method["calibration"]]
  archs = validation_candidates(space, args.candidates, args.seed, calibration)
  measured = latency.time_calls([latency.model_call(supernet, arch, args.batch_size)
                                 for arch in archs + calibration],
                                repeats=args.repeats, warmup=args.warmup)
  measured, drift = measured[:len(archs)], measured[len(archs):]
  predicted = table.latency(search_space.stack(archs))
  errors = np.abs(predicted - measured) / measured
  drift = drift / np.asarray(table.method["calibration_ms"])
  rescaled = np.abs(predicted * drift.mean() - measured) / measured
  print(json.dumps({
      "config": args.config, "batch_size": args.batch_size, "repeats": args.repeats,
      "warmup": args.warmup, "latency_error": float(errors.mean()),
      "max_error": float(errors.max()), "constant_ms": table.constant_ms,
      "fastest_ms": table.minimum_ms(), "device": table.device, "table": args.output,
      "calibration_drift": drift.tolist(), "latency_error_rescaled": float(rescaled.mean()),
      "candidates": [{"arch": search_space.to_dict(arch), "macs": int(space.macs(arch)),
                      "predicted_ms": float(p), "measured_ms": float(m), "error": float(e)}
                     for arch, p, m, e in zip(archs, predicted, measured, errors)],
      "seconds": {"table": table_seconds, "validation": time.perf_counter() - start,
                  "total": time.perf_counter() - begin}}, indent=1))


if __name__ == "__main__":
  main()
