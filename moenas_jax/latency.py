"""Measured latency as a hardware specification: a table per (layer, choice), summed.

    latency(arch) = Σ_l table[layer l, choice of layer l] + constant   (milliseconds)

A choice is the tuple of a layer's gene values (today `(num_experts, top_k)` of one MoE
feed-forward, in `SearchSpace.genes` order), so a new gene adds rows, not code paths.
`measure_table` times, on the device it runs on, each MoE layer in isolation at its real input
shape [B, T, D] for each of its valid choices: the standalone `moe.MoEFeedForward` of that many
experts and that top-k, jitted, `block_until_ready`, the median of `repeats` timed calls after
`warmup` untimed ones, in rounds taken in turn by every layer and the calibration candidates
(below), so that a slow spell of a shared machine hits them all alike. Layers of equal shape
share one measurement.

The constant holds everything outside the MoE layers (stem, convolutions, attention, head) and
what isolation misses (per-call dispatch, fusion across layers). It is the mean, over the
calibration candidates (by default the smallest and the largest one), of their measured
end-to-end latency minus their table sum: the least-squares intercept with the slope fixed at 1.
Validate on candidates disjoint from those (`benchmarks/latency.py`). End-to-end latency is
the exported model's jitted `predict` (`export.Exported`), timed by `time_calls` like the layers.

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

from moenas_jax import checkpoint, export, moe, search_space
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


def layer_names(space: SearchSpace) -> tuple[str, ...]:
  """The table's names of the MoE layers, in `Arch` order."""
  return tuple(f"moe{layer}" for layer in range(space.num_layers))


def gene_names(space: SearchSpace) -> tuple[str, ...]:
  """The names of a choice's values: the space's genes, in table order."""
  return tuple(gene.name for gene in space.genes)


def layer_choices(space: SearchSpace, layer: int) -> tuple[tuple[int, ...], ...]:
  """Every valid choice (gene values, `SearchSpace.genes` order) of one layer, by the space's
  own rules (`SearchSpace.validate`, the other layers dense)."""
  valid = []
  for choice in itertools.product(*(range(1, gene.maxima[layer] + 1) for gene in space.genes)):
    arch = search_space.present(space.dense())
    for gene, value in zip(space.genes, choice):
      arch[gene.name][layer] = value
    try:
      space.validate(Arch(**arch))
    except ValueError:
      continue
    valid.append(choice)
  return tuple(valid)


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """Milliseconds per (layer, choice) plus a constant, measured on `device` at `batch_size`.

  genes: the gene names of a choice; layers: {name: {"shape": [D, H, T], "ms": {choice: ms}}}
  in `Arch` order; method: how it was measured (repeats, warm-up, calibration, statistic).
  """

  genes: tuple[str, ...]
  layers: dict[str, dict[str, Any]]
  constant_ms: float
  batch_size: int
  device: dict[str, Any]
  method: dict[str, Any]

  def _lookup(self) -> np.ndarray:
    """[L, max+1 per gene] of ms, NaN where a choice is not in the table."""
    sizes = [1 + max(choice[g] for row in self.layers.values() for choice in row["ms"])
             for g in range(len(self.genes))]
    table = np.full((len(self.layers), *sizes), np.nan)
    for layer, row in enumerate(self.layers.values()):
      for choice, ms in row["ms"].items():
        table[(layer, *choice)] = ms
    return table

  def layer_sum(self, archs: Arch) -> np.ndarray:
    """Σ_l of the table's ms for one candidate ([L] arrays: a scalar) or a population [P]."""
    values = [np.asarray(getattr(archs, gene), np.int64) for gene in self.genes]
    lookup = self._lookup()
    if values[0].shape[-1] != lookup.shape[0]:
      raise ValueError(f"the latency table has {lookup.shape[0]} layers, the arch "
                       f"{values[0].shape[-1]}; measure a table for this supernet")
    clipped = tuple(np.clip(v, 0, size - 1) for v, size in zip(values, lookup.shape[1:]))
    per_layer = np.where(np.all([v == c for v, c in zip(values, clipped)], axis=0),
                         lookup[(np.arange(lookup.shape[0]), *clipped)], np.nan)
    if np.isnan(per_layer).any():
      where = np.isnan(per_layer)
      raise ValueError(f"the latency table has no entry for {self.genes} = "
                       f"{tuple(int(v[where][0]) for v in values)} of layer "
                       f"{list(self.layers)[np.argwhere(where)[0][-1]]}; measure a table for "
                       f"this search space")
    return per_layer.sum(-1)

  def latency(self, archs: Arch) -> np.ndarray:
    """Predicted ms per image batch: the table's sum plus the constant (scalar or [P])."""
    return self.layer_sum(archs) + self.constant_ms

  def minimum_ms(self) -> float:
    """The fastest candidate's latency: the sum of per-layer minima plus the constant."""
    return float(sum(min(row["ms"].values()) for row in self.layers.values())
                 + self.constant_ms)

  def check(self, space: SearchSpace) -> None:
    """Refuses a table whose layers, shapes or choices are not those of `space`."""
    check_timeable(space)
    names, genes = layer_names(space), gene_names(space)
    if tuple(self.layers) != names or self.genes != genes:
      raise ValueError(f"the latency table has layers {list(self.layers)} and genes "
                       f"{list(self.genes)}, the supernet {list(names)} and {list(genes)}; "
                       f"measure a table for this supernet")
    for layer, (name, row) in enumerate(self.layers.items()):
      shape = space.layers[layer]
      if list(row["shape"]) != [shape.dim, shape.hidden, shape.tokens]:
        raise ValueError(f"latency table layer {name} was measured at [D, H, T] = "
                         f"{list(row['shape'])}, the supernet's is "
                         f"{[shape.dim, shape.hidden, shape.tokens]}; measure a table for "
                         f"this supernet")
      expected = set(layer_choices(space, layer))
      if set(row["ms"]) != expected:
        raise ValueError(f"latency table layer {name} has choices {sorted(row['ms'])}, the "
                         f"supernet {sorted(expected)} ({list(self.genes)}); measure a table "
                         f"for this supernet")

  def to_dict(self) -> dict[str, Any]:
    return {"genes": list(self.genes), "constant_ms": self.constant_ms,
            "batch_size": self.batch_size, "device": self.device, "method": self.method,
            "layers": [{"name": name, "shape": list(row["shape"]),
                        "choices": [{**dict(zip(self.genes, choice)), "ms": ms}
                                    for choice, ms in row["ms"].items()]}
                       for name, row in self.layers.items()]}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> LatencyTable:
    genes = tuple(data["genes"])
    layers = {row["name"]: {"shape": list(row["shape"]),
                            "ms": {tuple(int(entry[g]) for g in genes): float(entry["ms"])
                                   for entry in row["choices"]}}
              for row in data["layers"]}
    return cls(genes, layers, float(data["constant_ms"]), int(data["batch_size"]),
               dict(data["device"]), dict(data["method"]))


_KEYS = ("genes", "constant_ms", "batch_size", "device", "method", "layers")


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


def _layer_call(shape: search_space.MoELayerShape, genes: Sequence[str], choice: Sequence[int],
                moe_settings: Mapping[str, Any], batch_size: int) -> Callable[[], Any]:
  """One MoE layer at `choice` as a standalone candidate has it, jitted on tokens [B, T, D]."""
  values = dict(zip(genes, choice))
  layer = moe.MoEFeedForward(shape.dim, shape.hidden, max_experts=values["num_experts"],
                             max_top_k=values["top_k"], rngs=nnx.Rngs(0), **moe_settings)
  graphdef, weights = nnx.split(layer)
  arch = tuple(jnp.int32(values[name]) for name in ("num_experts", "top_k"))
  apply = jax.jit(lambda weights, x: nnx.merge(graphdef, weights)(x, *arch)[0])
  tokens = jax.random.normal(jax.random.key(0), (batch_size, shape.tokens, shape.dim))
  return lambda: apply(weights, tokens)


def check_timeable(space: SearchSpace) -> None:
  """Refuses a space with layers other than MoE feed-forwards (a table times those alone),
  or with genes other than the MoE layers' (a table has no entries for widths or depths)."""
  staged = [gene.name for gene in space.genes if gene.name not in search_space.LAYER_GENES]
  if staged:
    raise ValueError(f"this supernet also searches {staged}, whose latency a table (per MoE "
                     f"layer choice) does not hold; use mac_budget, or a supernet with "
                     f"width_choices=(1.0,) and search_depth=False")
  kinds = sorted({type(shape).__name__ for shape in space.layers} - {"MoELayerShape"})
  if kinds or space.router is not None:
    raise ValueError(f"latency tables time MoE feed-forward layers (mobilevit), this supernet "
                     f"has {kinds or ['an image router']}; use mac_budget for conv MoE models "
                     f"(resnet_moe, vgg_moe)")


def measure_table(supernet: nnx.Module, *, batch_size: int = 1, repeats: int = 200,
                  warmup: int = 5, calibration: Sequence[Arch] | None = None) -> LatencyTable:
  """Times every (layer, choice) of `supernet`'s space and calibrates the constant on the
  `calibration` candidates (default: the smallest and the largest) on this process's device."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  space = supernet.search_space()
  check_timeable(space)
  genes = gene_names(space)
  moe_settings = dict(supernet.config["moe_settings"])
  if calibration is None:
    calibration = [space.smallest(), space.largest()]
  keys = [(shape, choice) for layer, shape in enumerate(space.layers)
          for choice in layer_choices(space, layer)]
  distinct = list(dict.fromkeys(keys))  # layers of equal shape: measured once
  calls = [_layer_call(shape, genes, choice, moe_settings, batch_size)
           for shape, choice in distinct]
  calls += [model_call(supernet, arch, batch_size) for arch in calibration]
  ms = time_calls(calls, repeats=repeats, warmup=warmup)  # one session: the same load for all
  measured = dict(zip(distinct, ms.tolist()))
  layers = {name: {"shape": [shape.dim, shape.hidden, shape.tokens],
                   "ms": {choice: measured[shape, choice]
                          for choice in layer_choices(space, layer)}}
            for layer, (name, shape) in enumerate(zip(layer_names(space), space.layers))}
  method = {"statistic": "median", "repeats": repeats, "warmup": warmup,
            "moe_settings": moe_settings,
            "calibration": [search_space.to_dict(arch) for arch in calibration],
            "constant": "mean over the calibration candidates of end-to-end ms minus the "
                        "table's sum (exported model, jitted predict)"}
  table = LatencyTable(genes, layers, 0.0, batch_size, device_description(), method)
  sums = table.layer_sum(search_space.stack(calibration))
  return dataclasses.replace(table, constant_ms=float(np.mean(ms[len(distinct):] - sums)))
