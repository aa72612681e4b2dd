"""What every launcher does around the library: flags for the process, jax setup, and bad
config values reported as one line with exit status 2. The default --config of every
launcher is configs/workdir.py: the workdir's own config.json when it has one."""

from __future__ import annotations

import logging as pylogging
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
from absl import flags, logging

from moenas_jax import settings

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() first (TPU pods, multi-GPU).")
_CACHE = flags.DEFINE_string(
    "compilation_cache_dir", os.path.expanduser("~/.cache/moenas_jax/xla"),
    "Persistent XLA compilation cache (a resumed or repeated run skips compiling); '' = off.")


_PROGRESS = pylogging.getLogger("moenas_jax")


def setup() -> None:
  """Multi-host initialisation, the compilation cache, and logging: our progress lines at
  INFO on stderr, other libraries' (orbax is chatty) at WARNING."""
  if _MULTIHOST.value:
    jax.distributed.initialize()
  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  logging.set_verbosity(logging.WARNING)
  handler = pylogging.StreamHandler(sys.stderr)
  handler.setFormatter(pylogging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
  _PROGRESS.handlers[:] = [handler]
  _PROGRESS.setLevel(pylogging.INFO)
  _PROGRESS.propagate = False
  log(f"jax {jax.__version__} on {jax.device_count()} {jax.default_backend()} device(s), "
      f"process {jax.process_index()} of {jax.process_count()}")


def log(message: str) -> None:
  """Progress lines: on the first process only."""
  if jax.process_index() == 0:
    _PROGRESS.info(message)


def run_or_exit(main: Callable[[], Any]) -> Any:
  """Runs `main`; a bad config value prints `error: config.<field>=<value>: <why>; <fix>`
  on stderr and exits with status 2, without a traceback."""
  try:
    return main()
  except settings.ConfigError as error:
    print(f"error: {error}", file=sys.stderr, flush=True)
    sys.exit(2)
