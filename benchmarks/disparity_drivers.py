"""What drives disparity, from finished search workdirs: group sizes and the project's levers.

Run: python -m benchmarks.disparity_drivers --workdir=runs/utkface_cpu [--workdir=...]
(one JSON object; each workdir is a finished `launch.search` run, e.g. one per seed)

Per workdir, from its `results/summary.json`, `results/test_predictions.npz` and its prepared
data (read again, nothing trains):

- `groups`: per group, its training and test counts and each model's test accuracy, and
  `spearman_accuracy_vs_train_count` per model (rank correlation over the groups: does a group
  fare worse because it is rarer in training?);
- `levers`: each lever as a paired comparison on the same test images (estimate and 95%
  paired bootstrap interval of the change in accuracy, disparity and worst-group accuracy):
  `objective` (the dense model trained with `config.train.objective` − the same model with
  ERM), `architecture` (the found MoE candidate − the dense model, same objective), and
  `family:<name>` (each other baseline family − the dense model, same objective).

Levers that need another run (resolution, `--config.data.options.image_size`) compare
workdirs: pass one workdir per setting and read `levers` side by side.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import ml_collections
import numpy as np
from scipy import stats

from moenas_jax import checkpoint, evaluate
from moenas_jax.stages import data as data_stage


def _lever_pairs(names: list[str], model_name: str) -> dict[str, tuple[str, str]]:
  dense = f"{model_name}_dense"
  pairs = {}
  if dense in names and dense + "_erm" in names:
    pairs["objective"] = (dense, dense + "_erm")
  if "found" in names and dense in names:
    pairs["architecture"] = ("found", dense)
  for name in names:
    if name not in ("found", dense, dense + "_erm") and dense in names:
      pairs[f"family:{name}"] = (name, dense)
  return pairs


def drivers(workdir: Path) -> dict:
  """The group table and the levers of one finished run."""
  config = ml_collections.ConfigDict(checkpoint.read_json(workdir / "config.json"))
  data = data_stage.load_data(config, workdir)
  predictions = dict(np.load(workdir / "results" / "test_predictions.npz"))
  names = sorted(predictions)
  groups, labels = data.test["group"], data.test["label"]
  train_counts = np.bincount(data.train["group"], minlength=len(data.group_names))
  test_counts = np.bincount(groups, minlength=len(data.group_names))
  accuracy = {name: [float((predictions[name][groups == g] == labels[groups == g]).mean())
                     for g in range(len(data.group_names))] for name in names}
  table = [{"group": group, "train_count": int(train_counts[g]), "test_count": int(test_counts[g]),
            "accuracy": {name: round(accuracy[name][g], 4) for name in names}}
           for g, group in enumerate(data.group_names)]
  spearman = {name: round(float(stats.spearmanr(train_counts, accuracy[name]).statistic), 3)
              for name in names}
  levers = {}
  for lever, (model, baseline) in _lever_pairs(names, config.model.name).items():
    paired = evaluate.paired_comparison(
        predictions[model], predictions[baseline], data.test,
        num_classes=len(data.class_names), num_groups=len(data.group_names), seed=config.seed,
        bootstrap_resamples=config.evaluation.bootstrap_resamples or 1000)
    levers[lever] = {"model": model, "baseline": baseline, **paired}
  return {"workdir": str(workdir), "seed": config.seed,
          "image_size": dict(config.data.options).get("image_size"),
          "groups": table, "spearman_accuracy_vs_train_count": spearman, "levers": levers}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", action="append", required=True,
                      help="a finished search workdir (repeat for several)")
  args = parser.parse_args(argv)
  print(json.dumps({"runs": [drivers(Path(w)) for w in args.workdir]}, indent=1))


if __name__ == "__main__":
  main()
