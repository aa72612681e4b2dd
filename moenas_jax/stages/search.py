"""Stage 2: the controller's search, every batch scored by the population evaluator.

`run_controller` drives `config.search.controller` with `controllers.run` (resumable from
`checkpoints/search` and the candidate log); `candidate_scorer` turns a batch of P
architectures into validation metrics, sizes and rewards in one evaluator call.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from moenas_jax import controllers, metrics, population, proxy, search_space, settings
from moenas_jax.data import pipeline
from moenas_jax.progress import Progress
from moenas_jax.stages.data import Data, objective


def recalibration_images(config: Any, data: Data) -> np.ndarray | None:
  """`search.bn_batches` training batches [NB, B, H, W, C] (None at 0), from the seed."""
  if not config.search.bn_batches:
    return None
  batches = pipeline.sampled_batches(data.train, config.supernet.batch_size,
                                     config.search.bn_batches, [config.seed, 5])
  return np.stack([batch["image"] for batch in batches])


def population_evaluator(config: Any, graphdef: nnx.GraphDef, data: Data, *,
                         per_candidate_weights: bool = False) -> population.PopulationEvaluator:
  """The search's evaluator: its lighting set, chunks, mesh and batch-norm recalibration."""
  return population.PopulationEvaluator(
      graphdef, num_classes=len(data.class_names), num_groups=len(data.group_names),
      batch_size=config.data.eval_batch_size,
      lighting_set=settings.lighting_set(config.search.lighting_severities),
      mesh=population.make_mesh() if jax.device_count() > 1 else None,
      per_candidate_weights=per_candidate_weights, chunk_size=config.search.chunk_size or None,
      recalibration_images=recalibration_images(config, data),
      attack=settings.attack_settings(config, "search.pgd_steps"))


def candidate_scorer(config: Any, evaluator: population.PopulationEvaluator, params: Any,
                     state: Any, space: search_space.SearchSpace, data: Data, *,
                     tuner: proxy.ProxyTuner | None = None,
                     log: Callable[[str], None] = logging.info) -> controllers.Score:
  """The search's `score(archs, todo, cycle)`: validation metrics and reward of a batch
  (with `config.search.latency_table`, also each candidate's `latency_ms` from the table)."""
  spec = settings.reward_spec(config)
  table = settings.latency_table(config, space)
  proxy_key = jax.random.fold_in(jax.random.key(config.seed), 2)
  # One attack key for every cycle and candidate: scores stay comparable across cycles.
  attack_key = jax.random.fold_in(jax.random.key(config.seed), 7)

  def score(archs: search_space.Arch, todo: np.ndarray, cycle: int) -> list[dict]:
    weights = (params, state)
    if tuner is not None:
      *weights, logs = tuner.tune(params, state, archs, data.train,
                                  jax.random.fold_in(proxy_key, cycle))
      log(f"[search] cycle {cycle}: proxy loss {logs['loss'][0].mean():.3f} → "
          f"{logs['loss'][-1].mean():.3f}")
    scores = evaluator.evaluate(*weights, archs, data.search, data.held, data.robust,
                                attack_key=attack_key)
    scores["params"], scores["macs"] = space.params(archs), space.macs(archs)
    if table is not None:
      scores["latency_ms"] = table.latency(archs)
    rewards = np.asarray(spec.reward(scores), np.float64)
    return [{"metrics": metrics.to_python({k: v[i] for k, v in scores.items()}),
             "reward": float(rewards[i])} for i in todo]

  return score


def run_controller(config: Any, graphdef: nnx.GraphDef, params: Any, state: Any,
                   space: search_space.SearchSpace, data: Data, workdir: Path,
                   log: Callable[[str], None],
                   evaluator: population.PopulationEvaluator | None = None) -> list[dict]:
  """The search: `config.search.controller` driven by `controllers.run`, every batch scored
  by the population evaluator (`population_evaluator` unless given); returns the candidate
  records.

  With `search.proxy_steps` > 0, each cycle's candidates are scored on their own proxy
  fine-tuned weight copies (`proxy.ProxyTuner`, key `fold_in(fold_in(key(seed), 2), cycle)`).
  """
  cfg = config.search
  controller = controllers.make(cfg.controller, space, **settings.controller_options(config))
  tuner = proxy.ProxyTuner(graphdef, settings.proxy_settings(config),
                           objective(config, "supernet", data)) if cfg.proxy_steps else None
  if evaluator is None:
    evaluator = population_evaluator(config, graphdef, data,
                                     per_candidate_weights=tuner is not None)
  score = candidate_scorer(config, evaluator, params, state, space, data, tuner=tuner, log=log)
  cycles = cfg.candidates // cfg.batch_size
  return controllers.run(controller, space, score, cycles=cycles,
                         checkpoint_dir=workdir / "checkpoints" / "search",
                         log_path=workdir / "results" / "candidates.jsonl",
                         progress=Progress("search", cycles, log, start=None), log=log)
