"""Parameter and MAC counts measured on real models (not from formulas).

`count_macs` traces a function and adds up the multiply-accumulates of every matmul
(`dot_general`) and convolution in its jaxpr (also `layers.depthwise_conv`, a convolution
computed as shifted multiply-adds), so it counts what the code really computes.
Elementwise work (norms, activations, residual adds, pooling) is not counted, as in the
usual MAC figures of edge models. A scan counts its body `length` times, a cond its costliest
branch; while loops are refused. Counts cover the whole call: pass one image for per-image MACs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
from flax import nnx


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (nnx.Param leaves; running statistics excluded)."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _subjaxprs(params: dict[str, Any]) -> Iterator[jax.extend.core.Jaxpr]:
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _jaxpr_macs(jaxpr: jax.extend.core.Jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (v.aval.shape for v in eqn.invars)
      (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
      rhs_free = [d for i, d in enumerate(rhs) if i not in (*rhs_contract, *rhs_batch)]
      total += math.prod(lhs) * math.prod(rhs_free)
    elif eqn.primitive.name == "conv_general_dilated":
      kernel = eqn.invars[1].aval.shape
      out_channels = kernel[eqn.params["dimension_numbers"].rhs_spec[0]]
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(kernel) // out_channels
    elif eqn.params.get("name") == "depthwise_conv":  # layers.depthwise_conv, a jitted call
      kernel = eqn.invars[1].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * kernel[0] * kernel[1]
    elif eqn.primitive.name == "scan":
      total += eqn.params["length"] * _jaxpr_macs(eqn.params["jaxpr"].jaxpr)
    elif eqn.primitive.name == "cond":
      total += max(_jaxpr_macs(branch.jaxpr) for branch in eqn.params["branches"])
    elif eqn.primitive.name == "while":
      raise ValueError("count_macs cannot count a while loop (its trip count is dynamic); "
                       "use a scan or a Python loop")
    else:
      total += sum(_jaxpr_macs(sub) for sub in _subjaxprs(eqn.params))
  return total


def count_macs(fn: Callable[..., Any], *args: Any) -> int:
  """Multiply-accumulates of matmuls and convolutions in one call `fn(*args)`."""
  return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)
