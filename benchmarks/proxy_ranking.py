"""Does proxy fine-tuning rank candidates more like stand-alone training than shared weights?

Run: python -m benchmarks.proxy_ranking --workdir=DIR   (one JSON object; progress on stderr)

The default search's setting (configs/default.py, Fashion-Tones): its supernet is read from
DIR/checkpoints/supernet when a finished search (or an earlier run of this script) left it
there, else trained there first (about 6 minutes on 2 CPU cores); a DIR made with another
model, supernet or data config is refused. `--candidates` distinct candidates spread over the
space (from 16 times as many seed-drawn samples sorted by (params, MACs), evenly spaced
picks) are scored on the search split (validation) with the search's metrics and reward:

- supernet: the shared weights (`PopulationEvaluator`), as the search scores them by default;
- proxy: each candidate's own copy tuned `--proxy_steps` steps (`ProxyTuner`, the key of the
  search's first cycle), then the same evaluator; one result per (steps, learning rate);
- standalone: each candidate cut out (`export.standalone`, initialised from its supernet slice)
  and trained `--epochs` epochs with the config.train recipe on the whole training split,
  then scored on the same examples (robustness on the same subset).

Reported: Kendall's tau-b of supernet vs standalone and of proxy vs standalone (and of proxy
vs supernet: how much tuning changes the ranking), for accuracy and for the reward; the
per-candidate values, the settings and the seconds of each part; and the noise to read them
against: the standard deviation of tau between unrelated rankings of that many candidates,
the standard error of one accuracy on the search split, the range of standalone accuracies.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from configs import default
from moenas_jax import (
  checkpoint,
  evaluate,
  export,
  metrics,
  models,
  population,
  proxy,
  reward,
  search,
  search_space,
  train,
)

# Sections of the config that the supernet checkpoint depends on.
_SUPERNET_KEYS = ("seed", "data", "model", "supernet")


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def kendall_tau(x, y) -> float:
  """Kendall's tau-b (pairs tied in x or in y count as in scipy.stats.kendalltau)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  i, j = np.triu_indices(len(x), k=1)
  dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
  untied = np.sqrt(np.count_nonzero(dx) * np.count_nonzero(dy))
  return float((dx * dy).sum() / untied) if untied else float("nan")


def spread_candidates(space: search_space.SearchSpace, key: jax.Array,
                      count: int) -> search_space.Arch:
  """`count` distinct candidates, evenly spaced in (params, MACs) order over 16·count samples."""
  samples = search_space.unstack(jax.tree.map(np.asarray,
                                              space.sample_population(key, 16 * count)))
  unique = sorted({arch.key(): arch for arch in samples}.values(),
                  key=lambda a: (int(space.params(a)), int(space.macs(a)), a.key()))
  if len(unique) < count:
    raise ValueError(f"only {len(unique)} distinct candidates in {16 * count} samples; ask "
                     f"for fewer than {count}")
  picks = np.linspace(0, len(unique) - 1, count).round().astype(int)
  return search_space.stack([unique[i] for i in picks])


def _standalone(config, supernet_model, arch, data, lighting_set, epochs: int) -> dict:
  """Search metrics of one candidate trained stand-alone for `epochs` epochs."""
  graphdef, params, state = models.split(export.standalone(supernet_model, arch))
  settings = dataclasses.replace(search._train_settings(config), epochs=epochs)
  params, state, _ = train.train(graphdef, params, state, data.train, settings=settings,
                                 seed=config.seed, log=_log)
  evaluator = evaluate.Evaluator(graphdef, num_classes=len(data.class_names),
                                 num_groups=len(data.group_names),
                                 batch_size=config.data.eval_batch_size,
                                 lighting_set=lighting_set)
  scores = {name: np.asarray(value) for name, value in
            metrics.summarize(evaluator.counts(params, state, data.search)).items()}
  train_accuracy = metrics.summarize(evaluator.counts(params, state, data.held))["accuracy"]
  scores["generalization_gap"] = np.asarray(metrics.generalization_gap(
      train_accuracy, scores["accuracy"]))
  scores["robustness"] = np.asarray(evaluator.evaluate(params, state, data.robust,
                                                       bootstrap_resamples=0)["robustness"])
  return scores


def _rounded(values) -> list[float]:
  return [round(float(v), 4) for v in values]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  config = default.get_config()
  parser.add_argument("--workdir", required=True,
                      help="where the supernet checkpoint is (or is trained and kept)")
  parser.add_argument("--candidates", type=int, default=8)
  parser.add_argument("--proxy_steps", type=int, nargs="+", default=[20])
  parser.add_argument("--proxy_learning_rates", type=float, nargs="+",
                      default=[config.search.proxy_learning_rate])
  parser.add_argument("--proxy_batch_size", type=int, default=config.search.proxy_batch_size)
  parser.add_argument("--epochs", type=int, default=1, help="of stand-alone training")
  parser.add_argument("--seed", type=int, default=0, help="of the candidates")
  args = parser.parse_args()
  begin = time.perf_counter()
  seconds = {}

  def lap(name: str, since: float) -> float:
    seconds[name] = round(time.perf_counter() - since, 1)
    return time.perf_counter()

  # --- Data and the supernet ------------------------------------------------------------------
  workdir = Path(args.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.check_config(workdir, config.to_dict(),
                          ignore=[key for key in config if key not in _SUPERNET_KEYS])
  data = search.load_data(config, workdir)
  supernet_model = search.build_supernet(config, data)
  params, state = search.train_supernet(config, supernet_model, data, workdir, _log)
  nnx.update(supernet_model, params, state)
  graphdef = models.split(supernet_model)[0]
  space = supernet_model.search_space()
  archs = spread_candidates(space, jax.random.key(args.seed), args.candidates)
  _log(f"{args.candidates} candidates, params {space.params(archs).tolist()}")
  clock = lap("data_and_supernet", begin)

  # --- (a) shared weights, (b) proxy fine-tuned copies ----------------------------------------
  lighting_set = search._lighting_set(config.search.lighting_severities)
  evaluator_settings = dict(num_classes=len(data.class_names),
                            num_groups=len(data.group_names),
                            batch_size=config.data.eval_batch_size, lighting_set=lighting_set)
  shared = population.PopulationEvaluator(graphdef, **evaluator_settings).evaluate(
      params, state, archs, data.search, data.held, data.robust)
  results = {"supernet": shared}
  clock = lap("supernet_scoring", clock)
  per_copy = population.PopulationEvaluator(graphdef, per_candidate_weights=True,
                                            **evaluator_settings)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 2), 0)
  for steps, learning_rate in itertools.product(args.proxy_steps, args.proxy_learning_rates):
    name = f"proxy_{steps}_steps_lr_{learning_rate:g}"
    settings = proxy.ProxySettings(steps=steps, batch_size=args.proxy_batch_size,
                                   learning_rate=learning_rate)
    tuned_params, tuned_state, logs = proxy.ProxyTuner(graphdef, settings).tune(
        params, state, archs, data.train, key)
    _log(f"{name}: training loss {logs['loss'][0].mean():.3f} → {logs['loss'][-1].mean():.3f}")
    results[name] = per_copy.evaluate(tuned_params, tuned_state, archs, data.search, data.held,
                                      data.robust)
    clock = lap(name, clock)

  # --- (c) stand-alone training ---------------------------------------------------------------
  standalone = []
  for i, arch in enumerate(search_space.unstack(archs)):
    _log(f"standalone {i + 1}/{args.candidates}: {search_space.to_dict(arch)}")
    standalone.append(_standalone(config, supernet_model, arch, data, lighting_set,
                                  args.epochs))
  results["standalone"] = {name: np.stack([s[name] for s in standalone])
                           for name in ("accuracy", "disparity", "robustness",
                                        "generalization_gap", "worst_cell_accuracy")}
  clock = lap("standalone", clock)

  # --- Rankings ---------------------------------------------------------------------------------
  rewards = {name: np.asarray(reward.reward(scores, space.params(archs), space.macs(archs),
                                            **search._reward_settings(config)), np.float64)
             for name, scores in results.items()}
  truth = results["standalone"]
  def taus(name: str, reference: str) -> dict[str, float]:
    return {"accuracy": round(kendall_tau(results[name]["accuracy"],
                                          results[reference]["accuracy"]), 4),
            "reward": round(kendall_tau(rewards[name], rewards[reference]), 4)}

  tuned = [name for name in results if name.startswith("proxy")]
  count, accuracy = args.candidates, float(np.mean(truth["accuracy"]))
  print(json.dumps({
      "kendall_tau_vs_standalone": {name: taus(name, "standalone")
                                    for name in ("supernet", *tuned)},
      "kendall_tau_vs_supernet": {name: taus(name, "supernet") for name in tuned},
      "noise": {
          "kendall_tau_null_sd": round(np.sqrt(2 * (2 * count + 5) / (9 * count * (count - 1))),
                                       4),
          "accuracy_standard_error": round(np.sqrt(accuracy * (1 - accuracy)
                                                   / len(data.search["label"])), 4),
          "standalone_accuracy_range": round(float(np.ptp(truth["accuracy"])), 4)},
      "accuracy": {name: _rounded(scores["accuracy"]) for name, scores in results.items()},
      "reward": {name: _rounded(values) for name, values in rewards.items()},
      "candidates": [search_space.to_dict(arch) for arch in search_space.unstack(archs)],
      "params": space.params(archs).tolist(), "macs": space.macs(archs).tolist(),
      "settings": {"config": "configs/default.py", "workdir": str(workdir),
                   "candidates": args.candidates, "seed": args.seed,
                   "proxy_steps": args.proxy_steps,
                   "proxy_learning_rates": args.proxy_learning_rates,
                   "proxy_batch_size": args.proxy_batch_size, "proxy_optimizer":
                   "SGD, momentum 0.9, cosine decay to 0, gradients clipped to norm 1",
                   "standalone_recipe": {**config.train.to_dict(), "epochs": args.epochs},
                   "search_split": config.data.search_split,
                   "images": len(data.search["label"]),
                   "robustness_images": len(data.robust["label"])},
      "seconds": {**seconds, "total": round(time.perf_counter() - begin, 1)},
      "device": str(jax.devices()[0]), "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
