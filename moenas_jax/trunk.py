"""A frozen trunk (FaHaNa-style): its weights loaded from an exported model, its features cached.

A supernet's first stages (`MobileViTV2.freeze_trunk`) hold no searched gene, so every
candidate computes the same features there. Frozen (left out of the optimizer, batch norm in
evaluation mode), they are computed once per image (`FeatureCache`) and the search trains
and scores only the tail on them. `check_trunk` compares the trunk weights of an exported
model (`export.save`, e.g. `<workdir>/final` of an earlier search) with a supernet's from
their shapes alone (nothing compiles, no weight is read); `load_trunk` copies them in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from moenas_jax import export, models
from moenas_jax.data import lighting, pipeline


def _flat_shapes(state: nnx.State, names: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
  """'stem/conv/kernel' → shape, for the leaves under the top-level `names`."""
  return {"/".join(map(str, path)): tuple(leaf.get_value().shape)
          for path, leaf in nnx.to_flat_state(state) if path[0] in names}


def check_trunk(model: nnx.Module, directory: str | Path) -> None:
  """Raises ValueError, naming the first difference, unless the model exported in `directory`
  has the frozen trunk of `model` (`model.frozen_names()`) with the same shapes."""
  try:
    exported, metadata = export.abstract(directory)
  except FileNotFoundError as error:
    raise ValueError(str(error)) from None
  except (ValueError, TypeError) as error:
    raise ValueError(f"the model exported in {directory} cannot be rebuilt: {error}") from None
  names = model.frozen_names()
  want, have = _flat_shapes(nnx.state(model), names), _flat_shapes(nnx.state(exported), names)
  for path in sorted(set(want) | set(have)):
    if want.get(path) != have.get(path):
      raise ValueError(
          f"the trunk exported in {directory} (model {metadata['model']!r}) does not fit the "
          f"supernet's frozen stages {names}: {path} is {have.get(path, 'missing')} there and "
          f"{want.get(path, 'missing')} in the supernet; export the trunk from a model with "
          f"the same config.model (width_multiplier, strides) and channels, or train it here "
          f"(supernet.trunk_checkpoint='')")


def load_trunk(model: nnx.Module, directory: str | Path) -> None:
  """Copies the frozen trunk's weights and batch-norm statistics from the model exported in
  `directory` into `model` (`check_trunk` first)."""
  check_trunk(model, directory)
  source = nnx.to_pure_dict(nnx.state(export.load(directory).model))
  target = nnx.state(model)
  nnx.replace_by_pure_dict(target, {**nnx.to_pure_dict(target),
                                    **{name: source[name] for name in model.frozen_names()}})
  nnx.update(model, target)


class FeatureCache:
  """The frozen trunk of `model` as one compiled function, `trunk_features`, over batches."""

  def __init__(self, model: nnx.Module, batch_size: int):
    graphdef, self.params, self.state = models.split(model)
    self.batch_size = batch_size

    def trunk_features(params, state, images, kind, severity):
      """The trunk's features of a batch under lighting perturbation (kind, severity)."""
      return nnx.merge(graphdef, params, state).trunk(
          lighting.perturb_indexed(images, kind, severity))

    self._features = jax.jit(trunk_features)

  def features(self, examples: pipeline.Examples, perturbation: tuple[int, float] = (0, 0)
               ) -> pipeline.Examples:
    """`examples` with float32 trunk features in place of the images, of the images under
    `perturbation` (`lighting.indexed`; (0, 0): clean)."""
    kind, severity = np.int32(perturbation[0]), np.float32(perturbation[1])
    computed = [np.asarray(self._features(self.params, self.state, batch["image"], kind,
                                          severity))[batch["mask"]]
                for batch in pipeline.eval_batches(examples, self.batch_size)]
    return {**examples, "image": np.concatenate(computed)}
