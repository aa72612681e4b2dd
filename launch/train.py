r"""Trains one model from scratch with the config's recipe, tests it and exports it.

    python -m launch.train --workdir=runs/resnet --model=resnet
    python -m launch.train --workdir=runs/found_scratch --model=mobilevit_v2 \
        --arch='{"num_experts": [4, 1, 2, 2], "top_k": [1, 1, 2, 1]}'

The model lands in <workdir>/final (load it with moenas_jax.export.load), its test metrics in
<workdir>/results/train.json. Resumable like the search.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from launch import common
from moenas_jax import retrain, search_space

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.CONFIGS, "workdir.py"), "Data and training recipe.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results go.",
                               required=True)
_MODEL = flags.DEFINE_string("model", "mobilevit_v2_dense",
                             "A name of moenas_jax.models.MODELS (the dense one: config.model).")
_ARCH = flags.DEFINE_string("arch", None, "With --model=mobilevit_v2: the candidate, as JSON.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  arch = search_space.from_json(_ARCH.value) if _ARCH.value else None
  config = _CONFIG.value
  common.run_or_exit(lambda: retrain.run_train(config, _WORKDIR.value, _MODEL.value, arch,
                                                 log=common.log))


if __name__ == "__main__":
  app.run(main)
