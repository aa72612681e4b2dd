"""Standalone models: a candidate cut out of the supernet, with the candidate's own shapes."""

from __future__ import annotations

import jax
from flax import nnx

from moenas_jax.models.mobilevit import MobileViTV2
from moenas_jax.search_space import Arch


def standalone(supernet: MobileViTV2, arch: Arch) -> MobileViTV2:
  """The candidate `arch` as its own model: layer l keeps its first num_experts[l] experts.

  Every other weight and running statistic is copied as is. Called without an arch, the
  result computes what the supernet computes under `arch` (up to capacity: the standalone
  layers have exactly the Switch capacity of their own sizes).
  """
  arch = supernet.search_space().validate(arch)
  if arch.num_experts.ndim != 1:
    raise ValueError(f"standalone() takes one candidate, got a population of shape "
                     f"{arch.num_experts.shape}; unstack it first")
  config = {**supernet.config, "max_experts": tuple(arch.num_experts.tolist()),
            "max_top_k": tuple(arch.top_k.tolist())}
  model = nnx.eval_shape(lambda: MobileViTV2(**config, rngs=nnx.Rngs(0)))
  state = nnx.state(model)
  # Expert arrays ([E, ...]) and router columns ([D, E]) shrink to the candidate's sizes; a
  # one-expert layer has no router; everything else keeps its shape.
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
