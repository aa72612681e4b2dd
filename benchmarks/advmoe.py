"""Adversarial robustness of a dense CNN and a conv MoE: TRADES vs AdvMoE, over seeds.

Run: python -m benchmarks.advmoe [--datasets fashion_tones utkface fashion_mnist]
     [--seeds 0 1 2] [--workdir DIR] [--smoke]   (one JSON object; progress on stderr)

Per dataset and seed, with the same epochs, batches and optimizer (`train.Trainer`):
- dense `resnet` at full width, trained with TRADES;
- `resnet_moe` (`experts` experts of `expert_ratio` 0.5 of the dense width, top-1, its
  image router a ResNet-8 at a quarter of the width: 41% of the dense MACs at full width),
  trained with plain TRADES, and with AdvMoE's alternation (router and backbone steps);
- both models trained clean ("standard"), for the time of a standard epoch.
Each is tested clean and under PGD-10 (steps of ε/4 within ε, a random start, the router
attacked too: the whole model end to end): accuracy, per-group accuracy and disparity, and
for the MoE `expert_share`: per group, the share of its clean test images the router sends to
each expert (a router that splits by group leaves each group's pathway its group's training
data only). Every run trains under `--objective` (`erm`, the default, or `group_balanced` /
`group_dro`, the search's fairness objectives, with the training split's group counts).
ε = 8/255 (steps of 2/255), 0.1 on Fashion-MNIST (steps of 0.025). The training attack is
AdvMoE's: PGD-2 of 5/255 within 8/255 (on Fashion-MNIST 2 steps of 0.0625 within 0.1).

Datasets: `fashion_tones` (embedded), `utkface` (gender by race at 32 px, read from
--utkface_dir through the data catalog, prepared once in DIR/data), `fashion_mnist` (the
Debian package dataset-fashion-mnist, one group: no disparity).

JSON: `objective`, `results` (one row per dataset, model, training, seed), `summary`: per dataset the
means over seeds per (model, training), the paired differences per seed of advmoe − dense
TRADES and advmoe − TRADES MoE with 95% t intervals over seeds (None for one seed), and the
seconds per epoch of each training (the epochs after the first: no compile) with their ratio
to standard training.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from benchmarks import common
from configs import default
from moenas_jax import adversarial, evaluate, models, objectives, train
from moenas_jax.stages import data as data_stage

RUNS = (("dense", "standard"), ("moe", "standard"), ("dense", "trades"), ("moe", "trades"),
        ("moe", "advmoe"))
METRICS = ("clean_accuracy", "robust_accuracy", "disparity", "robust_disparity",
           "robust_worst_group_accuracy")
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
EPSILON = {"fashion_mnist": 0.1}  # else 8/255


@dataclasses.dataclass(frozen=True)
class Sizes:
  train_size: int = 2000
  eval_size: int = 500
  epochs: int = 3
  batch_size: int = 64
  depth: int = 8
  width_multiplier: float = 1.0
  experts: int = 2
  eval_steps: int = 10


SMOKE = Sizes(train_size=64, eval_size=32, epochs=2, batch_size=32, width_multiplier=0.25,
              eval_steps=2)


def _fashion_mnist(sizes: Sizes, seed: int) -> data_stage.Data:
  def read(prefix):
    with gzip.open(FASHION_MNIST / f"{prefix}-images-idx3-ubyte.gz") as file:
      images = np.frombuffer(file.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(FASHION_MNIST / f"{prefix}-labels-idx1-ubyte.gz") as file:
      labels = np.frombuffer(file.read(), np.uint8, offset=8).astype(np.int32)
    rng = np.random.default_rng(seed)
    size = sizes.train_size if prefix == "train" else sizes.eval_size
    keep = rng.permutation(len(labels))[:size]
    return {"image": images[keep], "label": labels[keep],
            "group": np.zeros(len(keep), np.int32)}

  train_split, test = read("train"), read("t10k")
  return data_stage.Data(train=train_split, held=test, search=test, test=test, robust=test,
                         class_names=[str(n) for n in range(10)], group_names=["all"],
                         image_shape=(28, 28, 1))


def load(dataset: str, sizes: Sizes, seed: int, workdir: Path,
         utkface_dir: str) -> data_stage.Data:
  """The dataset's training subset and test subset (`sizes`), from `seed`."""
  if dataset == "fashion_mnist":
    if not FASHION_MNIST.is_dir():
      raise FileNotFoundError(f"{FASHION_MNIST} is missing: apt-get install "
                              f"dataset-fashion-mnist, or leave fashion_mnist out of --datasets")
    return _fashion_mnist(sizes, seed)
  config = default.get_config()
  config.seed = seed
  config.data.update(train_size=sizes.train_size, eval_size=sizes.eval_size,
                     held_train_size=min(250, sizes.train_size))
  if dataset == "utkface":
    config.data.update(name="utkface", manual_dir=utkface_dir)
    config.data.options = {"task": "gender", "sensitive": "race", "image_size": 32}
  with contextlib.redirect_stdout(sys.stderr):  # dataset preparation prints progress
    return data_stage.load_data(config, workdir)


def build(kind: str, data: data_stage.Data, sizes: Sizes, seed: int) -> nnx.Module:
  height, width, channels = data.image_shape
  options = dict(num_classes=len(data.class_names), image_size=(height, width),
                 channels=channels, depth=sizes.depth, width_multiplier=sizes.width_multiplier)
  if kind == "moe":  # a router of a quarter of the width: MoE MACs under half the dense ones
    options.update(max_experts=sizes.experts, max_top_k=1, expert_ratio=0.5,
                   router_width_multiplier=sizes.width_multiplier / 4)
  return models.build("resnet" if kind == "dense" else "resnet_moe", rngs=nnx.Rngs(seed),
                      **options)


def router_choices(graphdef: nnx.GraphDef, params: nnx.State, state: nnx.State,
                   images: np.ndarray, batch_size: int = 250) -> np.ndarray:
  """The expert the router picks for each image [n] (clean, evaluation mode)."""
  @jax.jit
  def choices(batch):
    _, aux = nnx.merge(graphdef, params, state)(batch.astype(np.float32) / 255.0)
    return aux["router_logits"].argmax(-1)

  return np.concatenate([np.asarray(choices(images[start:start + batch_size]))
                         for start in range(0, len(images), batch_size)])


def expert_share(chosen: np.ndarray, groups: np.ndarray, num_groups: int,
                 num_experts: int) -> list[list[float | None]]:
  """Per group [G], the share of its images routed to each expert [E] (None: no images)."""
  counts = np.zeros((num_groups, num_experts))
  np.add.at(counts, (groups, chosen), 1)
  totals = counts.sum(1, keepdims=True)
  return [[float(v) for v in row / total] if total[0] else [None] * num_experts
          for row, total in zip(counts, totals)]


def run(dataset: str, kind: str, training: str, seed: int, data: data_stage.Data,
        sizes: Sizes, compiled: dict, objective: str = "erm") -> dict:
  """One row: trains the model (timing each epoch) and tests it clean and under PGD.

  `compiled`: the dataset's trainers and evaluators, shared by its seeds (one compile each).
  """
  epsilon = EPSILON.get(dataset, 8 / 255)
  model = build(kind, data, sizes, seed)
  graphdef, params, state = models.split(model)
  if (kind, training) not in compiled:
    method = {"standard": "none"}.get(training, training)
    settings = train.TrainSettings(
        epochs=sizes.epochs, batch_size=sizes.batch_size, learning_rate=2e-3,
        adversarial=adversarial.AdversarialSettings(method, epsilon=epsilon,
                                                    step_size=epsilon * 5 / 8, steps=2))
    compiled[kind, training] = train.Trainer(
        graphdef, settings, len(data.train["label"]),
        objectives.Objective.from_examples(objectives.ObjectiveSettings(objective), data.train,
                                           len(data.class_names), data.group_names))
  if kind not in compiled:
    compiled[kind] = evaluate.Evaluator(
        graphdef, num_classes=len(data.class_names), num_groups=len(data.group_names),
        batch_size=min(250, len(data.test["label"])), lighting_set=(),
        attack=adversarial.AttackSettings(epsilon, epsilon / 4, sizes.eval_steps))
  ends = []

  def log(line):
    common.log(line)
    if " epoch " in line:
      ends.append(time.perf_counter())

  begin = time.perf_counter()
  params, state, history = compiled[kind, training].fit(
      params, state, data.train, seed=seed, log=log, name=f"{dataset}/{kind}/{training}")
  seconds = time.perf_counter() - begin
  result = compiled[kind].evaluate(params, state, data.test, bootstrap_resamples=0, seed=seed)
  shares = (expert_share(router_choices(graphdef, params, state, data.test["image"]),
                         data.test["group"], len(data.group_names), sizes.experts)
            if kind == "moe" else None)
  return {
      "dataset": dataset, "model": kind, "training": training, "seed": seed,
      "clean_accuracy": result["accuracy"], "robust_accuracy": result["adversarial_accuracy"],
      "group_names": list(data.group_names), "group_accuracy": result["group_accuracy"],
      "robust_group_accuracy": result["adversarial_group_accuracy"],
      "disparity": result["disparity"], "robust_disparity": result["adversarial_disparity"],
      "robust_worst_group_accuracy": result["adversarial_worst_group_accuracy"],
      "expert_share": shares, **evaluate.model_costs(model), "epsilon": epsilon,
      "seconds_per_epoch": float(np.mean(np.diff(ends))) if len(ends) > 1 else seconds,
      "train_seconds": round(seconds, 1), "final_loss": history[-1]["loss"]}


def _mean(values: list) -> float | None:
  finite = [value for value in values if value is not None]
  return float(np.mean(finite)) if finite else None


def summarize(rows: list[dict]) -> dict:
  """Means over seeds, paired differences with t intervals, seconds per epoch."""
  summary = {}
  for dataset in dict.fromkeys(row["dataset"] for row in rows):
    of = {(r["model"], r["training"], r["seed"]): r for r in rows if r["dataset"] == dataset}
    seeds = sorted({seed for _, _, seed in of})
    runs = sorted({(model, training) for model, training, _ in of})
    means = {f"{model}/{training}": {
        name: _mean([of[model, training, s][name] for s in seeds])
        for name in (*METRICS, "macs", "seconds_per_epoch")} for model, training in runs}
    paired = {}
    for label, baseline in (("advmoe_minus_dense", ("dense", "trades")),
                            ("advmoe_minus_trades_moe", ("moe", "trades"))):
      if ("moe", "advmoe") in runs and baseline in runs:
        paired[label] = {}
        for name in METRICS:
          pairs = [(of["moe", "advmoe", s][name], of[(*baseline, s)][name]) for s in seeds]
          if None not in (value for pair in pairs for value in pair):
            paired[label][name] = common.seed_interval([found - base for found, base in pairs])
    timing = {}
    for model in ("dense", "moe"):
      if (model, "standard") in runs:
        standard = means[f"{model}/standard"]["seconds_per_epoch"]
        timing[model] = {training: {"seconds_per_epoch": means[f"{model}/{training}"][
            "seconds_per_epoch"], "vs_standard": means[f"{model}/{training}"][
            "seconds_per_epoch"] / standard} for m, training in runs if m == model}
    summary[dataset] = {"means": means, "paired": paired, "seconds_per_epoch": timing}
  return summary


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--datasets", nargs="+", default=["fashion_tones"],
                      choices=["fashion_tones", "utkface", "fashion_mnist"])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--workdir", default="runs/advmoe_benchmark")
  parser.add_argument("--utkface_dir", default="/work/shared/datasets/utkface")
  parser.add_argument("--runs", nargs="+", default=[f"{m}:{t}" for m, t in RUNS],
                      help="model:training pairs, e.g. dense:trades moe:advmoe")
  parser.add_argument("--objective", default="erm", choices=objectives.NAMES,
                      help="the training objective of every run")
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (a test's)")
  for field in dataclasses.fields(Sizes):
    parser.add_argument(f"--{field.name}", type=int if field.type == "int" else float)
  args = parser.parse_args()
  base = SMOKE if args.smoke else Sizes()
  sizes = dataclasses.replace(base, **{field.name: getattr(args, field.name)
                                       for field in dataclasses.fields(Sizes)
                                       if getattr(args, field.name) is not None})
  runs = [tuple(pair.split(":")) for pair in args.runs]
  begin, rows = time.perf_counter(), []
  for dataset in args.datasets:
    compiled = {}
    for seed in args.seeds:
      data = load(dataset, sizes, seed, Path(args.workdir), args.utkface_dir)
      for kind, training in runs:
        common.log(f"[advmoe] {dataset} seed {seed}: {kind} {training}")
        rows.append(run(dataset, kind, training, seed, data, sizes, compiled, args.objective))
  print(json.dumps({"sizes": dataclasses.asdict(sizes), "seeds": args.seeds,
                    "objective": args.objective,
                    "results": rows, "summary": summarize(rows),
                    "seconds": round(time.perf_counter() - begin, 1)}))


if __name__ == "__main__":
  main()
