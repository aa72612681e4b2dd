"""Several processes (`jax.distributed.initialize`, one per host): who writes, and host reads.

Every process runs the same program on the same data and holds the same host values; arrays
span the devices of all of them. Process 0 alone writes files (`is_writer`); the others keep
in memory what the run needs. The workdir must be one shared folder (orbax checkpoints need
that anyway). With one process these are plain reads and no-ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def is_writer() -> bool:
  """Whether this process writes result files, configs and exports (process 0)."""
  return jax.process_index() == 0


def to_host(tree: Any) -> Any:
  """NumPy copies of a pytree's arrays on every process (`jax.device_get`); an array split
  over devices of other processes is gathered from them first."""
  def read(value: Any) -> Any:
    if (isinstance(value, jax.Array) and not value.is_fully_addressable
        and not value.is_fully_replicated):
      return multihost_utils.process_allgather(value, tiled=True)
    return jax.device_get(value)

  return jax.tree.map(read, tree)


def put(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host arrays that every process holds whole (e.g. a batch) as global arrays with
  `sharding`: each process copies only its own devices' slices (`jax.device_put` would
  also compare the whole arrays across processes)."""
  return jax.tree.map(lambda value: jax.make_array_from_callback(
      np.shape(value), sharding, lambda index: value[index]), tree)


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def writer_first(name: str, fn: Callable[[], T]) -> T:
  """`fn()` on process 0, then on the others once it is done: e.g. preparing files once
  that every process then reads."""
  result = fn() if is_writer() else None
  barrier(name)
  return result if is_writer() else fn()
