"""Tests of checkpoints (save/restore/resume), atomic JSON files and the workdir config check."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moenas_jax import checkpoint
from moenas_jax.checkpoint import Checkpointer


def _tree():
  params = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
  return {"params": params, "opt": optax.adam(0.1).init(params), "count": jnp.int32(7),
          "key": jax.random.key(3)}


def _assert_trees_equal(actual, expected):
  """Same structure, dtypes and values (typed PRNG keys compared by their key data)."""
  def unwrap(x):
    return jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  chex.assert_trees_all_equal_structs(actual, expected)
  chex.assert_trees_all_equal_dtypes(actual, expected)
  chex.assert_trees_all_equal(jax.tree.map(unwrap, actual), jax.tree.map(unwrap, expected))


def test_round_trip_keeps_values_dtypes_and_meta(tmp_path):
  tree, meta = _tree(), {"cycle": 4, "history": [[1, 2], [3]], "best": None, "name": "x"}
  with Checkpointer(tmp_path / "supernet") as ckpt:
    assert ckpt.latest_step() is None
    ckpt.save(10, tree, meta)
  with Checkpointer(tmp_path / "supernet") as ckpt:  # a new process: everything from disk
    restored, restored_meta = ckpt.restore(like=tree)
  _assert_trees_equal(restored, tree)
  assert restored["params"]["b"].dtype == jnp.bfloat16
  assert isinstance(restored["opt"][0], optax.ScaleByAdamState)
  assert restored_meta == meta


def test_restore_into_an_abstract_tree(tmp_path):
  tree = _tree()
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, tree, {})
    restored, _ = ckpt.restore(1, like=jax.eval_shape(lambda: tree))
  _assert_trees_equal(restored, tree)


def test_nnx_state_round_trip_into_an_abstract_model(tmp_path):
  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.linear = nnx.Linear(3, 2, rngs=rngs)
      self.dropout = nnx.Dropout(0.5, rngs=rngs)  # holds an RNG key and count in its state

  graphdef, state = nnx.split(Tiny(nnx.Rngs(0, dropout=1)))
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state, {"stage": "supernet"})
    abstract = nnx.state(nnx.eval_shape(lambda: Tiny(nnx.Rngs(5, dropout=6))))
    restored, meta = ckpt.restore(like=abstract)
  assert isinstance(restored, nnx.State) and meta == {"stage": "supernet"}
  _assert_trees_equal(restored, state)
  x = jnp.array([[1.0, 2.0, 3.0]])
  np.testing.assert_array_equal(nnx.merge(graphdef, restored).linear(x),
                                nnx.merge(graphdef, state).linear(x))


def test_latest_step_and_max_to_keep(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=2) as ckpt:
    for step in (1, 2, 3, 4):
      ckpt.save(step, {"x": jnp.float32(step)}, {"step": step})
    assert ckpt.steps() == [3, 4] and ckpt.latest_step() == 4
    with pytest.raises(ValueError, match="not after the latest step 4"):
      ckpt.save(4, {"x": jnp.float32(0)}, {})
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
  with Checkpointer(tmp_path) as ckpt:
    tree, meta = ckpt.restore(3, like={"x": jnp.float32(0)})
    assert float(tree["x"]) == 3.0 and meta == {"step": 3}
    with pytest.raises(ValueError, match=r"no checkpoint of step 1 .* steps are \[3, 4\]"):
      ckpt.restore(1, like={"x": jnp.float32(0)})


def test_json_only_checkpoint(tmp_path):
  controller = {"population": [[8, 4], [2, 1]], "rewards": [0.5, 0.25], "cycle": 3}
  with Checkpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
      ckpt.restore()
    ckpt.save(3, None, controller)
    assert ckpt.restore() == (None, controller)


def test_unfinished_checkpoints_are_skipped_and_removed(tmp_path):
  with Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, {"x": jnp.float32(1)}, {"step": 1})
    ckpt.save(2, {"x": jnp.float32(2)}, {"step": 2})
  # A kill -9 during orbax's save leaves a temporary directory; a copy or a non-atomic file
  # system can leave a step directory without orbax's commit marker.
  shutil.copytree(tmp_path / "2", tmp_path / "3.orbax-checkpoint-tmp-1700000000")
  shutil.copytree(tmp_path / "2", tmp_path / "3")
  (tmp_path / "3" / "commit_success.txt").unlink()
  with Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 2
    tree, meta = ckpt.restore(like={"x": jnp.float32(0)})
    assert float(tree["x"]) == 2.0 and meta == {"step": 2}
    ckpt.save(3, {"x": jnp.float32(3)}, {"step": 3})  # the step number is free again
    assert ckpt.steps() == [2, 3]
  assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("_")) == ["2", "3"]


def test_a_damaged_checkpoint_names_the_directory_and_the_fix(tmp_path):
  with Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    ckpt.save(1, {"x": jnp.float32(1)}, {})
    ckpt.save(2, {"x": jnp.float32(2)}, {})
  (tmp_path / "2" / "tree" / "manifest.ocdbt").unlink()  # the array index is lost
  with Checkpointer(tmp_path) as ckpt, pytest.raises(
      ValueError, match=rf"{tmp_path / '2'} .* delete that directory to resume from step 1"):
    ckpt.restore(like={"x": jnp.float32(0)})


def test_meta_must_be_json(tmp_path):
  with Checkpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="Out of range float"):
    ckpt.save(1, None, {"loss": float("nan")})


def test_write_json_atomic_replaces_whole_files(tmp_path):
  path = tmp_path / "results" / "summary.json"
  checkpoint.write_json_atomic(path, {"a": [1, 2]})
  checkpoint.write_json_atomic(path, {"a": [3]})
  assert checkpoint.read_json(path) == {"a": [3]}
  assert [p.name for p in path.parent.iterdir()] == ["summary.json"]  # no temporary files
  with pytest.raises(TypeError, match="not JSON serializable"):
    checkpoint.write_json_atomic(path, {"a": object()})
  with pytest.raises(ValueError, match="Out of range float"):
    checkpoint.write_json_atomic(path, {"a": float("inf")})
  assert checkpoint.read_json(path) == {"a": [3]}
  assert [p.name for p in path.parent.iterdir()] == ["summary.json"]


def test_an_interrupted_write_leaves_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "summary.json"
  checkpoint.write_json_atomic(path, {"v": 1})

  def killed(*args):
    raise KeyboardInterrupt  # as if the process stopped between write and rename

  monkeypatch.setattr(checkpoint.os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.write_json_atomic(path, {"v": 2})
  assert json.loads(path.read_text()) == {"v": 1}
  assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_read_json_names_a_damaged_file(tmp_path):
  path = tmp_path / "config.json"
  path.write_text('{"a": 1')
  with pytest.raises(ValueError, match=f"{path} is not valid JSON"):
    checkpoint.read_json(path)


CONFIG = {"seed": 0, "workdir": "/tmp/a", "log_every": 10,
          "model": {"width": 8, "depths": (2, 4)}, "search": {"cycles": 5}}


def test_check_config(tmp_path):
  assert checkpoint.check_config(tmp_path, CONFIG) == []  # first use writes config.json
  assert checkpoint.read_json(tmp_path / "config.json")["model"]["depths"] == [2, 4]
  # The same config, tuples read back as lists, and keys that do not change results: accepted.
  same = {**CONFIG, "workdir": "/elsewhere", "log_every": 1,
          "model": {"width": 8, "depths": [2, 4]}}
  assert checkpoint.check_config(tmp_path, same) == []
  changed = {**CONFIG, "model": {"width": 16, "depths": (2, 4)}, "seed": 1, "new": True}
  with pytest.raises(ValueError) as error:
    checkpoint.check_config(tmp_path, changed)
  message = str(error.value)
  assert "model.width: 8 -> 16" in message and "seed: 0 -> 1" in message
  assert "new: <missing> -> True" in message and "search.cycles" not in message
  assert "--config.override_workdir=True" in message
  assert checkpoint.check_config(tmp_path, changed, ignore=("model", "seed", "new")) == []
  assert checkpoint.check_config(tmp_path, changed, override=True) == [
      "model.width", "new", "seed"]
  assert checkpoint.check_config(tmp_path, changed) == []  # config.json was rewritten
  with pytest.raises(ValueError, match="model.width: 16 -> 8"):
    checkpoint.check_config(tmp_path, CONFIG)
