r"""The launchers' default config: the config a workdir was made with, else configs/default.py.

The launchers' `--workdir` names the workdir; when it holds a config.json (a run made there),
that config is the base and `--config.*` overrides apply to it, typed as it is, so a workdir
resumes (or gains baselines) with its own config:

    python -m launch.evaluate --workdir=runs/utk --config.baselines='("resnet",)'

`--config=<file>` replaces it. Also `--config=configs/workdir.py:<dir>` for another workdir's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ml_collections

from configs import default

# Keys the library adds to a workdir's config.json next to the config (moenas_jax/retrain.py).
_RUN_KEYS = ("train_model", "train_arch", "finetune_from")


def _workdir(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _tuples(tree):
  """JSON's lists back to the tuples configs hold."""
  if isinstance(tree, dict):
    return {key: _tuples(value) for key, value in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(value) for value in tree)
  return tree


def get_config(workdir: str | None = None) -> ml_collections.ConfigDict:
  config = default.get_config()  # its typed fields (e.g. the int budgets) type the overrides
  stored = Path(workdir or _workdir(sys.argv) or "") / "config.json"
  if (workdir or _workdir(sys.argv)) and stored.exists():
    values = json.loads(stored.read_text())
    config.update(_tuples({key: value for key, value in values.items()
                           if key not in _RUN_KEYS}))
  return config
