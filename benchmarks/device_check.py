"""The parts of `benchmarks/device_check.sh` that are Python: the environment, training
throughput, and the merge of every part's result into one JSON object.

    python -m benchmarks.device_check env                  # jax, backend, devices (JSON)
    python -m benchmarks.device_check train --config default [--steps 20 --blocks 3]
    python -m benchmarks.device_check merge DIR            # DIR: the script's part files

`train` measures, on random data of the config's shapes (images, classes, groups; batches on
the device, so no input pipeline), the two training loops of a search with `--config`'s model
and recipe: the supernet step (`supernet.SupernetTrainer`: `supernet.archs_per_step`
candidates a step, `supernet.batch_size`, the supernet objective) and the final-training step
(`train.Trainer` on `export.standalone` of the supernet's largest candidate: `train.batch_size`,
the final objective). Per loop: the first step's seconds (compile included), one more warm-up
step, then `--blocks` timed blocks of `--steps` steps each, every block ended by
`block_until_ready`; steps/s is the median block, images/s = steps/s · batch size.

`merge` reads nothing but the standard library, so it reports even when jax fails to import.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

CONFIGS = ("default", "utkface", "utkface_cpu", "smoke")
PACKAGES = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "libtpu", "flax", "optax", "numpy")


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


# --- env ----------------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
  """jax's version, backend and devices; installed package versions; the host."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  import jax
  devices = jax.devices()
  kinds: dict[str, int] = {}
  for device in devices:
    kinds[device.device_kind] = kinds.get(device.device_kind, 0) + 1
  memory = None
  try:
    stats = devices[0].memory_stats() or {}
    memory = round(stats["bytes_limit"] / 2**30, 1) if "bytes_limit" in stats else None
  except Exception:  # noqa: BLE001 - not every backend has memory stats
    pass
  backend = jax.default_backend()
  return {"jax": jax.__version__, "backend": backend, "accelerator": backend != "cpu",
          "device_count": len(devices), "device_kinds": kinds,
          "device_memory_limit_gib": memory, "packages": versions,
          "python": platform.python_version(), "host": platform.node(),
          "cpu_count": os.cpu_count(),
          "env": {name: os.environ[name] for name in
                  ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_PREALLOCATE",
                   "XLA_PYTHON_CLIENT_MEM_FRACTION", "CUDA_VISIBLE_DEVICES")
                  if name in os.environ}}


# --- train --------------------------------------------------------------------------------------

def _shapes(config: Any) -> tuple[int, int, list[str], list[str]]:
  """(image size, channels, class names, group names) of the config's dataset."""
  if config.data.name == "fashion_tones":
    from moenas_jax.data import fashion_tones
    return 28, 3, list(fashion_tones.CLASS_NAMES), list(fashion_tones.GROUP_NAMES)
  if config.data.name == "utkface":
    from moenas_jax.data import utkface
    options = dict(config.data.options)
    return (options.get("image_size", 64), 3, list(utkface.NAMES[options.get("task", "gender")]),
            list(utkface.NAMES[options.get("sensitive", "race")]))
  raise ValueError(f"no random-data shapes for dataset {config.data.name!r}")


def _rate(step, steps: int, blocks: int) -> tuple[float, list[float]]:
  """(median steps/s, every block's steps/s) of `blocks` blocks of `steps` steps."""
  rates = []
  for _ in range(blocks):
    start = time.perf_counter()
    step(steps)
    rates.append(steps / (time.perf_counter() - start))
  return statistics.median(rates), rates


def training(name: str, steps: int, blocks: int) -> dict[str, Any]:
  import importlib

  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from moenas_jax import costs, export, models, objectives, settings, supernet, train

  config = importlib.import_module(f"configs.{name}").get_config()
  size, channels, class_names, group_names = _shapes(config)
  rng = np.random.default_rng(0)
  count = 4096  # random examples: the objectives' unit counts and the schedule's length
  examples = {"label": rng.integers(0, len(class_names), count).astype(np.int32),
              "group": rng.integers(0, len(group_names), count).astype(np.int32)}

  def batch(batch_size: int) -> dict[str, jax.Array]:
    return {"image": jnp.asarray(rng.random((batch_size, size, size, channels), np.float32)),
            "label": jnp.asarray(examples["label"][:batch_size]),
            "group": jnp.asarray(examples["group"][:batch_size])}

  def objective(section: str) -> objectives.Objective:
    return objectives.Objective.from_examples(settings.objective_settings(config, section),
                                              examples, len(class_names), group_names,
                                              class_names)

  def measure(run, batch_size: int) -> dict[str, Any]:
    start = time.perf_counter()
    run(1)
    first = time.perf_counter() - start
    run(1)
    per_s, rates = _rate(run, steps, blocks)
    return {"batch_size": batch_size, "steps_per_s": round(per_s, 2),
            "images_per_s": round(per_s * batch_size, 1),
            "blocks_steps_per_s": [round(rate, 2) for rate in rates],
            "first_step_s": round(first, 2)}

  begin = time.perf_counter()
  model = models.build(config.model.name, rngs=nnx.Rngs(0), num_classes=len(class_names),
                       image_size=(size, size), channels=channels,
                       **settings.model_options(config))
  space = model.search_space()
  # Cut out, and copied, before the supernet step runs: that step donates (deletes) the
  # supernet's arrays, which the candidate shares where it keeps a whole weight.
  candidate = export.standalone(model, space.largest())
  final_graphdef, final_params, final_state = models.split(candidate)
  final_params, final_state = jax.tree.map(jnp.copy, (final_params, final_state))
  result: dict[str, Any] = {"config": f"configs/{name}.py", "image_size": size,
                            "num_classes": len(class_names), "num_groups": len(group_names),
                            "moe_layers": space.num_layers, "steps": steps, "blocks": blocks}

  # The supernet step, as stages/supernet.py builds it (one device: no mesh).
  graphdef, params, state = models.split(model)
  cfg = config.supernet
  trainer = supernet.SupernetTrainer(graphdef, space, archs_per_step=cfg.archs_per_step,
                                     optimizer=settings.supernet_optimizer(config),
                                     objective=objective("supernet"))
  carry = [params, state, trainer.init(params)]
  supernet_batch, calls = batch(cfg.batch_size), [0]

  def supernet_steps(n: int) -> None:
    for _ in range(n):
      *carry[:], logs = trainer.step(*carry, supernet_batch, jax.random.key(calls[0]))
      calls[0] += 1
    jax.block_until_ready((carry, logs))

  _log(f"[train {name}] supernet step: {cfg.archs_per_step} candidates, batch {cfg.batch_size}")
  result["supernet"] = {"archs_per_step": cfg.archs_per_step,
                        "objective": cfg.objective.name,
                        **measure(supernet_steps, cfg.batch_size)}
  _log(f"[train {name}] supernet: {result['supernet']}")
  del carry[:]

  # The final-training step (train.Trainer) of the supernet's largest candidate.
  final = train.Trainer(final_graphdef, settings.train_settings(config), count,
                        objective("train"))
  carry = [final_params, final_state, final._init(final_params)]
  final_batch, key = batch(config.train.batch_size), jax.random.key(0)

  def final_steps(n: int) -> None:
    for _ in range(n):
      *carry[:], logs = final._step(*carry, final_batch, key, calls[0])
      calls[0] += 1
    jax.block_until_ready((carry, logs))

  _log(f"[train {name}] final-training step: largest candidate, batch "
       f"{config.train.batch_size}")
  result["final_training"] = {"model": "largest candidate (export.standalone)",
                              "params": costs.count_params(candidate),
                              "objective": config.train.objective.name,
                              **measure(final_steps, config.train.batch_size)}
  _log(f"[train {name}] final training: {result['final_training']}")
  result["seconds_total"] = round(time.perf_counter() - begin, 1)
  return result


# --- merge --------------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
  return path.read_text().strip() if path.exists() else None


def _error(directory: Path, name: str, rc: int | None, limit: str | None) -> str:
  tail = (_read(directory / f"{name}.err") or "").splitlines()[-4:]
  why = (f"timed out after {limit} s" if rc in (124, 137) else
         f"exit status {rc}" if rc else "no JSON on stdout")
  return why + (": " + " | ".join(line.strip() for line in tail) if tail else "")


def _part(directory: Path, name: str) -> tuple[dict[str, Any], float | None]:
  """(result, seconds) of one part from its files: NAME.out (its stdout, JSON), NAME.rc,
  NAME.start / NAME.end (epoch seconds), NAME.limit, NAME.err, NAME.skipped."""
  skipped = _read(directory / f"{name}.skipped")
  if skipped is not None:
    return {"skipped": skipped}, None
  rc_text = _read(directory / f"{name}.rc")
  if rc_text is None:
    return {"error": "did not run"}, None
  rc, limit = int(rc_text), _read(directory / f"{name}.limit")
  start, end = _read(directory / f"{name}.start"), _read(directory / f"{name}.end")
  seconds = round(float(end) - float(start), 1) if start and end else None
  if name == "smoke":
    return _smoke(directory, rc, limit, seconds), seconds
  result = None
  if rc == 0:
    text = _read(directory / f"{name}.out") or ""
    lines = [line for line in text.splitlines() if line.strip()]
    for candidate in (text, lines[-1] if lines else ""):  # the whole stdout, or its last line
      try:
        result = json.loads(candidate)
        break
      except json.JSONDecodeError:
        continue
  if not isinstance(result, dict):
    result = {"error": _error(directory, name, rc, limit)}
  result["part_limit_s"] = int(limit) if limit else None
  return result, seconds


def _smoke(directory: Path, rc: int, limit: str | None, seconds: float | None) -> dict:
  result: dict[str, Any] = {
      "command": _read(directory / "smoke.command"),
      "compilation_cache": "off (--compilation_cache_dir=): every function compiles",
      "wall_s": seconds, "part_limit_s": int(limit) if limit else None}
  summary_path = directory / "smoke_workdir" / "results" / "summary.json"
  if rc != 0 or not summary_path.exists():
    result["error"] = _error(directory, "smoke", rc, limit)
    return result
  summary = json.loads(summary_path.read_text())
  timing = summary.get("timing") or {}
  result["timing"] = timing
  result["stages_s"] = round(sum(timing.values()), 1)
  result["compilations"] = summary.get("compilations")
  trained = (summary.get("final") or {}).get("trained") or {}
  result["found_model_test"] = {key: round(trained[key], 4) for key in ("accuracy", "disparity")
                                if key in trained}
  return result


def _headline(population: dict, training: dict, smoke: dict) -> dict[str, Any]:
  """The figures for the README, in one place."""
  out: dict[str, Any] = {}
  for key, result in population.items():
    if "candidates_per_s" in result:
      out[key] = {"candidates_per_s": result["candidates_per_s"], **result["ratios"]}
  for key, result in training.items():
    for loop in ("supernet", "final_training"):
      if loop in result:
        out[f"{key}_{loop}"] = {name: result[loop][name]
                                for name in ("steps_per_s", "images_per_s", "first_step_s")}
  if "wall_s" in smoke and "error" not in smoke:
    out["smoke_search_wall_s"] = smoke["wall_s"]
  return out


def merge(directory: Path) -> dict[str, Any]:
  names = (_read(directory / "parts") or "").split()
  parts, seconds = {}, {}
  for name in names:
    parts[name], seconds[name] = _part(directory, name)
  population = {name.replace("population_", "P"): parts[name] for name in names
                if name.startswith("population_")}
  training = {name.replace("training_", ""): parts[name] for name in names
              if name.startswith("training_")}
  smoke = parts.get("smoke", {"skipped": "not in DEVICE_CHECK_PARTS (quick mode leaves it out)"})
  env = parts.get("env", {})
  quick = _read(directory / "quick") == "1"
  result: dict[str, Any] = {
      "device_check": "benchmarks/device_check.sh",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": quick,
      "commit": _read(directory / "commit") or None,
      "jax": env.get("jax"), "backend": env.get("backend"),
      "device_count": env.get("device_count"), "device_kinds": env.get("device_kinds"),
  }
  if env.get("backend") == "cpu" and not quick:
    result["warning"] = "no accelerator found: jax's backend is cpu"
  if "error" in env:
    result["warning"] = f"jax did not start: {env['error']}"
  result.update({
      "headline": _headline(population, training, smoke),
      "env": env, "population": population, "training": training, "smoke_search": smoke,
      "part_seconds": seconds,
      "budget_s": int(_read(directory / "budget") or 0) or None,
  })
  start, end = _read(directory / "begin"), _read(directory / "finish")
  result["total_seconds"] = round(float(end) - float(start), 1) if start and end else None
  return result


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest="command", required=True)
  commands.add_parser("env", help="jax's version, backend and devices")
  trainer = commands.add_parser("train", help="supernet and final-training steps/s")
  trainer.add_argument("--config", choices=CONFIGS, default="default")
  trainer.add_argument("--steps", type=int, default=20, help="steps per timed block")
  trainer.add_argument("--blocks", type=int, default=3, help="timed blocks per loop")
  merger = commands.add_parser("merge", help="every part's result as one JSON object")
  merger.add_argument("directory", type=Path)
  args = parser.parse_args(argv)
  if args.command == "env":
    print(json.dumps(environment()))
  elif args.command == "train":
    print(json.dumps(training(args.config, args.steps, args.blocks)))
  else:
    print(json.dumps(merge(args.directory)))  # one line: short enough for any log's tail


if __name__ == "__main__":
  main()
