"""Measured latency as a hardware specification: a table per (block, choice), summed.

    latency(arch) = Σ_b table[block b, choice of block b] + constant   (milliseconds)

The rows are the network's blocks whose cost a gene changes (`blocks`), a choice being the
values of those genes: each MoE layer's transformer layer (attention and MoE feed-forward) by
its (num_experts, top_k) and, with a depth gene, its stage's depth (absent past it: 0 ms);
each width block (`SearchSpace.width_blocks`: an inverted residual, a MobileViT block's
convolutions, the head) by the widths of its input and output. A new gene adds rows, not code
paths; blocks no gene changes (the stem; every width block of a space without a width gene)
are in the constant. Each entry carries the block's MACs, so a table is checked against a
space (`LatencyTable.check`) entry by entry.

`measure_table` times, on the device it runs on, each block at each choice alone as the
candidate's standalone model has it (`export.standalone`, the model's `blocks`: real input
shape [B, ...]): `iterations` copies in one jitted call (one dispatch for them all, as inside
the model), `block_until_ready`, the median of `repeats` timed calls after `warmup` untimed ones
over `iterations`, in rounds taken in turn by every block, so that a slow spell of a shared
machine hits them all alike. Equal blocks (same module, same input) share one measurement.
The calibration candidates (below) are timed in a session of their own, whole models only,
as `benchmarks/latency.py` validates them.

The constant holds what no row holds (the stem, blocks without genes, the model's one
dispatch) and what isolation misses (fusion across blocks, the routing of MoE layers next to
each other). It is the mean, over the calibration candidates, of their measured end-to-end
latency minus their table sum: the least-squares intercept with the slope fixed at 1. By
default they are the smallest, the largest and 6 sampled candidates: the two extremes alone
are atypical (one expert routes nothing; the largest routes every expert), and on the default
space a constant fitted on them alone was off by 6.7% on sampled candidates timed in the same
session, on 8 by 2.8% (a fitted slope did no better). Validate on candidates disjoint from
those (`benchmarks/latency.py`). End-to-end latency is
the exported model's jitted `predict` (`export.Exported`), timed by `time_calls` like the
blocks.

Tables are JSON (`save`, atomic; `load`), with the device's description; loading a table
measured elsewhere than expected logs a warning naming both devices.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from moenas_jax import checkpoint, export, search_space
from moenas_jax.search_space import Arch, SearchSpace

# The fields of a device description that name the hardware (the jax version is kept too, but
# a table does not go stale with it).
HARDWARE_KEYS = ("platform", "device_kind", "cpu", "cores")


def _cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


def device_description() -> dict[str, Any]:
  """This process's default device: jax platform and device kind, CPU model, cores, jax."""
  return {"platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "cpu": _cpu_model(), "cores": os.cpu_count(), "jax": jax.__version__}


def device_name(device: Mapping[str, Any]) -> str:
  """One line naming the hardware of a description, e.g. 'cpu (cpu), AMD EPYC 7B13, 2 cores'."""
  return (f"{device['platform']} ({device['device_kind']}), {device['cpu']}, "
          f"{device['cores']} cores")


Choice = tuple[int, ...]


def layer_names(space: SearchSpace) -> tuple[str, ...]:
  """The table's names of the MoE layers' blocks, in `Arch` order."""
  return tuple(f"moe{layer}" for layer in range(space.num_layers))


@dataclasses.dataclass(frozen=True)
class Block:
  """A row of the table: block `name`, the genes whose values pick its entry ((gene, position)
  pairs) and its MACs per image at each valid choice (0: the block is absent)."""

  name: str
  genes: tuple[tuple[str, int], ...]
  macs: dict[Choice, int]

  @property
  def labels(self) -> tuple[str, ...]:
    """The genes as 'gene[position]'."""
    return tuple(f"{gene}[{position}]" for gene, position in self.genes)


def _dense_with(space: SearchSpace, values: Mapping[tuple[str, int], int]) -> Arch:
  """The dense candidate with the gene values {(gene, position): value} set."""
  genes = search_space.present(space.dense())
  for (gene, position), value in values.items():
    genes[gene] = genes[gene].copy()
    genes[gene][position] = value
  return Arch(**genes)


def _block(space: SearchSpace, name: str, genes: tuple[tuple[str, int], ...],
           macs: Callable[[Arch], Any]) -> Block:
  """Block `name` with every valid choice of `genes`, by the space's own rules: each set on
  the dense candidate and kept if `SearchSpace.validate` takes it as is (canonical)."""
  maxima = {gene.name: gene.maxima for gene in space.genes}
  choices = {}
  for choice in itertools.product(*(range(1, maxima[gene][position] + 1)
                                    for gene, position in genes)):
    try:
      arch = space.validate(_dense_with(space, dict(zip(genes, choice))))
    except ValueError:
      continue
    if all(getattr(arch, gene)[position] == value
           for (gene, position), value in zip(genes, choice)):
      choices[choice] = int(macs(arch))
  return Block(name, genes, choices)


def blocks(space: SearchSpace) -> tuple[Block, ...]:
  """The table's rows for `space`: its width blocks with a width gene (by the widths of their
  input and output), then its MoE layers (by num_experts, top_k and their stage's depth)."""
  check_timeable(space)
  rows = []
  for block in space.width_blocks:
    genes = tuple(("width", position) for position in dict.fromkeys((block.source,
                                                                      block.target))
                  if position is not None)
    if genes:
      rows.append(_block(space, block.name, genes,
                         lambda arch, block=block: block.costs(arch.width, "macs")))
  stage = (np.repeat(np.arange(len(space.depth_maxima)), space.depth_maxima)
           if space.depth_maxima else None)
  for layer, name in enumerate(layer_names(space)):
    genes = (("num_experts", layer), ("top_k", layer))
    if stage is not None:
      genes += (("depth", int(stage[layer])),)
    rows.append(_block(space, name, genes,
                       lambda arch, layer=layer: space.layer_macs(arch)[layer]))
  return tuple(rows)


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """Milliseconds per (block, choice) plus a constant, measured on `device` at `batch_size`.

  blocks: the rows (`Block`); ms: per row, {choice: ms}; method: how it was measured
  (repeats, warm-up, calibration, statistic).
  """

  blocks: tuple[Block, ...]
  ms: tuple[dict[Choice, float], ...]
  constant_ms: float
  batch_size: int
  device: dict[str, Any]
  method: dict[str, Any]

  def block_sum(self, archs: Arch) -> np.ndarray:
    """Σ_b of the table's ms for one candidate ([n] arrays: a scalar) or a population [P]."""
    lengths = {}
    for block in self.blocks:
      for gene, position in block.genes:
        lengths[gene] = max(lengths.get(gene, 0), position + 1)
    given = search_space.present(archs)
    for gene, length in lengths.items():
      size = np.shape(given[gene])[-1] if gene in given else 0
      if size != length:
        raise ValueError(f"the latency table has {length} positions of gene {gene}, the arch "
                         f"{size}; measure a table for this supernet")
    total = 0
    for block, ms in zip(self.blocks, self.ms):
      values = tuple(np.asarray(given[gene], np.int64)[..., position]
                     for gene, position in block.genes)
      lookup = np.full([2 + max(max(choice[i] for choice in ms), int(np.max(values[i])))
                        for i in range(len(values))], np.nan)
      for choice, value in ms.items():
        lookup[choice] = value
      entries = lookup[tuple(np.maximum(v, 0) for v in values)]
      if np.isnan(entries).any():
        where = tuple(int(i) for i in np.argwhere(np.isnan(entries))[0]) if np.ndim(
            entries) else ()
        raise ValueError(f"the latency table has no entry for {block.labels} = "
                         f"{tuple(int(v[where]) for v in values)} of block {block.name}; "
                         f"measure a table for this search space")
      total = total + entries
    return total

  def latency(self, archs: Arch) -> np.ndarray:
    """Predicted ms per image batch: the table's sum plus the constant (scalar or [P])."""
    return self.block_sum(archs) + self.constant_ms

  def minimum_ms(self) -> float:
    """The sum of each block's fastest entry plus the constant: the fastest candidate's
    latency when the blocks are fastest at the same gene values (as at every gene 1), else
    below it."""
    return float(sum(min(ms.values()) for ms in self.ms) + self.constant_ms)

  def check(self, space: SearchSpace) -> None:
    """Refuses a table whose blocks, genes, choices or MACs are not those of `space`."""
    expected = blocks(space)
    have, want = [b.name for b in self.blocks], [b.name for b in expected]
    if have != want:
      raise ValueError(f"the latency table has blocks {have}, the supernet {want}; measure a "
                       f"table for this supernet")
    for block, wanted in zip(self.blocks, expected):
      if block.genes != wanted.genes or set(block.macs) != set(wanted.macs):
        raise ValueError(f"latency table block {block.name} has choices "
                         f"{sorted(block.macs)} of {list(block.labels)}, the supernet "
                         f"{sorted(wanted.macs)} of {list(wanted.labels)}; measure a table "
                         f"for this supernet")
      for choice, macs in wanted.macs.items():
        if block.macs[choice] != macs:
          raise ValueError(f"latency table block {block.name} was measured at "
                           f"{block.macs[choice]} MACs for {list(block.labels)} = "
                           f"{list(choice)}, the supernet's has {macs}; measure a table for "
                           f"this supernet")

  def to_dict(self) -> dict[str, Any]:
    return {"constant_ms": self.constant_ms, "batch_size": self.batch_size,
            "device": self.device, "method": self.method,
            "blocks": [{"name": block.name, "genes": [list(gene) for gene in block.genes],
                        "choices": [{**dict(zip(block.labels, choice)),
                                     "macs": block.macs[choice], "ms": value}
                                    for choice, value in ms.items()]}
                       for block, ms in zip(self.blocks, self.ms)]}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
    rows, ms = [], []
    for row in data["blocks"]:
      block = Block(row["name"], tuple((str(g), int(p)) for g, p in row["genes"]), {})
      choices = [(tuple(int(entry[label]) for label in block.labels), entry)
                 for entry in row["choices"]]
      rows.append(dataclasses.replace(block, macs={choice: int(entry["macs"])
                                                   for choice, entry in choices}))
      ms.append({choice: float(entry["ms"]) for choice, entry in choices})
    return cls(tuple(rows), tuple(ms), float(data["constant_ms"]), int(data["batch_size"]),
               dict(data["device"]), dict(data["method"]))


_KEYS = ("constant_ms", "batch_size", "device", "method", "blocks")


def save(path: str | os.PathLike, table: LatencyTable) -> None:
  """Writes the table as JSON, atomically."""
  checkpoint.write_json_atomic(path, table.to_dict())


def load(path: str | os.PathLike, expected_device: str = "") -> LatencyTable:
  """The table at `path`; warns when it was measured elsewhere than expected.

  expected_device: a part of the device name the table must have (e.g. 'EPYC' or 'TPU v5');
  "" expects this process's own device (the hardware keys of `device_description`).
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no latency table at {path}; build one with python -m "
                            f"benchmarks.latency --output={path} on the target device")
  data = checkpoint.read_json(path)
  missing = [key for key in _KEYS if not isinstance(data, dict) or key not in data]
  if missing:
    raise ValueError(f"{path} is not a latency table (missing {missing}); build one with "
                     f"python -m benchmarks.latency --output={path}")
  table = LatencyTable.from_dict(data)
  measured = device_name(table.device)
  if expected_device:
    if expected_device.lower() not in measured.lower():
      logging.warning("latency table %s was measured on %s, not on the expected device %r "
                      "(config.search.latency_device); its latencies may not hold there",
                      path, measured, expected_device)
  elif any(table.device.get(key) != value for key, value in device_description().items()
           if key in HARDWARE_KEYS):
    logging.warning("latency table %s was measured on %s, but this is %s; its latencies are "
                    "that device's (set config.search.latency_device to name the target)",
                    path, measured, device_name(device_description()))
  return table


# ---------------------------------------------------------------------------------------------
# Measuring.

def time_calls(calls: Sequence[Callable[[], Any]], *, repeats: int, warmup: int,
               rounds: int = 10) -> np.ndarray:
  """Median ms of each zero-argument call (blocked until ready), over `repeats` timed calls.

  The calls take turns in `rounds` rounds (a slow spell of a shared machine hits them all
  alike); in each round a call runs `warmup` untimed times, then its share of the repeats
  back to back, as a deployed model runs: alternating calls one by one instead measures cold
  caches (on the 2-core CPU up to 1.5x slower for sub-millisecond models).
  """
  if repeats < rounds or warmup < 1 or rounds < 1:
    raise ValueError(f"need repeats >= rounds >= 1 and warmup >= 1, got repeats={repeats}, "
                     f"rounds={rounds}, warmup={warmup}")
  seconds = [[] for _ in calls]
  for round_ in range(rounds):
    for call, times in zip(calls, seconds):
      for _ in range(warmup):
        jax.block_until_ready(call())
      for _ in range(repeats // rounds + (round_ < repeats % rounds)):
        start = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - start)
  return np.array([np.median(times) for times in seconds]) * 1e3


def model_call(supernet: nnx.Module, arch: Arch, batch_size: int) -> Callable[[], Any]:
  """The exported candidate's jitted `predict` on a fixed batch (compiled on first call)."""
  exported = export.Exported(export.standalone(supernet, arch), metadata={})
  images = jax.random.uniform(jax.random.key(0), (batch_size, *supernet.input_shape))
  return lambda: exported.predict(images)


def _block_call(module: nnx.Module, apply: Callable, inputs: jax.ShapeDtypeStruct,
                iterations: int) -> Callable[[], Any]:
  """`apply(module, x)` `iterations` times in one jitted call, the weights constants (as in
  `export.Exported.predict`), from a fixed random x: one dispatch for them all, as a block has
  inside the whole model. Unrolled, so its ops run as the model's own do (a `fori_loop` body
  ran a routed MoE layer's extra work 1.6x faster on the 2-core CPU); each copy nudges x by its
  output's mean, so no copy is merged with another."""
  graphdef, state = nnx.split(module)

  def run(x):
    for _ in range(iterations):
      x = x + 1e-6 * jnp.mean(apply(nnx.merge(graphdef, state), x))
    return x

  run = jax.jit(run)
  x = jax.random.uniform(jax.random.key(0), inputs.shape, inputs.dtype)
  return lambda: run(x)


def distinct_candidates(space: SearchSpace, count: int, key: jax.Array,
                        exclude: Sequence[Arch] = ()) -> list[Arch]:
  """Up to `count` distinct candidates sampled from `space` with `key`, none in `exclude`, in
  sampling order (fewer only when the space has fewer)."""
  seen = {arch.key() for arch in exclude}
  chosen = []
  for arch in search_space.unstack(space.sample_population(key, 64 * max(count, 1))):
    if len(chosen) < count and arch.key() not in seen:
      seen.add(arch.key())
      chosen.append(arch)
  return chosen


def calibration_candidates(space: SearchSpace, count: int, seed: int) -> list[Arch]:
  """The smallest and the largest candidate and up to `count` − 2 distinct sampled ones (from
  `seed`)."""
  if count < 2:
    raise ValueError(f"calibration needs at least 2 candidates (the smallest and the largest), "
                     f"got {count}")
  extremes = list({arch.key(): arch for arch in (space.smallest(), space.largest())}.values())
  return extremes + distinct_candidates(space, count - len(extremes),
                                        jax.random.fold_in(jax.random.key(seed), 1), extremes)


def check_timeable(space: SearchSpace) -> None:
  """Refuses a space with layers other than MoE feed-forwards or with an image router (the
  conv MoE models, whose blocks a table does not time)."""
  kinds = sorted({type(shape).__name__ for shape in space.layers} - {"MoELayerShape"})
  if kinds or space.router is not None:
    raise ValueError(f"latency tables time MoE feed-forward layers (mobilevit), this supernet "
                     f"has {kinds or ['an image router']}; use mac_budget for conv MoE models "
                     f"(resnet_moe, vgg_moe)")


def measure_table(supernet: nnx.Module, *, batch_size: int = 1, repeats: int = 200,
                  warmup: int = 5, iterations: int = 8,
                  calibration: Sequence[Arch] | None = None, calibration_size: int = 8,
                  seed: int = 0) -> LatencyTable:
  """Times every (block, choice) of `supernet`'s space and calibrates the constant on the
  `calibration` candidates (default: `calibration_candidates(space, calibration_size, seed)`)
  on this process's device.

  A choice is timed in the standalone model of the dense candidate with the block's genes
  set to it (full depth, so every layer keeps its index); one model serves the choices of
  several blocks that agree on their shared genes. A choice of 0 MACs is absent: 0 ms. A
  block's entry is a call of `iterations` copies of it (`_block_call`) over `iterations`: a
  jitted call alone pays a dispatch (on the 2-core CPU about 0.1 ms, as much as a whole
  block) that the block does not pay inside the model.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  space = supernet.search_space()
  rows = blocks(space)
  if calibration is None:
    calibration = calibration_candidates(space, calibration_size, seed)
  # A block's index in the model's `blocks`: width blocks, then MoE layers.
  index = {block.name: i for i, block in enumerate(space.width_blocks)}
  index.update({name: len(space.width_blocks) + i for i, name in enumerate(layer_names(space))})
  pending = [(row, choice) for row in rows for choice, macs in row.macs.items() if macs]
  calls, keys = {}, {}
  while pending:
    values, served, later = {}, [], []
    for row, choice in pending:
      wanted = {gene: value for gene, value in zip(row.genes, choice) if gene[0] != "depth"}
      if all(values.get(gene, value) == value for gene, value in wanted.items()):
        values.update(wanted)
        served.append((row, choice))
      else:
        later.append((row, choice))
    model_blocks = export.standalone(supernet, _dense_with(space, values)).blocks(batch_size)
    for row, choice in served:
      module, apply, inputs = model_blocks[index[row.name]]
      key = (nnx.graphdef(module), inputs.shape)  # equal blocks: measured once
      calls.setdefault(key, (module, apply, inputs))
      keys[row.name, choice] = key
    pending = later
  distinct = list(calls)
  ms = time_calls([_block_call(*calls[key], iterations) for key in distinct],
                  repeats=repeats, warmup=warmup)
  # Whole models in a session of their own, as the validation (and a deployment) runs them:
  # timed among the block calls they ran 1.2-1.6x faster.
  end_to_end = time_calls([model_call(supernet, arch, batch_size) for arch in calibration],
                          repeats=repeats, warmup=warmup)
  measured = dict(zip(distinct, (ms / iterations).tolist()))
  method = {"statistic": "median", "repeats": repeats, "warmup": warmup,
            "iterations": iterations,
            "moe_settings": dict(supernet.config["moe_settings"]),
            "calibration": [search_space.to_dict(arch) for arch in calibration],
            "calibration_ms": end_to_end.tolist(),
            "blocks": "each alone in the standalone model: one jitted call of `iterations` "
                      "copies, over iterations",
            "constant": "mean over the calibration candidates of end-to-end ms minus the "
                        "table's sum (exported model, jitted predict)"}
  table = LatencyTable(rows, tuple({choice: measured[keys[row.name, choice]] if macs else 0.0
                                    for choice, macs in row.macs.items()} for row in rows),
                       0.0, batch_size, device_description(), method)
  sums = table.block_sum(search_space.stack(calibration))
  return dataclasses.replace(table, constant_ms=float(np.mean(end_to_end - sums)))
