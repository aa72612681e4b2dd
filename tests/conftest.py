"""Shared test fixtures: one tiny MoE supernet, one finished smoke search, one XLA cache.

Building a model compiles one initialiser per parameter shape (about 15 s on 2 CPU cores), so
tests share the tiny supernet, whose shapes are also the smoke config's. The session writes
compiled programs to a persistent XLA cache that subprocesses (resumed searches, the notebook's
kernel) inherit through JAX_COMPILATION_CACHE_DIR, so only the first of them compiles.

The suite runs on pytest-xdist workers, a test file at a time each (setup.cfg: `-n auto
--dist loadfile --no-loadscope-reorder`): the main process makes the cache and the workers
inherit it, so what one worker compiled another loads. The slowest files go first, in the
order of `_SLOWEST_FIRST`, so that the longest work starts first. The finished smoke search
is made once per session, in a folder the main process makes (`smoke_workdir`: the first
worker to need it runs it under a file lock, the others wait and read it; a worker killed
half way leaves a workdir the next one resumes), so the suite runs the smoke search from an
empty workdir once, and tests/multihost_test.py its reduced multi-process and
killed-and-resumed runs.
"""

import atexit
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from moenas_jax import models

if "PYTEST_XDIST_WORKER" in os.environ:  # a worker: the main process made both folders
  _CACHE, _SHARED = os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["MOENAS_TEST_SHARED"]
else:
  _CACHE = tempfile.mkdtemp(prefix="moenas_jax_xla_")
  _SHARED = tempfile.mkdtemp(prefix="moenas_jax_shared_")
  for folder in (_CACHE, _SHARED):
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"], os.environ["MOENAS_TEST_SHARED"] = _CACHE, _SHARED
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
# Tests run tiny programs, so compiling dominates: XLA:CPU without its expensive optimisation
# passes and fusion emitters compiles a supernet step in 6.7 s instead of 17.3 s (2-core CPU,
# 2026-12-02). Set before the first computation, so this process and its subprocesses use them.
_FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                 "--xla_cpu_use_fusion_emitters=false")
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

# 3 MoE layers of up to 3 experts, top-2; 28 -> 14 -> 7 -> 4 px; 10 classes (= configs/smoke.py).
TINY_SUPERNET = dict(num_classes=10, image_size=(28, 28), channels=3, width_multiplier=0.25,
                     depths=(1, 1, 1), strides=(2, 1, 2, 2, 1, 1), max_experts=3, max_top_k=2)


def random_examples(seed: int, size: int) -> dict[str, np.ndarray]:
  """Random uint8 28x28 RGB images, labels (10 classes) and groups (2), as `read_split` gives."""
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, 28, 28, 3), dtype=np.uint8),
          "label": rng.integers(0, 10, size).astype(np.int32),
          "group": rng.integers(0, 2, size).astype(np.int32)}


# search_test makes the smoke search while the other worker runs multihost_test (its own
# processes); notebook_test, which reads the smoke search, and proxy_test come next.
_SLOWEST_FIRST = ("search_test.py", "multihost_test.py", "notebook_test.py", "proxy_test.py",
                  "models_test.py", "population_test.py", "supernet_test.py", "trunk_test.py",
                  "advmoe_benchmark_test.py", "moe_test.py", "finetune_test.py",
                  "export_test.py", "latency_test.py", "routing_test.py")


def pytest_collection_modifyitems(items):
  """Orders the files by `_SLOWEST_FIRST`, then the rest as collected (a stable sort)."""
  def rank(item):
    name = item.path.name
    return _SLOWEST_FIRST.index(name) if name in _SLOWEST_FIRST else len(_SLOWEST_FIRST)
  items.sort(key=rank)


@pytest.fixture(scope="session")
def examples():
  """`random_examples(seed, size)`, for tests of evaluators on the tiny supernet."""
  return random_examples


def check_opens_without_tensorflow(tmp_path, name: str, **options) -> None:
  """Opens (and reads) a prepared dataset in a fresh process whose `tensorflow` is a stub that
  records any import: TFDS and etils would use it if they imported TensorFlow, as they might
  where the [tf] extra is installed."""
  stub = tmp_path / "stub" / "tensorflow"
  stub.mkdir(parents=True)
  marker = tmp_path / "imported"
  (stub / "__init__.py").write_text(
      f"open({str(marker)!r}, 'w').close()\nraise ImportError('stub tensorflow')\n")
  script = textwrap.dedent(f"""
      import sys
      from moenas_jax import data
      dataset = data.open_dataset({name!r}, {str(tmp_path / "tfds")!r}, **{options!r})
      dataset.splits["train"][0]
      assert "tensorflow" not in sys.modules
  """)
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(
      [str(stub.parent), os.getcwd(), os.environ.get("PYTHONPATH", "")])}
  subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
  assert not marker.exists()


@pytest.fixture(scope="session")
def opens_without_tensorflow():
  """`check_opens_without_tensorflow(tmp_path, name, **options)`."""
  return check_opens_without_tensorflow


@pytest.fixture(scope="session")
def tiny_supernet():
  """(model, graphdef, params, state) of the tiny supernet, seed 0."""
  model = models.build("mobilevit_v2", rngs=nnx.Rngs(0), **TINY_SUPERNET)
  return model, *models.split(model)


@pytest.fixture(scope="session")
def smoke_workdir():
  """The workdir of a finished, uninterrupted smoke search (configs/smoke.py), shared by every
  worker of the session: read it, or copy it to change it."""
  from configs import smoke
  from moenas_jax import search

  workdir = Path(_SHARED) / "smoke"
  with open(Path(_SHARED) / "smoke.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not (workdir / "results" / "summary.json").exists():
      search.run_search(smoke.get_config(), workdir, log=print)
  return workdir
