"""Forward+backward time of the MoE layer against a dense FFN on the same tokens.

Run: python -m benchmarks.moe_layer   (prints one JSON object)

The MoE layer (E=8, top-1, capacity factor 1.25, training mode) and a dense FFN with the same
D and H process the same 4096 tokens (64 images x 64 positions, routed per image). A one-group
variant routes all 4096 tokens together; `three_experts_ratio` runs the same layer as a
candidate with 3 active experts (same static work); `blocks_per_expert_2_ratio` prices the
finer slot layout (twice the blocks, closer to Switch capacity for expert counts that do not
divide 8); `all_experts_ms` runs every expert on every token, the cost that sparse dispatch
avoids. Timings interleave the contenders and take the median, so machine noise hits them
alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moenas_jax import moe, routing


def _timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) * 1e3


def _interleaved_medians(contenders: dict, x: jax.Array, repeats: int) -> dict[str, float]:
  """Median ms per call of each (fn, params), compiled first, then run in turns."""
  times = {name: [] for name in contenders}
  for fn, params in contenders.values():
    _timed(fn, params, x)
  for _ in range(repeats):
    for name, (fn, params) in contenders.items():
      times[name].append(_timed(fn, params, x))
  return {name: statistics.median(values) for name, values in times.items()}


def _grad_fn(forward, params):
  """(jit(grad) of mean(forward(params, x)^2) w.r.t. params and x, params)."""

  def loss(params, x):
    return jnp.mean(jnp.square(forward(params, x)))

  return jax.jit(jax.grad(loss, argnums=(0, 1))), params


def _moe(block: moe.MoEFeedForward, num_experts: int):
  graphdef, params = nnx.split(block)
  experts, top_k = jnp.int32(num_experts), jnp.int32(1)

  def forward(params, x):
    return nnx.merge(graphdef, params)(x, experts, top_k, train=True)[0]

  return _grad_fn(forward, params)


def _ffn_params(block: moe.MoEFeedForward) -> dict[str, jax.Array]:
  return {name: getattr(block, name)[...] for name in ("router", "w_in", "b_in", "w_out", "b_out")}


def _dense(block: moe.MoEFeedForward):
  """A dense FFN with expert 0's weights (its own arrays, so no gradient slicing)."""
  act = moe.ACTIVATIONS[block.activation]

  def forward(p, x):
    return act(x @ p["w_in"] + p["b_in"]) @ p["w_out"] + p["b_out"]

  return _grad_fn(forward, {k: v[0] for k, v in _ffn_params(block).items() if k != "router"})


def _all_experts(block: moe.MoEFeedForward):
  """Every expert on every token, mixed by the router's softmax."""
  act = moe.ACTIVATIONS[block.activation]

  def forward(p, x):
    gates = jax.nn.softmax(x @ p["router"])
    hidden = act(jnp.einsum("btd,edh->ebth", x, p["w_in"]) + p["b_in"][:, None, None])
    out = jnp.einsum("ebth,ehd->ebtd", hidden, p["w_out"]) + p["b_out"][:, None, None]
    return jnp.einsum("bte,ebtd->btd", gates, out)

  return _grad_fn(forward, _ffn_params(block))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=64)
  parser.add_argument("--positions", type=int, default=64)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--hidden", type=int, default=256)
  parser.add_argument("--experts", type=int, default=8)
  parser.add_argument("--capacity_factor", type=float, default=1.25)
  parser.add_argument("--repeats", type=int, default=30)
  args = parser.parse_args()

  tokens = args.images * args.positions
  x = jax.random.normal(jax.random.key(0), (args.images, args.positions, args.dim))
  settings = dict(max_experts=args.experts, max_top_k=1,
                  capacity_factor_train=args.capacity_factor)
  per_image = moe.MoEFeedForward(args.dim, args.hidden, **settings, rngs=nnx.Rngs(0))
  one_group = moe.MoEFeedForward(args.dim, args.hidden, **settings, group_size=tokens,
                                 rngs=nnx.Rngs(0))
  finer = moe.MoEFeedForward(args.dim, args.hidden, **settings, blocks_per_expert=2,
                             rngs=nnx.Rngs(0))

  contenders = {
      "moe": _moe(per_image, args.experts),
      "moe_one_group": _moe(one_group, args.experts),
      "moe_blocks_per_expert_2": _moe(finer, args.experts),
      "moe_3_experts": _moe(per_image, 3),
      "dense": _dense(per_image),
  }
  ms = _interleaved_medians(contenders, x, args.repeats)
  # All experts on all tokens is ~10x slower: timed apart, so it does not disturb the others.
  ms.update(_interleaved_medians({"all_experts": _all_experts(per_image)}, x,
                                 max(3, args.repeats // 5)))

  plans = {name: routing.make_plan(groups, size, args.experts, 1, args.capacity_factor)
           for name, groups, size in (("moe", args.images, args.positions),
                                      ("moe_one_group", 1, tokens))}
  print(json.dumps({
      "moe_ms": round(ms["moe"], 3),
      "dense_ms": round(ms["dense"], 3),
      "ratio": round(ms["moe"] / ms["dense"], 3),
      "one_group_ms": round(ms["moe_one_group"], 3),
      "one_group_ratio": round(ms["moe_one_group"] / ms["dense"], 3),
      "three_experts_ratio": round(ms["moe_3_experts"] / ms["dense"], 3),
      "blocks_per_expert_2_ratio": round(ms["moe_blocks_per_expert_2"] / ms["dense"], 3),
      "all_experts_ms": round(ms["all_experts"], 3),
      "all_experts_ratio": round(ms["all_experts"] / ms["dense"], 3),
      "slots_per_token": {name: round(plan.num_slots / tokens, 4) for name, plan in plans.items()},
      "block_size": {name: plan.block_size for name, plan in plans.items()},
      "tokens": tokens, "dim": args.dim, "hidden": args.hidden, "experts": args.experts,
      "top_k": 1, "capacity_factor": args.capacity_factor, "repeats": args.repeats,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "jax": jax.__version__,
  }))


if __name__ == "__main__":
  main()
