"""Standalone models: a candidate cut out of the supernet, with its own shapes; save and load.

`standalone(supernet, arch)` is the candidate as a model of its own. `save` writes a trained
model as orbax weights plus `metadata.json` (model name and config, arch, class and group
names, input shape, preprocessing); `load` gives back an object with `predict(images)`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moenas_jax import checkpoint, hosts, models, search_space
from moenas_jax.search_space import Arch


def standalone(supernet: nnx.Module, arch: Arch) -> nnx.Module:
  """The candidate `arch` as its own model: layer l keeps its first num_experts[l] experts.

  The supernet's own class (any MoE family whose config has per-layer `max_experts` and
  `max_top_k`) built with the candidate's values as its maxima. Expert arrays keep their
  first experts: [E, ...] feed-forward weights, [D, E] router columns, and the first n · W
  output channels of a conv expert layer (`conv_moe`: `resnet_moe`, `vgg_moe`), whose image
  router keeps the first max(n) score columns (none if every n is 1). With width and depth
  genes (`mobilevit`), the model is built with the candidate's channels and depths
  (`staged_config`) and every weight and batch-norm statistic keeps its first channels, each
  stage its first layers. Every other weight and running statistic is copied as is. Called
  without an arch, the result computes what the supernet computes under `arch` (for MoE
  feed-forwards up to capacity: the standalone layers have exactly the Switch capacity of
  their own sizes).
  """
  space = supernet.search_space()
  arch = space.validate(arch)
  if arch.num_experts.ndim != 1:
    raise ValueError(f"standalone() takes one candidate, got a population of shape "
                     f"{arch.num_experts.shape}; unstack it first")
  used = space.used_layers(arch.depth)
  config = {**supernet.config, "max_experts": tuple(arch.num_experts[used].tolist()),
            "max_top_k": tuple(arch.top_k[used].tolist())}
  if arch.width is not None or arch.depth is not None:
    config.update(supernet.staged_config(arch))
  model = nnx.eval_shape(lambda: type(supernet)(**config, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  # Expert arrays, channels, channel blocks and router columns shrink to the candidate's
  # sizes (a prefix of each axis), stages to their first layers; one-expert layers have no
  # router; everything else keeps its shape.
  nnx.replace_by_pure_dict(state, _cut(nnx.to_pure_dict(state),
                                       nnx.to_pure_dict(nnx.state(supernet))))
  nnx.update(model, state)
  return model


def _cut(target, source):
  """Source values sliced to the target's shapes, for the keys of the target."""
  if isinstance(target, dict):
    return {key: _cut(value, source[key]) for key, value in target.items()}
  if isinstance(source, jax.ShapeDtypeStruct):  # an abstract supernet (nnx.eval_shape)
    return jax.ShapeDtypeStruct(target.shape, source.dtype)
  return source[tuple(slice(0, size) for size in target.shape)]


# ---------------------------------------------------------------------------------------------
# Saving and loading a trained model: orbax weights + JSON metadata, loadable anywhere.

PREPROCESSING = ("float32 images [B, H, W, C] with values in [0, 1] (uint8 pixels / 255), "
                 "RGB channel order for colour data")


@dataclasses.dataclass
class Exported:
  """A loaded model: `predict(images) -> logits`, its `metadata` and the NNX `model`."""

  model: nnx.Module
  metadata: dict[str, Any]

  def __post_init__(self):
    graphdef, params, state = models.split(self.model)
    self._logits = jax.jit(lambda images: models.apply(graphdef, params, state, images)[0])

  def predict(self, images: Any) -> jax.Array:
    """Logits [B, num_classes] of float32 images [B, H, W, C] in [0, 1]."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 3:
      raise ValueError(f"predict() takes a batch [B, H, W, C]; got one image "
                       f"{tuple(images.shape)}: add a leading axis (images[None])")
    return self._logits(images)


def save(directory: str | os.PathLike, model: nnx.Module, *, model_name: str,
         arch: Arch | None, class_names: Sequence[str], group_names: Sequence[str]) -> Path:
  """Writes `directory/weights/` (orbax) and `directory/metadata.json`; replaces atomically.

  Every process of a multi-process run calls it (orbax saves the weights together); process 0
  writes the metadata and moves the staged folder into place.
  """
  if model_name not in models.MODELS:
    raise ValueError(f"unknown model {model_name!r}; valid names: {sorted(models.MODELS)}")
  directory = Path(directory).absolute()
  metadata = {"model": model_name, "config": model.config,
              "arch": None if arch is None else search_space.to_dict(arch),
              "class_names": list(class_names), "group_names": list(group_names),
              "input_shape": list(model.input_shape), "preprocessing": PREPROCESSING}
  metadata = json.loads(json.dumps(metadata))
  staging = directory.with_name(f".{directory.name}.staging")  # one name for every process
  if hosts.is_writer():
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
  hosts.barrier(f"export {staging}")
  with checkpoint.Checkpointer(staging / "weights") as weights:
    _, params, state = models.split(model)
    weights.save(0, {"params": params, "state": state}, {"model": model_name})
  checkpoint.write_json_atomic(staging / "metadata.json", metadata)
  if hosts.is_writer():
    old = directory.with_name(f".{directory.name}.old")
    if directory.exists():
      shutil.rmtree(old, ignore_errors=True)
      os.replace(directory, old)
    os.replace(staging, directory)
    shutil.rmtree(old, ignore_errors=True)
  hosts.barrier(f"exported {directory}")
  return directory


def abstract(directory: str | os.PathLike) -> tuple[nnx.Module, dict[str, Any]]:
  """The model `save` wrote in `directory`, rebuilt from its metadata without weights
  (`nnx.eval_shape`: shapes only), and the metadata."""
  directory = Path(directory)
  if not (directory / "metadata.json").exists():
    raise FileNotFoundError(f"{directory} holds no exported model (no metadata.json); give the "
                            f"final/ folder of a search workdir, or a folder export.save wrote")
  metadata = checkpoint.read_json(directory / "metadata.json")
  return nnx.eval_shape(lambda: _build(metadata, 0)), metadata


def initialised(directory: str | os.PathLike, seed: int) -> nnx.Module:
  """The architecture `save` wrote in `directory` with fresh weights from `seed` (to train
  it from scratch)."""
  return _build(abstract(directory)[1], seed)


def _build(metadata: dict[str, Any], seed: int) -> nnx.Module:
  config = {key: tuple(value) if isinstance(value, list) else value
            for key, value in metadata["config"].items()}
  return models.build(metadata["model"], rngs=nnx.Rngs(seed), **config)


def load(directory: str | os.PathLike) -> Exported:
  """The model `save` wrote, rebuilt from its metadata and weights."""
  model, metadata = abstract(directory)
  _, params, state = models.split(model)
  with checkpoint.Checkpointer(directory / "weights") as weights:
    tree, _ = weights.restore(like={"params": params, "state": state})
  nnx.update(model, tree["params"], tree["state"])
  return Exported(model, metadata)
