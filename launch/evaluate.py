r"""Trains and tests dense baselines next to a finished search, and rewrites its report.

    python -m launch.evaluate --workdir=runs/demo \
        --config.baselines='("mobilevit_v2_dense", "mobilenet_v2", "resnet")'

Same data, recipe (config.train) and metrics as the found model; the comparison table in
results/report.md and summary.json["baselines"] gain the new rows.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from launch import common
from moenas_jax import search

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.CONFIGS, "workdir.py"), "The search's config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A finished search's workdir.", required=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  config = _CONFIG.value
  common.run_or_exit(lambda: search.run_baselines(config, _WORKDIR.value, log=common.log))


if __name__ == "__main__":
  app.run(main)
