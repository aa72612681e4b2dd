"""Stage 1: the supernet of `config.model`, its shared weights trained (resumable)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from moenas_jax import checkpoint, models, population, settings, supernet
from moenas_jax.data import pipeline
from moenas_jax.progress import Progress
from moenas_jax.stages.data import Data, objective


def build_supernet(config: Any, data: Data) -> nnx.Module:
  height, width, channels = data.image_shape
  return models.build(config.model.name, rngs=nnx.Rngs(config.seed),
                      num_classes=len(data.class_names), image_size=(height, width),
                      channels=channels, **settings.model_options(config))


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), tree)


def train_supernet(config: Any, supernet_model: nnx.Module, data: Data, workdir: Path,
                   log: Callable[[str], None]) -> tuple[Any, Any]:
  """Trains the supernet's shared weights (resumes from checkpoints); returns (params, state).

  Checkpoints every `supernet.checkpoint_every` steps under `checkpoints/supernet`; a resumed
  run skips the batches of the interrupted epoch it had done, so it ends bit for bit where an
  uninterrupted one does (batch order from (seed, epoch), noise key from (seed, step)).
  """
  cfg = config.supernet
  graphdef, params, state = models.split(supernet_model)
  trainer = supernet.SupernetTrainer(
      graphdef, supernet_model.search_space(), archs_per_step=cfg.archs_per_step,
      optimizer=settings.supernet_optimizer(config),
      mesh=population.make_mesh(data_parallel=jax.device_count())
      if jax.device_count() > 1 else None, objective=objective(config, "supernet", data))
  tree = {"params": params, "state": state, "opt_state": trainer.init(params)}
  with checkpoint.Checkpointer(workdir / "checkpoints" / "supernet") as checkpoints:
    step = checkpoints.latest_step() or 0
    if step:
      tree, _ = checkpoints.restore(step, like=_abstract(tree))
      log(f"[supernet] resumed at step {step}/{cfg.steps}")
    if step >= cfg.steps:
      return tree["params"], tree["state"]
    per_epoch = len(data.train["label"]) // cfg.batch_size
    base_key = jax.random.fold_in(jax.random.key(config.seed), 1)
    progress = Progress("supernet", cfg.steps, log, start=step)
    params, state, opt_state = tree["params"], tree["state"], tree["opt_state"]
    epoch, skip = divmod(step, per_epoch)
    while step < cfg.steps:
      for batch in pipeline.train_batches(data.train, cfg.batch_size, config.seed, epoch):
        if skip:
          skip -= 1
          continue
        params, state, opt_state, logs = trainer.step(params, state, opt_state, batch,
                                                      jax.random.fold_in(base_key, step))
        step += 1
        if step % config.log_every == 0 or step == cfg.steps:
          supernet.check_finite(logs, step)
          progress(step, f"loss {float(logs['loss']):.3f}, accuracy largest "
                         f"{float(logs['accuracy_largest']):.3f} smallest "
                         f"{float(logs['accuracy_smallest']):.3f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
          supernet.check_finite(logs, step)
          checkpoints.save(step, {"params": params, "state": state, "opt_state": opt_state},
                           {"step": step})
        if step == cfg.steps:
          break
      epoch += 1
  return params, state
