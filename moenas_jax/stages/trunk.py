"""Stage 1a, with `supernet.frozen_stages` > 0: the frozen trunk and its cached features.

The trunk (the supernet's first `frozen_stages` stages) is loaded from
`supernet.trunk_checkpoint` (an exported model) or trained as part of the whole supernet for
`supernet.trunk_steps` steps (`checkpoints/trunk`, resumable); then it is frozen and the
features of every split are computed once, in memory (recomputed on a resume: one trunk
forward per image). The robustness split's features are those of each of the search's
lighting perturbations of its images (the trunk sees the changed light), one split per
perturbation. The supernet stage then trains the tail on the features.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from moenas_jax import settings, trunk
from moenas_jax.data import lighting
from moenas_jax.stages import supernet as supernet_stage
from moenas_jax.stages.data import Data


def freeze_trunk(config: Any, supernet_model: nnx.Module, data: Data, workdir: Path,
                 log: Callable[[str], None]) -> Data:
  """Loads or trains the trunk's weights into `supernet_model`, freezes it (the model takes
  features from now on: `MobileViTV2.freeze_trunk`) and returns the splits as its features."""
  cfg = config.supernet
  if cfg.trunk_checkpoint:
    supernet_model.freeze_trunk(cfg.frozen_stages)
    trunk.load_trunk(supernet_model, cfg.trunk_checkpoint)
    log(f"[trunk] {supernet_model.frozen_names()} loaded from {cfg.trunk_checkpoint}")
  else:
    nnx.update(supernet_model, *supernet_stage.train_supernet(
        config, supernet_model, data, workdir, log, name="trunk", steps=cfg.trunk_steps))
    supernet_model.freeze_trunk(cfg.frozen_stages)

  of = trunk.FeatureCache(supernet_model, config.data.eval_batch_size).features

  perturbations = lighting.indexed(settings.lighting_set(config.search.lighting_severities))
  train = of(data.train)
  features = dataclasses.replace(
      data, train=train, held=of(data.held), search=of(data.search),
      robust=[of(data.robust, perturbation) for perturbation in perturbations],
      test=of(data.test), image_shape=train["image"].shape[1:])
  log(f"[trunk] features {features.image_shape} of {len(data.train['label'])} train, "
      f"{len(data.search['label'])} search ({len(perturbations)} lighting changes of "
      f"{len(data.robust['label'])}), {len(data.test['label'])} test images")
  return features
