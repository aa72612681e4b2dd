"""Population evaluator: P candidate architectures scored by one jitted, vmapped function.

The supernet weights and each evaluation batch are shared by every candidate; the population
`Arch` ([P, L] arrays) is the vmapped argument. One compiled function,
`population_counts(params, state, archs, batch, kind, severity, totals)`, serves the clean
evaluation split, every lighting perturbation (`kind` and `severity` are traced: a
`lax.switch` picks the perturbation) and the held training subset, and adds the batch's
per-candidate `metrics.Counts` to running totals on the device. Any population of the same P
reuses it, so a whole search compiles it once.

With `chunk_size`, the population is scored in chunks of at most that many vmapped candidates,
one after another inside the same compiled call (`lax.map`): the candidate-independent layers
still run once per batch, and each chunk's activations stay in cache. On a 2-core CPU, chunks
of 8 score P = 32 candidates about 30% faster than one vmap over all 32.

With more than one device, a `Mesh` with axes ('pop', 'data') shards the candidates over
'pop' and the batch over 'data'; a population whose size does not divide the 'pop' axis is
padded with copies of its last candidate, whose results are then dropped (so is one that
does not split into equal chunks).

The same evaluator scores one standalone model (`population=None`: P = 1, the model's own
architecture) and attacks candidates with L∞ PGD (`attack`: `adversarial.pgd` on the
cross-entropy of the whole model, the router included; a second compiled function, vmapped
the same way); `evaluate.Evaluator`, the test-time evaluator, is this at
P = 1 plus the bootstrap.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from moenas_jax import adversarial, hosts, loss, metrics, models, search_space
from moenas_jax.data import lighting, pipeline
from moenas_jax.search_space import Arch

# The metrics reported under attack, as "adversarial_<name>".
ADVERSARIAL = ("accuracy", "group_accuracy", "disparity", "worst_group_accuracy")


def make_mesh(devices: Sequence[jax.Device] | None = None, data_parallel: int = 1) -> Mesh:
  """A ('pop', 'data') mesh over the devices: `data_parallel` of them per candidate shard."""
  devices = list(jax.devices() if devices is None else devices)
  if data_parallel < 1 or len(devices) % data_parallel:
    raise ValueError(f"data_parallel={data_parallel} must divide the {len(devices)} devices")
  grid = np.asarray(devices, dtype=object).reshape(len(devices) // data_parallel, data_parallel)
  return Mesh(grid, ("pop", "data"))


def chunking(size: int, chunk_size: int | None, shards: int = 1) -> tuple[int, int]:
  """(number of chunks, padded size) for `size` candidates in chunks of at most `chunk_size`
  (None: one chunk; at least `shards`), each chunk a multiple of `shards` candidates, padding
  the fewest.

  E.g. 32 in chunks of at most 8: (4, 32); 20: (3, 21); 12: (2, 12).
  """
  padded = -(-size // shards) * shards
  chunks = -(-padded // (max(chunk_size // shards, 1) * shards)) if chunk_size else 1
  return chunks, -(-padded // (chunks * shards)) * chunks * shards


def chunked_vmap(fn: Callable, num_chunks: int, in_axes: Sequence[int | None]) -> Callable:
  """`jax.vmap(fn, in_axes)` over a leading axis P (in_axes 0 or None), computed as `num_chunks`
  sequential chunks of P / num_chunks candidates.

  Chunk c holds candidates c, c + num_chunks, c + 2 · num_chunks, ...: it takes the same rows
  of every device's contiguous block of P, so a 'pop' sharding of P is kept.
  """
  batched = jax.vmap(fn, in_axes=in_axes)
  if num_chunks == 1:
    return batched

  def split(v):  # [P, ...] -> [num_chunks, P / num_chunks, ...]
    return v.reshape(-1, num_chunks, *v.shape[1:]).swapaxes(0, 1)

  def merge(v):
    return v.swapaxes(0, 1).reshape(-1, *v.shape[2:])

  def chunked(*args):
    mapped = [i for i, axis in enumerate(in_axes) if axis is not None]

    def one_chunk(chunk):
      return batched(*[chunk[mapped.index(i)] if i in mapped else arg
                       for i, arg in enumerate(args)])

    chunks = jax.tree.map(split, [args[i] for i in mapped])
    return jax.tree.map(merge, jax.lax.map(one_chunk, chunks))

  return chunked


def pad_candidates(tree: Any, size: int) -> Any:
  """Pads every leaf's leading axis P up to `size` with copies of its last entry."""
  def pad(values):
    extra = size - len(values)
    return jnp.concatenate([values, jnp.repeat(values[-1:], extra, axis=0)]) if extra else values
  return jax.tree.map(lambda v: pad(jnp.asarray(v)), tree)


class PopulationEvaluator:
  """Scores populations of candidates of one supernet on evaluation data.

  `evaluate` returns, per candidate (arrays with a leading axis P): everything of
  `metrics.summarize` on the evaluation split, `robustness` (accuracy over the
  `lighting_set` perturbations of the same split) and `perturbation_accuracy` (one per
  perturbation, [P, S]), `train_accuracy` on the held training subset and
  `generalization_gap` (group-fair: `metrics.generalization_gap`), and with an `attack`
  (`adversarial.AttackSettings`, e.g. PGD-10 at ε = 8/255) `adversarial_accuracy`,
  `adversarial_group_accuracy`, `adversarial_disparity` and
  `adversarial_worst_group_accuracy` under it. With
  `per_candidate_weights=True` the params and state passed in carry a leading axis P too
  (proxy fine-tuned copies). `chunk_size`: at most this many candidates vmapped at once
  (None: all P).

  `recalibration_images` [NB, B, H, W, C] (training batches): before scoring, each candidate
  gets its own batch-norm statistics, the mean over these batches of the statistics it
  computes on them (`models.batch_statistics`), instead of the shared state that supernet
  training averaged over many candidates. One more compiled call, `bn_recalibrate`, vmapped
  like the scoring (once per P).
  """

  def __init__(self, graphdef: nnx.GraphDef, *, num_classes: int, num_groups: int,
               batch_size: int, lighting_set: Sequence[tuple[str, int]] = lighting.LIGHTING_SET,
               mesh: Mesh | None = None, per_candidate_weights: bool = False,
               chunk_size: int | None = None, recalibration_images: np.ndarray | None = None,
               attack: adversarial.AttackSettings | None = None):
    indexed_set = lighting.indexed(lighting_set)
    data_shards = 1 if mesh is None else mesh.shape["data"]
    if chunk_size is not None and chunk_size < 1:
      raise ValueError(f"chunk_size={chunk_size} must be positive (or None: all candidates at "
                       f"once)")
    if batch_size < 1 or batch_size % data_shards:
      raise ValueError(f"batch_size={batch_size} must be a positive multiple of the mesh's "
                       f"'data' axis ({data_shards})")
    if recalibration_images is not None and (np.ndim(recalibration_images) != 5
                                             or not len(recalibration_images)):
      raise ValueError(f"recalibration_images must be [NB, B, H, W, C] with NB >= 1, got "
                       f"shape {np.shape(recalibration_images)}")
    self.graphdef, self.num_classes, self.num_groups = graphdef, num_classes, num_groups
    self.batch_size, self.mesh = batch_size, mesh
    self.per_candidate_weights, self.chunk_size = per_candidate_weights, chunk_size
    self.recalibration_images = (None if recalibration_images is None
                                 else jnp.asarray(recalibration_images, jnp.float32))
    self.lighting_set, self.attack = indexed_set, attack
    params_axis = 0 if per_candidate_weights else None
    state_axis = 0 if per_candidate_weights or recalibration_images is not None else None

    def bn_recalibrate(params, state, archs, images, num_chunks):
      def candidate(params, state, arch):
        def add(total, batch):
          statistics = models.batch_statistics(graphdef, params, state, batch, arch)
          return jax.tree.map(jnp.add, total, statistics), None

        total, _ = jax.lax.scan(add, jax.tree.map(jnp.zeros_like, state), images)
        return jax.tree.map(lambda v: v / images.shape[0], total)

      return chunked_vmap(candidate, num_chunks, (params_axis, params_axis, 0))(
          params, state, archs)

    def logits_of(params, state, arch, images):
      # A standalone model's placeholder arch (an int array, not an Arch) stands for None.
      arch = arch if isinstance(arch, Arch) else None
      return models.apply(graphdef, params, state, images, arch, train=False)[0]

    def counts_of(logits, batch):
      return metrics.batch_counts(logits, batch["label"], batch["group"], batch["mask"],
                                  num_classes=num_classes, num_groups=num_groups)

    def population_counts(params, state, archs, batch, kind, severity, totals, num_chunks):
      """(totals + the batch's counts under the perturbation, predictions [P, B])."""
      images = lighting.perturb_indexed(batch["image"], kind, severity)

      def candidate(params, state, arch):
        logits = logits_of(params, state, arch, images)
        return counts_of(logits, batch), logits.argmax(-1).astype(jnp.int32)

      counts, predictions = chunked_vmap(candidate, num_chunks, (params_axis, state_axis, 0))(
          params, state, archs)
      return jax.tree.map(jnp.add, totals, counts), predictions

    def adversarial_counts(params, state, archs, batch, key, totals, num_chunks):
      """totals + the batch's counts after each candidate's own PGD attack (from `key`)."""
      def candidate(params, state, arch):
        def attacked_loss(images):
          ce = loss.cross_entropy(logits_of(params, state, arch, images), batch["label"])
          return (ce * batch["mask"]).sum()

        images = adversarial.pgd(attacked_loss, batch["image"], key=key, settings=attack)
        return counts_of(logits_of(params, state, arch, images), batch)

      counts = chunked_vmap(candidate, num_chunks, (params_axis, state_axis, 0))(
          params, state, archs)
      return jax.tree.map(jnp.add, totals, counts)

    counts_shardings, attack_shardings, recalibrate_shardings = {}, {}, {}
    if mesh is not None:
      candidates, replicated = NamedSharding(mesh, PS("pop")), NamedSharding(mesh, PS())
      params_sharding = candidates if per_candidate_weights else replicated
      state_sharding = candidates if state_axis == 0 else replicated
      inputs = (params_sharding, state_sharding, candidates, NamedSharding(mesh, PS("data")))
      counts_shardings = dict(in_shardings=(*inputs, replicated, replicated, candidates),
                              out_shardings=(candidates, NamedSharding(mesh, PS("pop", "data"))))
      attack_shardings = dict(in_shardings=(*inputs, replicated, candidates),
                              out_shardings=candidates)
      recalibrate_shardings = dict(in_shardings=(params_sharding, params_sharding, candidates,
                                                 replicated),
                                   out_shardings=candidates)
    self._counts = jax.jit(population_counts, donate_argnums=6, static_argnums=7,
                           **counts_shardings)
    self._adversarial_counts = jax.jit(adversarial_counts, donate_argnums=5, static_argnums=6,
                                       **attack_shardings)
    self._recalibrate = jax.jit(bn_recalibrate, static_argnums=4, **recalibrate_shardings)
    self._summarize = jax.jit(jax.vmap(metrics.summarize))

  def _padded(self, params: Any, state: Any, population: Arch | None
              ) -> tuple[Any, Any, Any, int, int]:
    """(params, state, archs, chunks, P) padded (see `chunking`) to the compiled population
    size; a standalone model (`population=None`, P = 1) gets placeholder archs."""
    if population is None and self.recalibration_images is not None:
      raise ValueError("a standalone model (population=None) has its own batch-norm state; "
                       "score it with an evaluator built without recalibration_images")
    shards = 1 if self.mesh is None else self.mesh.shape["pop"]
    size = 1 if population is None else search_space.population_size(population)
    num_chunks, padded = chunking(size, self.chunk_size, shards)
    if population is None:
      archs = jnp.zeros((padded,), jnp.int32)
    else:
      archs = pad_candidates(jax.tree.map(lambda v: jnp.asarray(v, jnp.int32), population),
                             padded)
    if self.per_candidate_weights:
      params, state = pad_candidates((params, state), padded)
    return params, state, archs, num_chunks, size

  def recalibrate(self, params: Any, state: Any, population: Arch) -> Any:
    """Each candidate's own batch-norm state [P, ...] from `recalibration_images`."""
    if self.recalibration_images is None:
      raise ValueError("this evaluator has no recalibration_images; build it with training "
                       "batches to recalibrate batch norm")
    params, state, archs, num_chunks, size = self._padded(params, state, population)
    recalibrated = self._recalibrate(params, state, archs, self.recalibration_images, num_chunks)
    return jax.tree.map(lambda v: v[:size], recalibrated)

  def _prepared(self, params: Any, state: Any, population: Arch | None
                ) -> tuple[Any, Any, Any, int, int, metrics.Counts]:
    """`_padded`, a recalibrated state [P, ...] padded too, and zero counts [P', N, G]."""
    params, state, archs, num_chunks, size = self._padded(params, state, population)
    padded = search_space.population_size(archs)
    if self.recalibration_images is not None and not self.per_candidate_weights:
      state = pad_candidates(state, padded)
    zeros = jax.tree.map(lambda v: jnp.zeros((padded, *v.shape), v.dtype),
                         metrics.Counts.zeros(self.num_classes, self.num_groups))
    return params, state, archs, num_chunks, size, zeros

  def _scan(self, params: Any, state: Any, population: Arch | None,
            examples: pipeline.Examples, perturbations: Sequence[tuple[int, float]], *,
            with_predictions: bool = False) -> tuple[list[metrics.Counts], np.ndarray | None]:
    """Counts [P', N, G] per (kind index, severity), P' the padded size, and with
    `with_predictions` the predicted classes [P, n] under the first of them."""
    params, state, archs, num_chunks, size, zeros = self._prepared(params, state, population)
    totals = [jax.tree.map(jnp.copy, zeros) for _ in perturbations]  # each is donated
    predictions = []
    for batch in pipeline.eval_batches(examples, self.batch_size):
      for i, (kind, severity) in enumerate(perturbations):
        totals[i], batch_predictions = self._counts(params, state, archs, batch, np.int32(kind),
                                                    np.float32(severity), totals[i], num_chunks)
        if with_predictions and i == 0:
          predictions.append(hosts.to_host(batch_predictions)[:size, batch["mask"]])
    return totals, (np.concatenate(predictions, 1) if with_predictions else None)

  def counts(self, params: Any, state: Any, population: Arch | None,
             examples: pipeline.Examples,
             perturbations: Sequence[tuple[int, float]] = ((0, 0),)) -> metrics.Counts:
    """Counts summed over every batch of `examples` and every (kind index, severity).

    `population`: candidates [P, L], or None for a standalone model (P = 1). `state` is per
    candidate [P, ...] when the evaluator recalibrates (`recalibrate`) or has per-candidate
    weights, else shared. The counts' leading axis is P, padded (see `chunking`) when the
    mesh's 'pop' axis or the chunks do not divide P: entries from P on repeat the last one.
    """
    totals, _ = self._scan(params, state, population, examples, perturbations)
    return jax.tree.map(lambda *v: sum(v[1:], v[0]), *totals)

  def adversarial_counts(self, params: Any, state: Any, population: Arch | None,
                         examples: pipeline.Examples, key: jax.Array) -> metrics.Counts:
    """Counts after PGD (`attack`), batch b attacked from `fold_in(key, b)`; as `counts`."""
    if self.attack is None:
      raise ValueError("this evaluator has no attack; build it with attack=AttackSettings(...)")
    params, state, archs, num_chunks, _, totals = self._prepared(params, state, population)
    for b, batch in enumerate(pipeline.eval_batches(examples, self.batch_size)):
      totals = self._adversarial_counts(params, state, archs, batch,
                                        jax.random.fold_in(key, b), totals, num_chunks)
    return totals

  def evaluate(self, params: Any, state: Any, population: Arch | None,
               eval_examples: pipeline.Examples, held_examples: pipeline.Examples | None = None,
               robust_examples: pipeline.Examples | list[pipeline.Examples] | None = None, *,
               attack_key: jax.Array | None = None,
               with_predictions: bool = False) -> dict[str, np.ndarray]:
    """Per-candidate metrics (NumPy arrays with a leading axis P) of a population [P, L], or
    of a standalone model (`population=None`, P = 1).

    Robustness is measured on `robust_examples` (default: the evaluation examples), or on
    a list of them, one already perturbed per `lighting_set` entry (a frozen trunk's
    features of the perturbed images). With
    `recalibration_images`, every candidate is scored with its recalibrated batch-norm state.
    With an `attack`, `attack_key` seeds it (`adversarial_counts`).
    `with_predictions`: also "predictions", the clean predicted classes [P, n].
    """
    if self.attack is not None and attack_key is None:
      raise ValueError("an evaluator with an attack needs attack_key (its random starts)")
    size = 1 if population is None else search_space.population_size(population)
    if self.recalibration_images is not None and population is not None:
      state = self.recalibrate(params, state, population)
    (clean,), predictions = self._scan(params, state, population, eval_examples, ((0, 0),),
                                       with_predictions=with_predictions)
    summary = self._summarize(clean)
    if self.lighting_set:
      robust_examples = eval_examples if robust_examples is None else robust_examples
      if isinstance(robust_examples, list):  # perturbed already: one per `lighting_set` entry
        perturbed = [self._scan(params, state, population, examples, ((0, 0),))[0][0]
                     for examples in robust_examples]
      else:
        perturbed, _ = self._scan(params, state, population, robust_examples,
                                  self.lighting_set)
      each = jax.tree.map(lambda *v: jnp.stack(v, 1), *perturbed)  # [P, S, N, G]
      # Counts summed over equally sized perturbed copies: their accuracy is the mean accuracy.
      robust = self._summarize(jax.tree.map(lambda v: v.sum(1), each))
      summary["robustness"] = robust["accuracy"]
      summary["robust_worst_group_accuracy"] = robust["worst_group_accuracy"]
      summary["perturbation_accuracy"] = self._summarize(each)["accuracy"]  # [P, S]
    if held_examples is not None:
      held = self._summarize(self.counts(params, state, population, held_examples))
      summary["train_accuracy"] = held["accuracy"]
      summary["generalization_gap"] = metrics.generalization_gap(
          held["group_accuracy"], summary["group_accuracy"])
      summary["pooled_generalization_gap"] = metrics.pooled_generalization_gap(
          held["accuracy"], summary["accuracy"])
    if self.attack is not None:
      attacked = self._summarize(self.adversarial_counts(params, state, population,
                                                         eval_examples, attack_key))
      for name in ADVERSARIAL:
        summary[f"adversarial_{name}"] = attacked[name]
    result = {name: values[:size] for name, values in hosts.to_host(summary).items()}
    if with_predictions:
      result["predictions"] = predictions
    return result
