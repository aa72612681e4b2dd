r"""Runs (or resumes) a search: `run_search(config, workdir)` from the command line.

    python -m launch.search --workdir=runs/demo                       # configs/default.py
    python -m launch.search --workdir=runs/utk --config=configs/utkface.py \
        --config.data.manual_dir=/data/utkface --config.search.candidates=512

Running the same command again resumes the workdir (without --config, a workdir resumes
with the config it was made with). On a TPU pod slice, add --multihost to call
`jax.distributed.initialize()` on every host first. A bad config value stops it before any
work with one line, `error: config.<field>=<value>: <why>; <fix>`, and exit status 2.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from launch import common
from moenas_jax import search

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.CONFIGS, "workdir.py"), "Search config (a Python file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results go.",
                               required=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  config = _CONFIG.value
  common.run_or_exit(lambda: search.run_search(config, _WORKDIR.value, log=common.log))
  common.log(f"results in {os.path.join(_WORKDIR.value, 'results')}")


if __name__ == "__main__":
  app.run(main)
