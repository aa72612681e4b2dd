"""How well do the supernet's scores rank candidates, against stand-alone training?

Run: python -m benchmarks.proxy_ranking --workdir=DIR   (one JSON object; progress on stderr)

The default search's setting (configs/default.py, Fashion-Tones): its supernet is read from
DIR/checkpoints/supernet when a finished search (or an earlier run of this script) left it
there, else trained there first; a DIR made with another model, supernet or data config is
refused. `--candidates` distinct candidates spread over the space (the dense and the largest
model, and evenly spaced picks in (params, MACs) order of 16 times as many seed-drawn
samples) are scored on the search split (validation) with the search's metrics and reward:

- shared_bn: the shared weights and the batch-norm statistics supernet training averaged over
  its sampled candidates;
- recalibrated_bn: the same weights, each candidate with its own batch-norm statistics from
  `search.bn_batches` training batches (`PopulationEvaluator(recalibration_images=...)`), as
  the search scores them; `bn_batches_sweep` repeats it for each of `--bn_batches`;
- proxy: each candidate's own copy tuned `--proxy_steps` steps (`ProxyTuner`, the objective
  of config.supernet, the key of the search's first cycle), then recalibrated and scored;
- standalone: each candidate cut out (`export.standalone`, initialised from its slice),
  trained with the config.train recipe (its objective and epochs) from two training seeds,
  and scored on the same examples.

Reported: `kendall_tau` (`scipy.stats.kendalltau`, tau-b) of shared_bn, recalibrated_bn and
proxy against the first stand-alone training, for accuracy, disparity and the reward, and the
noise `ceiling`: tau between the two stand-alone trainings (seeds differ only in training
order and gate noise). `ratio_to_ceiling` divides each by the ceiling. Also: the per-candidate
values, the settings and the seconds of each part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np
from scipy import stats

from benchmarks import common
from moenas_jax import export, models, population, proxy, reward, search_space, settings
from moenas_jax import train as train_lib
from moenas_jax.stages import data as data_stage
from moenas_jax.stages import search as search_stage

SCORED = ("accuracy", "disparity", "reward")


def spread_candidates(space: search_space.SearchSpace, key: jax.Array,
                      count: int) -> search_space.Arch:
  """`count` distinct candidates: dense, largest, and `count` − 2 evenly spaced in (params,
  MACs) order over 16·count samples."""
  samples = search_space.unstack(jax.tree.map(np.asarray,
                                              space.sample_population(key, 16 * count)))
  extremes = {space.smallest().key(), space.largest().key()}
  unique = sorted({arch.key(): arch for arch in samples if arch.key() not in extremes}.values(),
                  key=lambda a: (int(space.params(a)), int(space.macs(a)), a.key()))
  if len(unique) < count - 2:
    raise ValueError(f"only {len(unique)} distinct candidates in {16 * count} samples; ask "
                     f"for fewer than {count}")
  picks = np.linspace(0, len(unique) - 1, count - 2).round().astype(int)
  return search_space.stack([space.smallest(), *(unique[i] for i in picks), space.largest()])


def kendall_tau(x, y) -> float:
  return round(float(stats.kendalltau(x, y).statistic), 4)


def _standalone(supernet: common.Supernet, arch, seeds) -> list[dict[str, np.ndarray]]:
  """Search metrics of one candidate trained stand-alone once per training seed."""
  config, data = supernet.config, supernet.data
  graphdef, params, state = models.split(export.standalone(supernet.model, arch))
  objective = data_stage.objective(config, "train", data)
  trainer = train_lib.Trainer(graphdef, settings.train_settings(config),
                              len(data.train["label"]), objective)
  evaluator = population.PopulationEvaluator(graphdef, num_classes=len(data.class_names),
                                             num_groups=len(data.group_names),
                                             batch_size=config.data.eval_batch_size,
                                             lighting_set=settings.lighting_set(
                                                 config.search.lighting_severities))
  results = []
  for seed in seeds:
    trained_params, trained_state, _ = trainer.fit(params, state, data.train, seed=seed,
                                                   log=common.log)
    scores = evaluator.evaluate(trained_params, trained_state, None, data.search, data.held,
                                data.robust)  # the search's metrics, at P = 1
    results.append({name: value[0] for name, value in scores.items()})
  return results


def _stacked(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  return {name: np.stack([r[name] for r in results])
          for name in ("accuracy", "disparity", "robustness", "generalization_gap",
                       "worst_cell_accuracy")}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True,
                      help="where the supernet checkpoint is (or is trained and kept)")
  parser.add_argument("--candidates", type=int, default=12)
  parser.add_argument("--bn_batches", type=int, nargs="*", default=[2, 5, 20, 40],
                      help="more recalibration sizes to score (bn_batches_sweep)")
  parser.add_argument("--proxy_steps", type=int, default=20)
  parser.add_argument("--seed", type=int, default=0, help="of the candidates")
  args = parser.parse_args()
  begin = time.perf_counter()
  seconds = {}

  def lap(name: str, since: float) -> float:
    seconds[name] = round(time.perf_counter() - since, 1)
    return time.perf_counter()

  supernet = common.trained_supernet(args.workdir)
  config, data, space = supernet.config, supernet.data, supernet.space
  graphdef, params, state = supernet.graphdef, supernet.params, supernet.state
  archs = spread_candidates(space, jax.random.key(args.seed), args.candidates)
  common.log(f"{args.candidates} candidates, params {space.params(archs).tolist()}")
  clock = lap("data_and_supernet", begin)

  def scored(bn_batches: int, tuned: bool = False) -> dict[str, np.ndarray]:
    swept = config.copy_and_resolve_references()
    swept.search.bn_batches = bn_batches
    evaluator = search_stage.population_evaluator(swept, graphdef, data,
                                            per_candidate_weights=tuned)
    weights = (params, state)
    if tuned:
      tuner = proxy.ProxyTuner(graphdef, proxy.ProxySettings(
          steps=args.proxy_steps, batch_size=config.search.proxy_batch_size,
          learning_rate=config.search.proxy_learning_rate),
          data_stage.objective(config, "supernet", data))
      key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), 0)
      *weights, _ = tuner.tune(params, state, archs, data.train, key)
    return evaluator.evaluate(*weights, archs, data.search, data.held, data.robust)

  results = {"shared_bn": scored(0), "recalibrated_bn": scored(config.search.bn_batches)}
  clock = lap("supernet_scoring", clock)
  sweep = {n: scored(n) for n in args.bn_batches}
  clock = lap("bn_batches_sweep", clock)
  results["proxy"] = scored(config.search.bn_batches, tuned=True)
  clock = lap("proxy", clock)
  seeds = (config.seed, config.seed + 1)
  trained = []
  for i, arch in enumerate(search_space.unstack(archs)):
    common.log(f"standalone {i + 1}/{args.candidates}: {search_space.to_dict(arch)}")
    trained.append(_standalone(supernet, arch, seeds))
  results["standalone"] = _stacked([t[0] for t in trained])
  results["standalone_seed_2"] = _stacked([t[1] for t in trained])
  clock = lap("standalone", clock)

  spec = reward.spec_from_config(config.reward)

  def with_reward(scores):
    values = {name: np.asarray(scores[name]) for name in ("accuracy", "disparity")}
    values["reward"] = np.asarray(spec.reward({**scores, "params": space.params(archs),
                                               "macs": space.macs(archs)}))
    return values

  values = {name: with_reward(scores) for name, scores in results.items()}
  swept = {n: with_reward(scores) for n, scores in sweep.items()}

  def taus(name, reference="standalone", table=values):
    return {m: kendall_tau(table[name][m], values[reference][m]) for m in SCORED}

  kendall = {name: taus(name) for name in ("shared_bn", "recalibrated_bn", "proxy")}
  kendall["ceiling"] = taus("standalone_seed_2")
  ratio = {name: {m: round(kendall[name][m] / kendall["ceiling"][m], 3)
                  if kendall["ceiling"][m] else None for m in SCORED}
           for name in ("shared_bn", "recalibrated_bn", "proxy")}
  print(json.dumps({
      "kendall_tau": kendall,
      "ratio_to_ceiling": ratio,
      "bn_batches_sweep": {str(n): {"vs_standalone": taus(n, table=swept),
                                    "vs_recalibrated_bn": {
                                        m: kendall_tau(swept[n][m],
                                                       values["recalibrated_bn"][m])
                                        for m in SCORED}}
                           for n in swept},
      "values": {name: {m: np.round(v[m], 4).tolist() for m in SCORED}
                 for name, v in values.items()},
      "candidates": [search_space.to_dict(arch) for arch in search_space.unstack(archs)],
      "params": space.params(archs).tolist(), "macs": space.macs(archs).tolist(),
      "settings": {"config": "configs/default.py", "workdir": str(args.workdir),
                   "candidates": args.candidates, "seed": args.seed,
                   "bn_batches": config.search.bn_batches, "proxy_steps": args.proxy_steps,
                   "standalone_seeds": list(seeds),
                   "standalone_recipe": dataclasses.asdict(settings.train_settings(config)),
                   "train_objective": config.train.objective.to_dict(),
                   "search_split": config.data.search_split,
                   "images": len(data.search["label"]),
                   "robustness_images": len(data.robust["label"])},
      "seconds": {**seconds, "total": round(time.perf_counter() - begin, 1)},
      "device": str(jax.devices()[0]), "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
