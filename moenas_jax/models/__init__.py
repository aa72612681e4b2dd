"""Model families by name, and the pure-function view used under jit and vmap.

Every model is an NNX module called as `model(images, arch=None, *, train, key)` and returning
`(logits, aux)`, where `aux["aux_loss"]` is the routing loss to add in training (0 for dense
models). `apply` runs a model from its split state, so jitted code takes and returns pytrees.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from moenas_jax.models import layers, mobilenet, mobilevit, resnet, resnet_moe, vgg_moe

MODELS: dict[str, Callable[..., nnx.Module]] = {
    mobilevit.NAME: mobilevit.MobileViTV2,
    f"{mobilevit.NAME}_dense": mobilevit.dense,
    mobilenet.NAME: mobilenet.MobileNetV2,
    resnet.NAME: resnet.ResNet,
    resnet_moe.NAME: resnet_moe.ResNetMoE,
    f"{resnet_moe.NAME}_dense": resnet_moe.dense,
    vgg_moe.NAME: vgg_moe.VGGMoE,
    f"{vgg_moe.NAME}_dense": vgg_moe.dense,
}


def build(name: str, *, rngs: nnx.Rngs, **config: Any) -> nnx.Module:
  """The model called `name`, built from its config keywords."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}")
  return MODELS[name](rngs=rngs, **config)


def split(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, state): trainable parameters apart from running statistics."""
  return nnx.split(model, nnx.Param, ...)


def apply(graphdef: nnx.GraphDef, params: nnx.State, state: nnx.State, images: jax.Array,
          arch: Any = None, *, train: bool = False,
          key: jax.Array | None = None) -> tuple[jax.Array, nnx.State, dict[str, Any]]:
  """Pure call: (logits, new state, aux). The state changes only in training (batch norm)."""
  model = nnx.merge(graphdef, params, state, copy=True)
  logits, aux = model(images, arch, train=train, key=key)
  return logits, nnx.state(model, nnx.Not(nnx.Param)), aux


def batch_statistics(graphdef: nnx.GraphDef, params: nnx.State, state: nnx.State,
                     images: jax.Array, arch: Any = None) -> nnx.State:
  """The batch-norm statistics of one batch alone: its mean and (biased) variance per layer.

  Routing and everything else run as in evaluation; each batch norm normalises with the
  batch's own statistics, as in training, and records them unmixed (momentum 0), so the
  mean of this over batches is a candidate's recalibrated state (SPOS, OFA, BigNAS).
  """
  model = nnx.merge(graphdef, params, state, copy=True)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, layers.ConvBN):
      module.recalibrating = True
      module.norm.momentum = 0.0
  model(images, arch, train=False)
  return nnx.state(model, nnx.Not(nnx.Param))
