"""Training-step throughput of the project's models next to the same architectures in PyTorch.

Run: python -m benchmarks.train_throughput   (one JSON object; needs `pip install -e .[bench]`)

Per model, the project's jitted training step (`train.Trainer`: forward, cross-entropy,
gradients, clipped AdamW) and its PyTorch twin (`benchmarks/torch_twins.py`, equal parameter
count, checked; the same AdamW recipe, `torch.set_num_threads` = the CPU count) train on the
same random batch of 128. They run in alternating blocks of `--steps` steps, `--blocks` times
each, after a warm-up (the JAX compile is reported apart, `jax_first_step_s`); images/s is the
median block, `ratio` = JAX / PyTorch. `gflops_per_s` is XLA's FLOP count of the step
(cost analysis of the lowered program) over the JAX step time. Models: ResNet-20 at 32 px,
MobileNetV2 width 0.5 at 64 px (its stem stride follows the input: 2), the dense MobileViT-V2
of `configs/utkface_cpu.py` (32 px) and that config's supernet step (3 candidates a step,
sparse MoE routing; it has no PyTorch twin, so JAX alone: compare it with the dense step).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import utkface_cpu
from moenas_jax import costs, models, settings, supernet, train

BATCH = 128


def _batch(size: int) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  return {"image": jnp.asarray(rng.random((BATCH, size, size, 3), np.float32)),
          "label": jnp.asarray(rng.integers(0, 2, BATCH), jnp.int32),
          "group": jnp.zeros(BATCH, jnp.int32)}


def _jax_stepper(model: nnx.Module, size: int):
  """(step(n) that runs n training steps, first-step seconds, params, GFLOP per step)."""
  graphdef, params, state = models.split(model)
  trainer = train.Trainer(graphdef, train.TrainSettings(epochs=1, batch_size=BATCH), 10 * BATCH)
  carry = [params, state, trainer._init(params)]
  batch, key = _batch(size), jax.random.key(0)
  flops = trainer._step.lower(*carry, batch, key, 0).cost_analysis()["flops"] / 1e9
  count = costs.count_params(model)

  def step(n):
    for i in range(n):
      *carry[:], logs = trainer._step(*carry, batch, key, i)
    jax.block_until_ready(logs)

  start = time.perf_counter()
  step(1)
  return step, time.perf_counter() - start, count, flops


def _supernet_stepper(model: nnx.Module, size: int, archs_per_step: int):
  graphdef, params, state = models.split(model)
  trainer = supernet.SupernetTrainer(
      graphdef, model.search_space(), archs_per_step=archs_per_step,
      optimizer=supernet.OptimizerSettings(learning_rate=1e-3, weight_decay=0.05,
                                           warmup_steps=1, total_steps=1000))
  carry = [params, state, trainer.init(params)]
  batch = _batch(size)

  def step(n):
    for i in range(n):
      *carry[:], logs = trainer.step(*carry, batch, jax.random.key(i))
    jax.block_until_ready(logs)

  start = time.perf_counter()
  step(1)
  return step, time.perf_counter() - start


def _torch_stepper(twin, size: int):
  import torch
  torch.set_num_threads(os.cpu_count() or 1)
  optimizer = torch.optim.AdamW(twin.parameters(), lr=2e-3, weight_decay=0.05)
  batch = _batch(size)
  images = torch.from_numpy(np.asarray(batch["image"])).permute(0, 3, 1, 2).contiguous()
  labels = torch.from_numpy(np.asarray(batch["label"])).long()

  def step(n):
    for _ in range(n):
      optimizer.zero_grad()
      loss = torch.nn.functional.cross_entropy(twin(images), labels)
      loss.backward()
      torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
      optimizer.step()

  step(1)
  return step, sum(p.numel() for p in twin.parameters())


def _images_per_s(step, steps: int) -> float:
  start = time.perf_counter()
  step(steps)
  return BATCH * steps / (time.perf_counter() - start)


def _log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def _compare(name: str, model: nnx.Module, twin, size: int, steps: int, blocks: int) -> dict:
  jax_step, first, params, gflop = _jax_stepper(model, size)
  torch_step, torch_params = _torch_stepper(twin, size)
  if torch_params != params:
    raise AssertionError(f"{name}: PyTorch twin has {torch_params} parameters, JAX {params}")
  jax_rates, torch_rates = [], []
  for block in range(blocks):
    jax_rates.append(_images_per_s(jax_step, steps))
    torch_rates.append(_images_per_s(torch_step, steps))
    _log(f"[{name}] block {block}: jax {jax_rates[-1]:.1f}, torch {torch_rates[-1]:.1f} img/s")
  jax_rate, torch_rate = statistics.median(jax_rates), statistics.median(torch_rates)
  return {"image_size": size, "params": params, "jax_images_per_s": round(jax_rate, 1),
          "torch_images_per_s": round(torch_rate, 1), "ratio": round(jax_rate / torch_rate, 3),
          "jax_first_step_s": round(first, 1),
          "gflops_per_s": round(gflop * jax_rate / BATCH, 1)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3, help="training steps per timed block")
  parser.add_argument("--blocks", type=int, default=3, help="timed blocks per framework")
  args = parser.parse_args(argv)
  from benchmarks import torch_twins

  result = {"batch_size": BATCH, "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__}
  import torch
  result["torch"] = torch.__version__
  resnet = models.build("resnet", rngs=nnx.Rngs(0), num_classes=2, image_size=(32, 32),
                        depth=20)
  result["resnet20_32px"] = _compare("resnet20_32px", resnet, torch_twins.resnet(2, 20, 1), 32,
                                     args.steps, args.blocks)
  mobile = models.build("mobilenet_v2", rngs=nnx.Rngs(0), num_classes=2, image_size=(64, 64),
                        width_multiplier=0.5)
  result["mobilenet_v2_0.5_64px"] = _compare(
      "mobilenet_v2_0.5_64px", mobile,
      torch_twins.mobilenet_v2(2, 0.5, mobile.config["stem_stride"]), 64, args.steps,
      args.blocks)

  config = utkface_cpu.get_config()
  size = config.data.options["image_size"]
  model = models.build(config.model.name, rngs=nnx.Rngs(0), num_classes=2,
                       image_size=(size, size), channels=3, **settings.model_options(config))
  options = {key: value for key, value in settings.model_options(config).items()
             if key not in ("max_experts", "max_top_k", "moe_settings")}
  dense = models.build(f"{config.model.name}_dense", rngs=nnx.Rngs(0), num_classes=2,
                       image_size=(size, size), channels=3, **options)
  twin = torch_twins.mobilevit_v2_dense(2, size, options["width_multiplier"],
                                        tuple(options["depths"]), tuple(options["strides"]))
  result["utkface_cpu_dense"] = _compare("utkface_cpu_dense", dense, twin, size, args.steps,
                                         args.blocks)
  step, first = _supernet_stepper(model, size, config.supernet.archs_per_step)
  rates = [_images_per_s(step, args.steps) for _ in range(args.blocks)]
  result["utkface_cpu_supernet"] = {
      "image_size": size, "archs_per_step": config.supernet.archs_per_step,
      "jax_images_per_s": round(statistics.median(rates), 1),
      "jax_first_step_s": round(first, 1)}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  main()
