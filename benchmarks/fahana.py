"""FaHaNa's claim in kind: the model found over widths, depths and experts vs MobileNetV2.

Run: python -m benchmarks.fahana --workdir=DIR [--datasets fashion_tones utkface]
         [--seeds 0 1 2] [--utkface_dir=../shared/datasets/utkface] [--no-scratch]
         [--scratch_epochs N] [--set train.epochs=3 ...]
(one JSON object; progress on stderr)

FaHaNa (Sheng et al., DAC 2022) reports its searched network against MobileNetV2: slightly
higher accuracy, 5.28x smaller, fairer, 5.75x faster on a Raspberry Pi. Here, per dataset and
seed, the whole search runs with width, depth and MoE genes (`configs/fahana.py` on
Fashion-Tones; `configs/utkface_cpu.py` with the same genes and a width-0.25 supernet on
UTKFace gender by race, from `--utkface_dir`) in DIR/<dataset>/seed_<s> (resumable: a finished
run is only read back; the prepared data is shared by the seeds, DIR/<dataset>/data). The
baseline is MobileNetV2 at the published width closest to the supernet's (0.35 for 0.25),
trained by the final stage with the found model's recipe and tested on the same images. The
hardware specification, as FaHaNa searches under one: `reward.param_budget` = a third of that
MobileNetV2's parameters. Per run:

- `size_ratio`: MobileNetV2's parameters over the found model's;
- `latency_ratio`: MobileNetV2's measured latency over the found model's, both exported
  (`export.load` of the found model, MobileNetV2 built at its config), jitted `predict` on one
  image, medians of `--repeats` timed calls taken in turns (`latency.time_calls`) on this
  machine;
- `accuracy_delta`, `disparity_delta_interval`: found − MobileNetV2 on the test split, the
  paired 95% bootstrap interval of the final stage (`summary["comparison"]`);
- `target`: size_ratio ≥ 3, latency_ratio ≥ 2, accuracy_delta ≥ 0 and the disparity interval's
  low end ≤ 0 (its disparity no higher).

Per dataset, `over_seeds`: means with 95% t intervals over the seeds, and `target_met` when
the means meet the size, latency and accuracy targets and every seed's disparity interval does.

The found model starts its final training from its supernet weights, MobileNetV2 from
scratch. The control `from_scratch` (on by default, `--no-scratch` skips it) trains the found
architecture again from fresh weights (`export.initialised`, from the seed) with the same
recipe, in the run's workdir (resumable; results/found_scratch.json), and compares it paired
with the same MobileNetV2: both then start alike, so its deltas are the architecture's alone.
`--scratch_epochs N` trains both from scratch for N epochs instead (nearer convergence).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from configs import fahana, utkface_cpu
from moenas_jax import checkpoint, costs, evaluate, export, latency, metrics, models, search
from moenas_jax.data import describe_dataset
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import final as final_stage

BASELINE = "mobilenet_v2"
SCRATCH = "found_scratch"  # the found architecture trained from fresh weights
DATASETS = ("fashion_tones", "utkface")
# MobileNetV2's published width multipliers (Sandler et al. 2018, Keras applications).
MOBILENET_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def config_for(dataset: str, seed: int, utkface_dir: str, overrides: list[str]):
  """The search config of a dataset: its genes, MobileNetV2 as the baseline, `overrides`.

  MobileNetV2 takes the published width (`MOBILENET_WIDTHS`) closest to the supernet's and its
  own stem for the image size. The hardware specification is FaHaNa's size target:
  `reward.param_budget` = a third of that MobileNetV2's parameters (`--set
  reward.param_budget=None` searches without it).
  """
  if dataset == "fashion_tones":
    config = fahana.get_config()
  elif dataset == "utkface":
    config = utkface_cpu.get_config()
    # At width 0.5 the smallest candidate has 359k parameters, MobileNetV2 0.5 700k: none
    # would be 3x smaller. 0.25 spans 95k-308k parameters, as on Fashion-Tones.
    config.model.update(width_multiplier=0.25, width_choices=fahana.WIDTH_CHOICES,
                        search_depth=True)
    config.data.manual_dir = utkface_dir
  else:
    raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(DATASETS)}")
  common.set_overrides(config, overrides)  # first: the baseline follows the supernet's width
  width = min(MOBILENET_WIDTHS, key=lambda w: abs(w - config.model.width_multiplier))
  config.baselines = (BASELINE,)
  config.baseline_options = {BASELINE: {"width_multiplier": width}}
  config.seed = seed
  if not any(override.startswith("reward.param_budget=") for override in overrides):
    config.reward.param_budget = mobilenet_params(config) // 3
  return config


def mobilenet_params(config) -> int:
  """The parameters of the config's MobileNetV2 baseline for its dataset's images and classes."""
  with tempfile.TemporaryDirectory() as data_dir:
    dataset = describe_dataset(config.data.name, data_dir,
                               manual_dir=config.data.manual_dir or None,
                               **dict(config.data.options))
  height, width, channels = dataset.image_shape
  return costs.count_params(nnx.eval_shape(lambda: models.build(
      BASELINE, rngs=nnx.Rngs(0), num_classes=len(dataset.class_names),
      image_size=(height, width), channels=channels, **config.baseline_options[BASELINE])))


def measured_latencies(found_dir: Path, baseline_options: dict, repeats: int) -> np.ndarray:
  """ms per image of the exported found model and of MobileNetV2 at its options (same input)."""
  found = export.load(found_dir)
  height, width, channels = found.metadata["input_shape"]
  mobilenet = export.Exported(models.build(
      BASELINE, rngs=nnx.Rngs(0), num_classes=len(found.metadata["class_names"]),
      image_size=(height, width), channels=channels, **baseline_options), metadata={})
  image = jax.random.uniform(jax.random.key(0), (1, height, width, channels))
  return latency.time_calls([lambda: found.predict(image), lambda: mobilenet.predict(image)],
                            repeats=repeats, warmup=5)


def from_scratch(config, workdir: Path, log, epochs: int | None = None) -> dict:
  """The found architecture trained from fresh weights (seeded by `config.seed`) with the
  run's recipe and tested paired against its MobileNetV2: {"epochs", "metrics",
  "baseline_metrics", "found_minus_baseline"}, saved in results/ and read back from there.

  `epochs` other than the recipe's trains both from scratch for that many (MobileNetV2 again,
  as `baseline_mobilenet_v2_e<epochs>`): the architectures compared nearer convergence.
  """
  epochs = epochs or config.train.epochs
  suffix = "" if epochs == config.train.epochs else f"_e{epochs}"
  path = workdir / "results" / f"{SCRATCH}{suffix}.json"
  if path.exists():
    return checkpoint.read_json(path)
  config = config.copy_and_resolve_references()
  config.train.epochs = epochs
  data = data_stage.load_data(config, workdir)
  _, tested, predictions = final_stage.train_and_evaluate(
      config, SCRATCH + suffix, export.initialised(workdir / "final", config.seed), data,
      workdir, log)
  if suffix:
    _, base, base_predictions = final_stage.train_and_evaluate(
        config, f"baseline_{BASELINE}{suffix}", final_stage.baseline(config, BASELINE, None, data),
        data, workdir, log)
  else:
    summary = checkpoint.read_json(workdir / "results" / "summary.json")
    base = next(row["metrics"] for row in summary["baselines"] if row["name"] == BASELINE)
    base_predictions = final_stage.load_predictions(
        workdir / "results" / final_stage.PREDICTIONS)[BASELINE]
  paired = evaluate.paired_comparison(
      predictions, base_predictions, data.test, num_classes=len(data.class_names),
      num_groups=len(data.group_names), seed=config.seed,
      bootstrap_resamples=config.evaluation.bootstrap_resamples)
  result = metrics.to_python({"epochs": epochs, "metrics": tested, "baseline_metrics": base,
                              "found_minus_baseline": paired})
  checkpoint.write_json_atomic(path, result)
  return result


def compare(summary: dict, latencies_ms: np.ndarray, scratch: dict | None = None) -> dict:
  """One run's found − MobileNetV2 figures and its target checks; with `scratch`
  (`from_scratch`), the same deltas of the found architecture trained from fresh weights."""
  found = summary["final"]["trained"]
  base = next(row["metrics"] for row in summary["baselines"] if row["name"] == BASELINE)
  paired = next(c["found_minus_baseline"] for c in summary["comparison"]
                if c["baseline"] == BASELINE)
  row = {"size_ratio": base["params"] / found["params"],
         "mac_ratio": base["macs"] / found["macs"],
         "latency_ratio": float(latencies_ms[1] / latencies_ms[0]),
         "accuracy_delta": found["accuracy"] - base["accuracy"],
         "accuracy_delta_interval": paired["accuracy"],
         "disparity_delta_interval": paired["disparity"],
         "found": {key: found[key] for key in ("accuracy", "disparity", "worst_group_accuracy",
                                               "params", "macs")},
         BASELINE: {key: base[key] for key in ("accuracy", "disparity", "worst_group_accuracy",
                                               "params", "macs")},
         "latency_ms": {"found": float(latencies_ms[0]), BASELINE: float(latencies_ms[1])},
         "group_counts": found["group_count"], "arch": summary["final"]["arch"]}
  row["target"] = {"size": row["size_ratio"] >= 3, "latency": row["latency_ratio"] >= 2,
                   "accuracy": row["accuracy_delta"] >= 0,
                   "disparity": paired["disparity"]["low"] <= 0}
  if scratch is not None:
    tested, delta = scratch["metrics"], scratch["found_minus_baseline"]
    row["from_scratch"] = {"epochs": scratch["epochs"], "accuracy": tested["accuracy"],
                           "disparity": tested["disparity"],
                           BASELINE: {key: scratch["baseline_metrics"][key]
                                      for key in ("accuracy", "disparity")},
                           "accuracy_delta": (tested["accuracy"]
                                              - scratch["baseline_metrics"]["accuracy"]),
                           "accuracy_delta_interval": delta["accuracy"],
                           "disparity_delta_interval": delta["disparity"]}
  return row


def over_seeds(rows: list[dict]) -> dict:
  """Means over seeds with 95% t intervals, and whether they meet FaHaNa's targets."""
  result = {key: common.seed_interval([row[key] for row in rows])
            for key in ("size_ratio", "mac_ratio", "latency_ratio", "accuracy_delta")}
  result["disparity_delta"] = common.seed_interval(
      [row["disparity_delta_interval"]["estimate"] for row in rows])
  if all("from_scratch" in row for row in rows):
    result["from_scratch"] = {
        "accuracy_delta": common.seed_interval([row["from_scratch"]["accuracy_delta"]
                                                for row in rows]),
        "disparity_delta": common.seed_interval(
            [row["from_scratch"]["disparity_delta_interval"]["estimate"] for row in rows])}
  result["target_met"] = bool(result["size_ratio"]["mean"] >= 3
                              and result["latency_ratio"]["mean"] >= 2
                              and result["accuracy_delta"]["mean"] >= 0
                              and all(row["target"]["disparity"] for row in rows))
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--utkface_dir", default="../shared/datasets/utkface")
  parser.add_argument("--repeats", type=int, default=2000)
  parser.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=True,
                      help="also train the found architecture from fresh weights (control)")
  parser.add_argument("--scratch_epochs", type=int, default=None,
                      help="epochs of the scratch control (default: the recipe's; others "
                           "train MobileNetV2 from scratch again for as many)")
  parser.add_argument("--set", dest="overrides", nargs="*", default=[],
                      help="config overrides, e.g. train.epochs=3")
  args = parser.parse_args()
  begin = time.perf_counter()
  results = {}
  for dataset in args.datasets:
    rows = []
    for seed in args.seeds:
      config = config_for(dataset, seed, args.utkface_dir, args.overrides)
      config.data.data_dir = str(Path(args.workdir) / dataset / "data")
      workdir = Path(args.workdir) / dataset / f"seed_{seed}"
      path = workdir / "results" / "summary.json"
      if path.exists():
        common.log(f"[fahana] {dataset} seed {seed}: reading {path}")
        summary = json.loads(path.read_text())
      else:
        common.log(f"[fahana] {dataset} seed {seed}: searching in {workdir}")
        with contextlib.redirect_stdout(sys.stderr):  # dataset preparation prints progress
          summary = search.run_search(config, workdir, log=common.log)
      scratch = None
      if args.scratch:
        common.log(f"[fahana] {dataset} seed {seed}: the found architecture from scratch")
        with contextlib.redirect_stdout(sys.stderr):
          scratch = from_scratch(config, workdir, common.log, args.scratch_epochs)
      common.log(f"[fahana] {dataset} seed {seed}: timing the found model and {BASELINE}")
      latencies = measured_latencies(workdir / "final",
                                     dict(config.baseline_options[BASELINE]), args.repeats)
      rows.append({"seed": seed, **compare(summary, latencies, scratch)})
    results[dataset] = {"runs": rows, "over_seeds": over_seeds(rows)}
  print(json.dumps({"seeds": args.seeds, "overrides": args.overrides,
                    "device": latency.device_description(), "datasets": results,
                    "seconds": round(time.perf_counter() - begin, 1)}, indent=1))


if __name__ == "__main__":
  main()
