"""Population evaluator: P candidate architectures scored by one jitted, vmapped function.

The supernet weights and each evaluation batch are shared by every candidate; the population
`Arch` ([P, L] arrays) is the vmapped argument. One compiled function,
`population_counts(params, state, archs, batch, kind, severity, totals)`, serves the clean
evaluation split, every lighting perturbation (`kind` and `severity` are traced: a
`lax.switch` picks the perturbation) and the held training subset, and adds the batch's
per-candidate `metrics.Counts` to running totals on the device. Any population of the same P
reuses it, so a whole search compiles it once.

With more than one device, a `Mesh` with axes ('pop', 'data') shards the candidates over
'pop' and the batch over 'data'; a population whose size does not divide the 'pop' axis is
padded with copies of its last candidate, whose results are then dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from moenas_jax import metrics, models
from moenas_jax.data import lighting, pipeline
from moenas_jax.search_space import Arch

# Index 0 of the perturbation switch is the clean image; then the lighting kinds in order.
_KIND_NAMES = tuple(lighting.KINDS)


def _identity(images: jax.Array, severity: jax.Array) -> jax.Array:
  del severity
  return images


def perturb(images: jax.Array, kind: jax.Array, severity: jax.Array) -> jax.Array:
  """Lighting perturbation with a traced kind (0: none, i: the i-th of `lighting.KINDS`)."""
  branches = [_identity] + [lighting.KINDS[name] for name in _KIND_NAMES]
  return jax.lax.switch(kind, branches, images, jnp.asarray(severity, jnp.float32))


def make_mesh(devices: Sequence[jax.Device] | None = None, data_parallel: int = 1) -> Mesh:
  """A ('pop', 'data') mesh over the devices: `data_parallel` of them per candidate shard."""
  devices = list(jax.devices() if devices is None else devices)
  if data_parallel < 1 or len(devices) % data_parallel:
    raise ValueError(f"data_parallel={data_parallel} must divide the {len(devices)} devices")
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // data_parallel, data_parallel)
  return Mesh(grid, ("pop", "data"))


def pad_candidates(tree: Any, multiple: int) -> Any:
  """Pads every leaf's leading axis P with copies of its last entry up to a multiple."""
  def pad(values):
    extra = -len(values) % multiple
    return jnp.concatenate([values, jnp.repeat(values[-1:], extra, axis=0)]) if extra else values
  return jax.tree.map(lambda v: pad(jnp.asarray(v)), tree)


class PopulationEvaluator:
  """Scores populations of candidates of one supernet on evaluation data.

  `evaluate` returns, per candidate (arrays with a leading axis P): everything of
  `metrics.summarize` on the evaluation split, `robustness` (accuracy over the
  `lighting_set` perturbations of the same split), `train_accuracy` on the held training
  subset and `generalization_gap`. With `per_candidate_weights=True` the params and state
  passed in carry a leading axis P too (proxy fine-tuned copies).
  """

  def __init__(self, graphdef: nnx.GraphDef, *, num_classes: int, num_groups: int,
               batch_size: int, lighting_set: Sequence[tuple[str, int]] = lighting.LIGHTING_SET,
               mesh: Mesh | None = None, per_candidate_weights: bool = False):
    unknown = sorted({kind for kind, _ in lighting_set} - set(_KIND_NAMES))
    if unknown:
      raise ValueError(f"unknown lighting kinds {unknown}; known: {', '.join(_KIND_NAMES)}")
    data_shards = 1 if mesh is None else mesh.shape["data"]
    if batch_size < 1 or batch_size % data_shards:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the mesh's "
                       f"'data' axis ({data_shards})")
    self.graphdef, self.num_classes, self.num_groups = graphdef, num_classes, num_groups
    self.batch_size, self.mesh = batch_size, mesh
    self.per_candidate_weights = per_candidate_weights
    self.lighting_set = tuple((_KIND_NAMES.index(kind) + 1, severity)
                              for kind, severity in lighting_set)
    weight_axis = 0 if per_candidate_weights else None

    def population_counts(params, state, archs, batch, kind, severity, totals):
      images = perturb(batch["image"], kind, severity)

      def candidate(params, state, arch):
        logits, _, _ = models.apply(graphdef, params, state, images, arch, train=False)
        return metrics.batch_counts(logits, batch["label"], batch["group"], batch["mask"],
                                    num_classes=num_classes, num_groups=num_groups)

      counts = jax.vmap(candidate, in_axes=(weight_axis, weight_axis, 0))(params, state, archs)
      return jax.tree.map(jnp.add, totals, counts)

    shardings = {}
    if mesh is not None:
      candidates, replicated = NamedSharding(mesh, PS("pop")), NamedSharding(mesh, PS())
      weights = candidates if per_candidate_weights else replicated
      shardings = dict(in_shardings=(weights, weights, candidates, NamedSharding(mesh, PS("data")),
                                     replicated, replicated, candidates),
                       out_shardings=candidates)
    self._counts = jax.jit(population_counts, donate_argnums=6, **shardings)
    self._summarize = jax.jit(jax.vmap(metrics.summarize))

  def counts(self, params: Any, state: Any, population: Arch, examples: pipeline.Examples,
             perturbations: Sequence[tuple[int, int]] = ((0, 0),)) -> metrics.Counts:
    """Counts [P] summed over every batch of `examples` and every (kind index, severity)."""
    size = int(np.shape(population.num_experts)[0])
    totals = metrics.Counts.zeros(self.num_classes, self.num_groups)
    totals = jax.tree.map(lambda v: jnp.zeros((size, *v.shape), v.dtype), totals)
    archs = jax.tree.map(lambda v: jnp.asarray(v, jnp.int32), population)
    for batch in pipeline.eval_batches(examples, self.batch_size):
      for kind, severity in perturbations:
        totals = self._counts(params, state, archs, batch, np.int32(kind),
                              np.float32(severity), totals)
    return totals

  def evaluate(self, params: Any, state: Any, population: Arch, eval_examples: pipeline.Examples,
               held_examples: pipeline.Examples | None = None,
               robust_examples: pipeline.Examples | None = None) -> dict[str, np.ndarray]:
    """Per-candidate metrics (NumPy arrays with a leading axis P) of a population [P, L].

    Robustness is measured on `robust_examples` (default: the evaluation examples).
    """
    size = int(np.shape(population.num_experts)[0])
    if self.mesh is not None:
      population = pad_candidates(population, self.mesh.shape["pop"])
      if self.per_candidate_weights:
        params, state = pad_candidates((params, state), self.mesh.shape["pop"])
    summary = self._summarize(self.counts(params, state, population, eval_examples))
    if self.lighting_set:
      robust_examples = eval_examples if robust_examples is None else robust_examples
      robust = self._summarize(self.counts(params, state, population, robust_examples,
                                           self.lighting_set))
      # Counts summed over equally sized perturbed copies: their accuracy is the mean accuracy.
      summary["robustness"] = robust["accuracy"]
      summary["robust_worst_group_accuracy"] = robust["worst_group_accuracy"]
    if held_examples is not None:
      held = self._summarize(self.counts(params, state, population, held_examples))
      summary["train_accuracy"] = held["accuracy"]
      summary["generalization_gap"] = metrics.generalization_gap(held["accuracy"],
                                                                 summary["accuracy"])
    return {name: np.asarray(values)[:size] for name, values in summary.items()}
