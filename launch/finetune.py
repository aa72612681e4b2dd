r"""Fine-tunes an exported model on another dataset (a new head when the classes differ).

    python -m launch.finetune --from=runs/demo/final --workdir=runs/ft \
        --config=configs/default.py --config.data.name=npz \
        --config.data.manual_dir=/data/mine --config.train.learning_rate=3e-4

The dataset's images must have the model's input shape. The result lands in <workdir>/final,
its test metrics in <workdir>/results/finetune.json.
"""

from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

from launch import common
from moenas_jax import retrain

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(common.CONFIGS, "workdir.py"), "Data and training recipe.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and results go.",
                               required=True)
_FROM = flags.DEFINE_string("from", None, "An exported model: a search's <workdir>/final.",
                            required=True)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  common.setup()
  config = _CONFIG.value
  common.run_or_exit(lambda: retrain.run_finetune(config, _WORKDIR.value, _FROM.value,
                                                    log=common.log))


if __name__ == "__main__":
  app.run(main)
