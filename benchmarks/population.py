"""Scoring a population three ways: one vmapped call, a per-candidate loop, standalone models.

Run: python -m benchmarks.population   (prints one JSON object; progress on stderr)

The same supernet (by default the MobileViT-V2 of the default search, configs/default.py;
flags override it; weights from initialisation), the same clean evaluation images (the
Fashion-Tones validation split, 1000 images, or its first `--images`) and the same P
candidates, scored to the same per-candidate metrics by:

- vmap: `PopulationEvaluator.evaluate` (no lighting set): one jitted call per batch for all P,
  vmapped in chunks of `--chunk_size` candidates as the search does (0: all P in one vmap).
- loop: a Python loop over the candidates calling one jitted single-candidate function (the
  arch is traced, so it compiles once).
- standalone: per candidate, `export.standalone` builds a model with the candidate's own
  shapes and a fresh jitted function evaluates it; it compiles per candidate, and that time
  counts. Only `--standalone_candidates` of them run; its candidates/s is extrapolated
  (`standalone_measured_on`).

vmap and loop run twice, in turns, on two different populations of size P: `seconds` lists
both calls, `candidates_per_s` is the second (steady state), `candidates_per_s_with_compile`
the first. `compilations` counts the compilations of each evaluation function over every
candidate it scored (vmap and loop: 2P; standalone: `standalone_measured_on`);
`xla_compilations` counts every XLA compile in each approach's timed code (small eager ops
included). `useful_gflops` is 2 · sum over the candidates of macs(arch) · images / seconds of
the steady vmap call, against `peak_gflops`, the best of several jitted float32 matmuls.
`flops_per_candidate_image` is XLA's FLOP count (cost analysis of the lowered, unoptimized
programs; nothing extra compiles) per candidate and image: the loop's single-candidate forward,
and one vmap of that forward over all P (chunks do the same arithmetic), whose
candidate-independent layers count once. `flops_ratio_loop_over_vmap`, their ratio, is the
vmap/loop speed-up that sharing those layers gives at equal FLOP rates; the measured ratio
above it is what the vmapped arithmetic gains in speed (bigger, cache-friendlier operations).
`max_accuracy_difference` checks that the three agree (standalone layers have their own
Switch capacity, so may differ slightly). The supernet build (shared by vmap and loop) is
reported but not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import default
from moenas_jax import export, metrics, models, population, search_space
from moenas_jax.compilation import count_compilations
from moenas_jax.data import fashion_tones, pipeline
from moenas_jax.models import mobilevit

NUM_CLASSES, NUM_GROUPS = len(fashion_tones.CLASS_NAMES), len(fashion_tones.GROUP_NAMES)


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _counts_fn(forward: Callable) -> Callable:
  """jit of (weights, batch, totals) → totals + the batch's counts, for one candidate."""

  def candidate_counts(weights, batch, totals):
    counts = metrics.batch_counts(forward(weights, batch["image"]), batch["label"],
                                  batch["group"], batch["mask"], num_classes=NUM_CLASSES,
                                  num_groups=NUM_GROUPS)
    return totals + counts

  return jax.jit(candidate_counts)


def _score(counts_fn: Callable, summarize: Callable, weights,
           batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """One candidate's metrics, summed over the batches on the device, then pulled to the host."""
  totals = metrics.Counts.zeros(NUM_CLASSES, NUM_GROUPS)
  for batch in batches:
    totals = counts_fn(weights, batch, totals)
  return jax.tree.map(np.asarray, summarize(totals))


def _loop(params, state, candidates: Iterable[search_space.Arch], counts_fn, summarize, examples,
          batch_size: int) -> np.ndarray:
  """Accuracy [P] of the candidates, one jitted call per candidate and batch."""
  batches = list(pipeline.eval_batches(examples, batch_size))
  return np.array([_score(counts_fn, summarize, (params, state, arch), batches)["accuracy"]
                   for arch in candidates])


def _standalone(supernet, arch: search_space.Arch, summarize, examples,
                batch_size: int) -> tuple[float, float, float]:
  """(accuracy, seconds, of which export) of one candidate as its own model, jitted afresh."""
  start = time.perf_counter()
  graphdef, params, state = models.split(export.standalone(supernet, arch))
  exported = time.perf_counter() - start

  def forward(weights, pixels):
    return models.apply(graphdef, *weights, pixels)[0]

  batches = list(pipeline.eval_batches(examples, batch_size))
  accuracy = _score(_counts_fn(forward), summarize, (params, state), batches)["accuracy"]
  return float(accuracy), time.perf_counter() - start, exported


def _peak_gflops(size: int, repeats: int) -> float:
  """Best float32 GFLOP/s of a jitted [size, size] matmul over `repeats` timed runs."""
  a, b = jax.random.normal(jax.random.key(0), (2, size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  matmul(a, b).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best / 1e9


def _flops(fn: Callable, *args) -> float:
  """XLA's FLOP count of jit(fn)(*args), from the lowered program (nothing compiles)."""
  return float(jax.jit(fn).lower(*args).cost_analysis()["flops"])


def _device() -> str:
  """The accelerator's kind, or the CPU's model name and core count."""
  device = jax.devices()[0]
  if device.platform != "cpu":
    return f"{device.platform}: {device.device_kind}"
  model = platform.processor() or "unknown model"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as info:
      names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    model = names[0] if names else model
  return f"cpu: {model}, {os.cpu_count()} cores"


def _timed(fn: Callable, *args):
  """(result, seconds, compilations) of fn(*args), results ready."""
  with count_compilations() as seen:
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    seconds = time.perf_counter() - start
  return result, seconds, seen


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  search = default.get_config()
  parser.add_argument("--population", type=int, default=32)
  parser.add_argument("--images", type=int, default=0,
                      help="first images of the validation split; 0: all of them (1000)")
  parser.add_argument("--batch_size", type=int, default=search.data.eval_batch_size)
  parser.add_argument("--standalone_candidates", type=int, default=4)
  parser.add_argument("--chunk_size", type=int, default=search.search.chunk_size,
                      help="candidates vmapped at once (0: all)")
  parser.add_argument("--width_multiplier", type=float, default=search.model.width_multiplier)
  parser.add_argument("--depths", type=int, nargs=3, default=list(search.model.depths))
  parser.add_argument("--strides", type=int, nargs=6, default=list(search.model.strides))
  parser.add_argument("--max_experts", type=int, default=search.model.max_experts)
  parser.add_argument("--max_top_k", type=int, default=search.model.max_top_k)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--matmul_repeats", type=int, default=10)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  if not 1 <= args.standalone_candidates <= args.population:
    raise ValueError(f"--standalone_candidates={args.standalone_candidates} must be in "
                     f"1..{args.population} (--population)")
  begin = time.perf_counter()

  # --- Supernet, data, populations -----------------------------------------------------------
  config = {"num_classes": NUM_CLASSES, "image_size": (28, 28), "channels": 3,
            "width_multiplier": args.width_multiplier, "depths": tuple(args.depths),
            "strides": tuple(args.strides), "max_experts": args.max_experts,
            "max_top_k": args.max_top_k, "moe_settings": dict(search.model.moe_settings)}
  supernet = models.build(mobilevit.NAME, rngs=nnx.Rngs(args.seed), **config)
  graphdef, params, state = models.split(supernet)
  space = supernet.search_space()
  build_seconds = time.perf_counter() - begin
  _log(f"supernet built in {build_seconds:.1f} s: {space.num_layers} MoE layers")
  validation = fashion_tones.load("validation")
  images = args.images or len(validation["label"])
  if not 1 <= images <= len(validation["label"]):
    raise ValueError(f"--images={args.images} must be in 0..{len(validation['label'])} "
                     f"(the validation split's size; 0: all)")
  examples = {name: values[:images] for name, values in validation.items()}
  first_key, second_key = jax.random.split(jax.random.key(args.seed))
  populations = [jax.tree.map(np.asarray, space.sample_population(key, args.population))
                 for key in (first_key, second_key)]

  # --- (a) vmap and (b) loop, in turns: first population (compiles), then the second ----------
  evaluator = population.PopulationEvaluator(graphdef, num_classes=NUM_CLASSES,
                                             num_groups=NUM_GROUPS, batch_size=args.batch_size,
                                             lighting_set=(), chunk_size=args.chunk_size or None)

  def score_vmap(pop):
    return evaluator.evaluate(params, state, pop, examples)["accuracy"]

  def forward(weights, pixels):  # (b): one candidate, its arch traced
    candidate_params, candidate_state, arch = weights
    return models.apply(graphdef, candidate_params, candidate_state, pixels, arch)[0]

  counts_fn, summarize = _counts_fn(forward), jax.jit(metrics.summarize)

  def score_loop(pop):
    return _loop(params, state, search_space.unstack(pop), counts_fn, summarize, examples,
                 args.batch_size)

  approaches = {"vmap": (score_vmap, "population_counts"),
                "loop": (score_loop, "candidate_counts")}
  seconds = {name: [] for name in approaches}
  compilations = dict.fromkeys(approaches, 0)
  xla_compilations = dict.fromkeys(approaches, 0)
  accuracy = {}
  for stage, pop in zip(("with compile", "steady"), populations):
    for name, (run, fun_name) in approaches.items():
      accuracy[name], took, seen = _timed(run, pop)
      seconds[name].append(took)
      compilations[name] += seen.of(fun_name)
      xla_compilations[name] += seen.count
      _log(f"{name}: {took:.1f} s {stage}")

  # --- (c) standalone: a model with its own shapes and its own compile per candidate ---------
  standalone_accuracy, standalone_seconds, export_seconds = [], [], []
  with count_compilations() as seen:
    for arch in search_space.unstack(populations[1])[:args.standalone_candidates]:
      for values, value in zip((standalone_accuracy, standalone_seconds, export_seconds),
                               _standalone(supernet, arch, summarize, examples, args.batch_size)):
        values.append(value)
      _log(f"standalone candidate {len(standalone_seconds)}: {standalone_seconds[-1]:.1f} s "
           f"(export {export_seconds[-1]:.1f} s)")
  compilations["standalone"] = seen.of("candidate_counts")
  xla_compilations["standalone"] = seen.count
  measured = len(standalone_seconds)

  # --- Rates, work, peak -----------------------------------------------------------------------
  peak = _peak_gflops(args.matmul_size, args.matmul_repeats)
  size = args.population
  pixels = next(iter(pipeline.eval_batches(examples, args.batch_size)))["image"]
  first = search_space.unstack(populations[1])[0]
  flops = {"loop": _flops(forward, (params, state, first), pixels) / args.batch_size,
           "vmap": _flops(jax.vmap(lambda arch: forward((params, state, arch), pixels)),
                          populations[1]) / args.batch_size / size}
  per_s = {name: size / seconds[name][1] for name in ("vmap", "loop")}
  per_s["standalone"] = measured / sum(standalone_seconds)
  with_compile = {name: size / seconds[name][0] for name in ("vmap", "loop")}
  with_compile["standalone"] = per_s["standalone"]
  macs = space.macs(populations[1])
  useful = 2 * float(macs.sum()) * images / seconds["vmap"][1] / 1e9
  difference = {
      "loop": float(np.max(np.abs(accuracy["loop"] - accuracy["vmap"]))),
      "standalone": float(np.max(np.abs(np.array(standalone_accuracy)
                                        - accuracy["vmap"][:measured]))),
  }
  print(json.dumps({
      "candidates_per_s": {name: round(value, 4) for name, value in per_s.items()},
      "candidates_per_s_with_compile": {name: round(v, 4) for name, v in with_compile.items()},
      "ratios": {"vmap_over_loop": round(per_s["vmap"] / per_s["loop"], 2),
                 "vmap_over_standalone": round(per_s["vmap"] / per_s["standalone"], 2)},
      "compilations": compilations,
      "xla_compilations": xla_compilations,
      "seconds": {"vmap": [round(s, 2) for s in seconds["vmap"]],
                  "loop": [round(s, 2) for s in seconds["loop"]],
                  "standalone": [round(s, 2) for s in standalone_seconds],
                  "standalone_export": [round(s, 2) for s in export_seconds]},
      "standalone_measured_on": measured,
      "flops_per_candidate_image": {name: round(value) for name, value in flops.items()},
      "flops_ratio_loop_over_vmap": round(flops["loop"] / flops["vmap"], 3),
      "useful_gflops": round(useful, 2),
      "peak_gflops": round(peak, 2),
      "useful_over_peak": round(useful / peak, 3),
      "mean_macs_per_image": int(macs.mean()),
      "max_accuracy_difference": difference,
      "population": size, "images": images, "batch_size": args.batch_size,
      "chunk_size": args.chunk_size,
      "model": {"name": mobilevit.NAME, **config, "moe_layers": space.num_layers},
      "supernet_build_s": round(build_seconds, 1),
      "matmul_size": args.matmul_size,
      "device": _device(), "devices": jax.device_count(), "jax": jax.__version__,
      "seconds_total": round(time.perf_counter() - begin, 1),
  }))


if __name__ == "__main__":
  main()
