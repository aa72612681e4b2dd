"""Checkpoints and crash-safe files: the one module that writes what a resumed run reads.

- `Checkpointer`: numbered checkpoints of one pipeline stage (a pytree of arrays and a JSON dict
  saved together) on an orbax `CheckpointManager`.
- `write_atomic`, `write_json_atomic`, `read_json`: files that are either the old or the new
  version after a kill -9, never a mix (write a temporary file, fsync, rename); written by
  process 0 alone.
- `check_config`: refuses to resume a workdir made with a different config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orbax.checkpoint as ocp
from absl import logging

from moenas_jax import hosts

if TYPE_CHECKING:
  from typing import Self  # Python >= 3.11; annotations are not evaluated at run time

# Config keys that do not change results: a workdir may be resumed with other values for them.
IGNORED_CONFIG_KEYS = ("workdir", "override_workdir", "log_every")


class Checkpointer:
  """Checkpoints of one stage in `directory` (e.g. `workdir/checkpoints/supernet`).

  Step k lives in `directory/k/` with two items: `tree` (a pytree of arrays: plain dicts,
  `nnx.State`, optax states, typed PRNG keys; orbax `StandardSave`) and `meta` (a JSON dict;
  `JsonSave`). Saving is synchronous: orbax writes `k.orbax-checkpoint-tmp-*/`, adds
  `commit_success.txt` and renames it to `k/`, so after a kill -9 the directory holds the
  previous complete steps and at most an unfinished one, which is deleted when the stage is
  opened again (a temporary directory, or a step directory without the commit marker, as a
  copy or a non-atomic file system can leave). One run per directory at a time; in a
  multi-process run every process opens it and calls `save` and `restore` (orbax
  coordinates them; process 0 deletes unfinished steps, the others wait for it).
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2):
    self.directory = Path(directory).absolute()
    if hosts.is_writer():
      _remove_unfinished_steps(self.directory)
    hosts.barrier(f"checkpoint {self.directory}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False,
        cleanup_tmp_directories=True, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def steps(self) -> list[int]:
    """The complete checkpoints, oldest first."""
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest complete checkpoint, or None if the stage has none (a fresh start)."""
    return self._manager.latest_step()

  def save(self, step: int, tree: Any, meta: Mapping[str, Any] | None = None) -> None:
    """Saves `tree` (None: a JSON-only checkpoint) and `meta` as step `step`; returns when done.

    The oldest steps beyond `max_to_keep` are deleted afterwards.
    """
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
      raise TypeError(f"checkpoint meta must be a dict of JSON values, got {type(meta)}")
    try:
      json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
      raise type(err)(f"cannot save step {step} meta in {self.directory}: {err}; convert it "
                      "to JSON types (NaN to None) first") from err
    items = {"meta": ocp.args.JsonSave(dict(meta))}
    if tree is not None:
      items["tree"] = ocp.args.StandardSave(tree)
    if not self._manager.save(step, args=ocp.args.Composite(**items)):
      raise ValueError(f"cannot save step {step} in {self.directory}: it is not after the "
                       f"latest step {self.latest_step()}; steps must increase")
    self._manager.wait_until_finished()

  def restore(self, step: int | None = None, *, like: Any = None) -> tuple[Any, dict]:
    """Step `step` (default: the latest) as `(tree, meta)`.

    The tree takes the structure, dtypes and shardings of `like`: concrete arrays, or an
    abstract tree (`jax.eval_shape`, `nnx.eval_shape`). `like=None` restores only `meta`
    (the returned tree is None), e.g. for a JSON-only checkpoint.
    """
    steps = self.steps()
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint in {self.directory}; check "
                              "latest_step() is not None before restoring")
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f"no checkpoint of step {step} in {self.directory}; the complete "
                       f"steps are {steps}")
    items = {"meta": ocp.args.JsonRestore()}
    if like is not None:
      items["tree"] = ocp.args.StandardRestore(like)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as err:  # orbax raises many types; one message says what to do
      earlier = [s for s in steps if s < step]
      fallback = (f"resume from step {earlier[-1]}" if earlier else "start this stage again")
      raise ValueError(
          f"cannot restore checkpoint {self.directory / str(step)} ({type(err).__name__}: "
          f"{err}). If the model or config changed, use a new workdir; if the checkpoint is "
          f"damaged, delete that directory to {fallback}.") from err
    return (restored["tree"] if like is not None else None), dict(restored["meta"])

  def close(self) -> None:
    self._manager.close()

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _remove_unfinished_steps(directory: Path) -> None:
  """Deletes step directories (plain integer names) that lack orbax's commit marker."""
  if not directory.is_dir():
    return
  for path in sorted(directory.iterdir()):
    if path.is_dir() and path.name.isdigit() and not ocp.step.is_path_finalized(
        path, temporary_path_cls=ocp.path.atomicity.CommitFileTemporaryPath):
      logging.warning("Deleting unfinished checkpoint %s (no %s): the run resumes from the "
                      "previous complete step", path, ocp.path.atomicity.COMMIT_SUCCESS_FILE)
      shutil.rmtree(path)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` so that a crash leaves the old file or the new one, whole.

  A temporary file in the same directory is written and fsynced, then renamed over `path`
  (`os.replace` is atomic on POSIX); the directory is fsynced so the rename survives too.
  In a multi-process run only process 0 writes (`hosts.is_writer`); the others return.
  """
  if not hosts.is_writer():
    return
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  data = data.encode() if isinstance(data, str) else data
  handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(data)
      file.flush()
      os.fsync(file.fileno())
    os.replace(temporary, path)
  except BaseException:
    Path(temporary).unlink(missing_ok=True)
    raise
  _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
  handle = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(handle)
  finally:
    os.close(handle)


def write_json_atomic(path: str | os.PathLike, obj: Any, *, allow_nan: bool = False) -> None:
  """`obj` as indented JSON, written with `write_atomic`.

  Strict JSON by default: NaN and infinities raise (`allow_nan` writes Python's NaN/Infinity).
  Serialisation happens before anything is written, so a value JSON cannot hold leaves the
  old file intact.
  """
  try:
    text = json.dumps(obj, indent=2, allow_nan=allow_nan) + "\n"
  except (TypeError, ValueError) as err:
    raise type(err)(f"cannot write {path}: {err}; convert values to JSON types (NaN to None) "
                    "first") from err
  write_atomic(path, text)


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`; a damaged file gives a ValueError naming it."""
  text = Path(path).read_text()
  try:
    return json.loads(text)
  except json.JSONDecodeError as err:
    raise ValueError(f"{path} is not valid JSON ({err}); restore or delete it") from err


def check_config(workdir: str | os.PathLike, config: Mapping[str, Any], *,
                 override: bool = False,
                 ignore: Collection[str] = IGNORED_CONFIG_KEYS) -> list[str]:
  """Refuses a workdir made with another config; returns the differing keys.

  The first call writes `workdir/config.json` (process 0 only: `write_atomic`). Later calls
  compare `config` (a nested dict, e.g. `ConfigDict.to_dict()`) with it, key by dotted key,
  skipping `ignore` (a dotted key skips its whole subtree). A difference raises ValueError
  listing the keys, unless `override`, which rewrites config.json with `config` and goes on.
  """
  path = Path(workdir) / "config.json"
  # Tuples become lists, as in the stored file; values JSON lacks are compared as text.
  current = json.loads(json.dumps(config, default=str))
  if not path.exists():
    write_json_atomic(path, current, allow_nan=True)
    return []
  differences = _differences(_flatten(read_json(path)), _flatten(current), ignore)
  if differences and not override:
    listed = "\n".join(f"  {key}: {old} -> {new}" for key, old, new in differences)
    raise ValueError(
        f"{Path(workdir)} was made with a different config ({path}):\n{listed}\nUse a new "
        f"workdir, or resume this one with the new config by passing override=True (from the "
        f"launcher: --config.override_workdir=True).")
  if differences:
    logging.warning("Overriding the config of %s: %s", workdir, [d[0] for d in differences])
    write_json_atomic(path, current, allow_nan=True)
  return [key for key, _, _ in differences]


_MISSING = "<missing>"


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}; an empty dict is kept as a value."""
  if not isinstance(tree, dict) or not tree:
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
  return flat


def _differences(old: dict[str, Any], new: dict[str, Any],
                 ignore: Collection[str]) -> list[tuple[str, Any, Any]]:
  def ignored(key: str) -> bool:
    return any(key == name or key.startswith(f"{name}.") for name in ignore)

  return [(key, old.get(key, _MISSING), new.get(key, _MISSING))
          for key in sorted(set(old) | set(new))
          if not ignored(key) and old.get(key, _MISSING) != new.get(key, _MISSING)]
