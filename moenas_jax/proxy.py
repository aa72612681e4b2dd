"""Proxy fine-tuning: each candidate of a population trains briefly on its own weight copy.

Scores measured with the shared supernet weights carry weight-sharing bias (every weight was
trained for many candidates at once). `ProxyTuner.tune` gives each of the P candidates a copy
of the supernet's params and batch-norm state, stacked [P, ...], and trains every copy for
`steps` steps on its own architecture only; the population evaluator then scores the copies
(`PopulationEvaluator(per_candidate_weights=True)`).

All P candidates take each step together in one jitted, vmapped function, `proxy_step`,
compiled once for any population of the same P. Every candidate sees the same batches
(`pipeline.sampled_batches`, seeded by the key's data) and the same gate noise key per step,
so a candidate's result depends only on its architecture and the key, not on the rest of the
population. Loss = the training objective (`objectives.py`; each candidate carries its own
objective state) + routing aux loss, as in supernet training.

Optimiser: SGD with momentum 0.9, the learning rate decayed from `learning_rate` to 0 over
the steps (cosine), gradients clipped to global norm 1, a fresh state per candidate. Not
Adam: from a fresh state its first steps move every weight by about the learning rate
whatever the size of its gradient, so weights the candidate barely uses drift, and rounding
in near-zero gradients becomes learning-rate-sized differences (a candidate tuned in a
population of 3 and alone differed by 12% of its logits after 4 steps; with SGD by 1e-6).
Memory: two copies of the weights per candidate (params, momentum) plus P candidates'
activations per step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moenas_jax import loop, loss, objectives, search_space
from moenas_jax.data import pipeline
from moenas_jax.search_space import Arch


@dataclasses.dataclass(frozen=True)
class ProxySettings:
  """Steps of fine-tuning per candidate (0: none), the batch size and the peak learning rate."""

  steps: int = 0
  batch_size: int = 64
  learning_rate: float = 0.003

  def __post_init__(self):
    if self.steps < 0 or self.batch_size < 1:
      raise ValueError(f"need steps >= 0 and batch_size >= 1, got steps={self.steps}, "
                       f"batch_size={self.batch_size}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")


class ProxyTuner:
  """`tune(params, state, archs, examples, key)`: per-candidate copies trained `steps` steps."""

  def __init__(self, graphdef: nnx.GraphDef, settings: ProxySettings,
               objective: objectives.Objective | None = None):
    self.settings = settings
    objective = objectives.Objective.erm() if objective is None else objective
    schedule = optax.cosine_decay_schedule(settings.learning_rate, max(settings.steps, 1))
    self.optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                                 optax.sgd(schedule, momentum=0.9))

    def proxy_init(params, state, archs):
      size = search_space.population_size(archs)
      params, state = jax.tree.map(lambda v: jnp.broadcast_to(v, (size, *v.shape)),
                                   (params, state))
      opt_state = jax.vmap(self.optimizer.init)(params)
      objective_state = objective.init()
      return params, state, (opt_state,
                             jnp.broadcast_to(objective_state, (size, *objective_state.shape)))

    def proxy_step(params, state, opt_state, archs, batch, key, step):
      noise = jax.random.fold_in(key, step)

      def candidate(params, state, opt_state, arch):
        return loss.update(self.optimizer, objective,
                           lambda params: loss.terms(graphdef, params, state, batch, arch, noise),
                           params, opt_state, batch)

      return jax.vmap(candidate)(params, state, opt_state, archs)

    self._init = jax.jit(proxy_init)
    self._step = jax.jit(proxy_step, donate_argnums=(0, 1, 2))

  def tune(self, params: Any, state: Any, archs: Arch, examples: pipeline.Examples,
           key: jax.Array) -> tuple[Any, Any, dict[str, np.ndarray]]:
    """(params [P, ...], state [P, ...], logs) after `steps` steps of each candidate.

    `archs` is a population [P, L]; the shared `params` and `state` are left as they are.
    logs: "loss", "cross_entropy", "accuracy" on each step's batch and "grad_norm", NumPy
    arrays [steps, P]. A non-finite loss or gradient norm raises FloatingPointError naming
    the step and the candidate.
    """
    archs = jax.tree.map(lambda v: jnp.asarray(v, jnp.int32), archs)
    params, state, opt_state = self._init(params, state, archs)
    batch_key, noise_key = jax.random.split(key)
    batches = pipeline.sampled_batches(examples, self.settings.batch_size, self.settings.steps,
                                       np.asarray(jax.random.key_data(batch_key)))

    def step(carry, batch, t):
      *carry, logs = self._step(*carry, archs, batch, noise_key, np.int32(t))
      return tuple(carry), logs

    fitted = loop.fit(step, (params, state, opt_state), batches=lambda epoch: batches,
                      steps_per_epoch=max(self.settings.steps, 1),
                      total_steps=self.settings.steps, name="proxy", check=None)
    (params, state, _), logs = fitted.carry, fitted.step_logs
    size = search_space.population_size(archs)
    logs = {name: np.asarray([entry[name] for entry in logs], np.float32).reshape(-1, size)
            for name in ("loss", "cross_entropy", "accuracy", "grad_norm")}
    bad = np.argwhere(~np.isfinite(logs["loss"]) | ~np.isfinite(logs["grad_norm"]))
    if len(bad):
      step, candidate = bad[0]
      raise FloatingPointError(
          f"proxy fine-tuning loss is {logs['loss'][step, candidate]}, gradient norm "
          f"{logs['grad_norm'][step, candidate]}, at step {step} (candidate {candidate}); "
          f"lower the learning rate (config.search.proxy_learning_rate) or check the "
          f"training data for NaN or infinite values")
    return params, state, logs
