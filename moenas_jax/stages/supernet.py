"""Stage 1: the supernet of `config.model`, its shared weights trained (resumable)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from moenas_jax import checkpoint, loop, models, population, settings, supernet
from moenas_jax.data import pipeline
from moenas_jax.stages.data import Data, objective


def build_supernet(config: Any, data: Data) -> nnx.Module:
  height, width, channels = data.image_shape
  return models.build(config.model.name, rngs=nnx.Rngs(config.seed),
                      num_classes=len(data.class_names), image_size=(height, width),
                      channels=channels, **settings.model_options(config))


def train_supernet(config: Any, supernet_model: nnx.Module, data: Data, workdir: Path,
                   log: Callable[[str], None], *, name: str = "supernet",
                   steps: int | None = None) -> tuple[Any, Any]:
  """Trains the supernet's shared weights (resumes from checkpoints); returns (params, state).

  `steps` (default `supernet.steps`) steps; `loop.fit` checkpoints every
  `supernet.checkpoint_every` steps under `checkpoints/<name>`; a resumed run ends bit for
  bit where an uninterrupted one does (batch order from (seed, epoch), the step's key
  `fold_in(fold_in(key(seed), 1), step)`). A supernet with a frozen trunk
  (`stages.trunk`) trains its tail on `data`, the trunk's features.
  """
  cfg = config.supernet
  steps = cfg.steps if steps is None else steps
  graphdef, params, state = models.split(supernet_model)
  trainer = supernet.SupernetTrainer(
      graphdef, supernet_model.search_space(), archs_per_step=cfg.archs_per_step,
      optimizer=settings.supernet_optimizer(config, steps),
      mesh=population.make_mesh(data_parallel=jax.device_count())
      if jax.device_count() > 1 else None, objective=objective(config, "supernet", data),
      adversarial_settings=settings.adversarial_settings(config, "supernet"),
      frozen=supernet_model.frozen_names() if cfg.frozen_stages else ())
  base_key = jax.random.fold_in(jax.random.key(config.seed), 1)

  def step(carry, batch, t):
    *carry, logs = trainer.step(*carry, batch, jax.random.fold_in(base_key, t))
    return tuple(carry), logs

  with checkpoint.Checkpointer(workdir / "checkpoints" / name) as checkpoints:
    fitted = loop.fit(
        step, trainer.place((params, state, trainer.init(params))),
        batches=lambda epoch: pipeline.train_batches(data.train, cfg.batch_size, config.seed,
                                                     epoch),
        steps_per_epoch=len(data.train["label"]) // cfg.batch_size, total_steps=steps,
        checkpointer=checkpoints, checkpoint_every=cfg.checkpoint_every,
        run={"seed": config.seed}, name=name, log=log, log_every=config.log_every)
  params, state, _ = fitted.carry
  return params, state
