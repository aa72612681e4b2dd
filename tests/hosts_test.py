"""hosts.py with one process: plain reads, placements and no-op barriers (tests/multihost_test.py
runs two processes)."""

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS

from moenas_jax import hosts, population


def test_one_process_writes_and_reads_plainly():
  assert hosts.is_writer()
  tree = {"a": jax.numpy.arange(3), "b": np.float32(2.0)}
  host = hosts.to_host(tree)
  assert isinstance(host["a"], np.ndarray) and host["a"].tolist() == [0, 1, 2]
  assert host["b"] == 2.0
  hosts.barrier("nothing to wait for")
  calls = []
  assert hosts.writer_first("once", lambda: calls.append(1) or "done") == "done"
  assert calls == [1]


def test_put_places_host_arrays_with_the_sharding():
  mesh = population.make_mesh(data_parallel=jax.device_count())
  sharding = NamedSharding(mesh, PS(mesh.axis_names))
  batch = {"image": np.arange(24, dtype=np.float32).reshape(4, 6), "label": np.arange(4)}
  placed = hosts.put(batch, sharding)
  for name, value in placed.items():
    assert value.sharding == sharding
    np.testing.assert_array_equal(np.asarray(value), batch[name])
    assert value.dtype == jax.device_put(batch[name]).dtype  # int64 -> int32, as jax does
