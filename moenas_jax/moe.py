"""Switch-style mixture-of-experts feed-forward block, sized at the search-space maxima.

One block holds E_max experts (each a D → H → D feed-forward) and a bias-free router. A
candidate architecture picks, per call, how many experts are active and how many each token
uses (`num_experts`, `top_k`: int32 arrays, so new values never recompile). With
`num_experts = 1, top_k = 1` and enough capacity the block is exactly the dense FFN of
expert 0. Tokens over capacity get zeros here; the caller's residual connection carries them.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moenas_jax import routing

ACTIVATIONS = {"gelu": jax.nn.gelu, "relu": jax.nn.relu, "relu6": jax.nn.relu6,
               "silu": jax.nn.silu}


def check_arch(num_experts: Any, top_k: Any, *, max_experts: int,
               max_top_k: int) -> tuple[np.ndarray, np.ndarray]:
  """Validates (num_experts, top_k) on the host and returns them as int32 arrays.

  Accepts any matching shapes: one layer (scalars), L layers ([L]) or a population ([P, L]).
  Raises ValueError naming the first bad position and value, before anything is traced.
  """
  experts, choices = np.asarray(num_experts), np.asarray(top_k)
  for name, values in (("num_experts", experts), ("top_k", choices)):
    if values.dtype.kind not in "iu":
      raise ValueError(f"{name} must hold integers, got dtype {values.dtype}: {values!r}")
  if experts.shape != choices.shape:
    raise ValueError(f"num_experts has shape {experts.shape} but top_k has shape "
                     f"{choices.shape}; give one value of each per MoE layer")
  checks = (
      (experts, (experts < 1) | (experts > max_experts), "num_experts",
       f"must be in 1..{max_experts} (max_experts)"),
      (choices, (choices < 1) | (choices > max_top_k), "top_k",
       f"must be in 1..{max_top_k} (max_top_k)"),
      (choices, choices > experts, "top_k", "must not exceed num_experts at the same position"),
  )
  for values, bad, name, rule in checks:
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f"{name}{list(where) if where else ''} = {values[where]} {rule}; "
                       f"got num_experts={experts.tolist()}, top_k={choices.tolist()}")
  return experts.astype(np.int32), choices.astype(np.int32)


class MoEFeedForward(nnx.Module):
  """Switch feed-forward block: router + E_max experts with capacity-bounded top-k dispatch.

  With `max_experts = 1` it is a plain feed-forward: no router, no capacity, no routing metrics
  beyond constants (the dense baselines and one-expert standalone layers).

  Tokens `[B, T, D]` are routed in groups: by default each example's T tokens form one group
  (so an image's output never depends on the rest of the batch); `group_size` instead splits
  all B · T tokens into groups of that many. `blocks_per_expert` sets the slot layout of
  `routing.CapacityPlan`: 1 is fastest; larger values bring the capacity of candidates whose
  expert count does not divide the block count closer to the Switch capacity.
  `normalize_gates` makes each token's kept gates sum to 1 (see `routing.route`), so outputs
  keep their scale across expert counts, as a weight-sharing supernet may want.
  """

  def __init__(self, dim: int, hidden_dim: int, *, max_experts: int, max_top_k: int = 1,
               capacity_factor_train: float = 1.25, capacity_factor_eval: float = 2.0,
               gate_noise_std: float = 0.0, load_balance_weight: float = 0.01,
               z_loss_weight: float = 1e-3, group_size: int | None = None,
               blocks_per_expert: int = 1, normalize_gates: bool = False,
               activation: str = "silu",
               dtype: Any = jnp.float32, rngs: nnx.Rngs):
    for name, value in (("dim", dim), ("hidden_dim", hidden_dim), ("max_experts", max_experts),
                        ("max_top_k", max_top_k), ("blocks_per_expert", blocks_per_expert),
                        ("group_size", 1 if group_size is None else group_size)):
      if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if max_top_k > max_experts:
      raise ValueError(f"max_top_k={max_top_k} exceeds max_experts={max_experts}; a token "
                       f"cannot choose more experts than exist")
    for name, value in (("capacity_factor_train", capacity_factor_train),
                        ("capacity_factor_eval", capacity_factor_eval)):
      if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r} (1.0 = an even spread)")
    for name, value in (("gate_noise_std", gate_noise_std),
                        ("load_balance_weight", load_balance_weight),
                        ("z_loss_weight", z_loss_weight)):
      if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    if activation not in ACTIVATIONS:
      raise ValueError(f"unknown activation {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    self.dim, self.hidden_dim = dim, hidden_dim
    self.max_experts, self.max_top_k = max_experts, max_top_k
    self.capacity_factor_train = float(capacity_factor_train)
    self.capacity_factor_eval = float(capacity_factor_eval)
    self.normalize_gates = normalize_gates
    self.gate_noise_std = gate_noise_std
    self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
    self.group_size, self.blocks_per_expert = group_size, blocks_per_expert
    self.activation, self.dtype = activation, dtype

    expert_init = nnx.initializers.lecun_normal(batch_axis=0)
    # With one expert there is nothing to route: the block is a plain feed-forward.
    self.router = (nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (dim, max_experts)))
                   if max_experts > 1 else None)
    self.w_in = nnx.Param(expert_init(rngs.params(), (max_experts, dim, hidden_dim)))
    self.b_in = nnx.Param(jnp.zeros((max_experts, hidden_dim)))
    self.w_out = nnx.Param(expert_init(rngs.params(), (max_experts, hidden_dim, dim)))
    self.b_out = nnx.Param(jnp.zeros((max_experts, dim)))

  def __call__(self, x: jax.Array, num_experts: jax.Array, top_k: jax.Array, *,
               train: bool = False,
               key: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the candidate (num_experts, top_k) to tokens x [B, T, D].

    Returns y [B, T, D] and the routing metrics of `routing.route`, plus `aux_loss`, the
    weighted load-balance and z losses to add to the task loss. `key` drives the gate noise
    and is needed in training when gate_noise_std > 0.
    """
    if x.ndim != 3 or x.shape[-1] != self.dim:
      raise ValueError(f"MoEFeedForward expects tokens [B, T, D={self.dim}], got shape "
                       f"{x.shape}; reshape feature maps [B, H, W, D] to [B, H*W, D]")
    if train and self.gate_noise_std > 0 and key is None:
      raise ValueError("gate_noise_std > 0 needs a PRNG key in training: pass key=...")
    batch, length, dim = x.shape
    group_size = self.group_size or length
    if (batch * length) % group_size:
      raise ValueError(f"group_size={group_size} does not divide the {batch * length} tokens "
                       f"of this batch ({batch} x {length}); choose a divisor or None")
    if self.router is None:
      return self._dense(x), {
          "load_balance_loss": jnp.ones(()), "z_loss": jnp.zeros(()), "aux_loss": jnp.zeros(()),
          "drop_fraction": jnp.zeros(()), "expert_counts": jnp.full((1,), batch * length)}
    groups = x.reshape(-1, group_size, dim)  # [G, N, D]
    logits = jnp.einsum("gnd,de->gne", groups.astype(jnp.float32), self.router[...])
    capacity_factor = self.capacity_factor_train if train else self.capacity_factor_eval
    dispatch, metrics = routing.route(
        logits, num_experts, top_k, max_top_k=self.max_top_k, capacity_factor=capacity_factor,
        blocks_per_expert=self.blocks_per_expert, normalize_gates=self.normalize_gates,
        noise_key=key if train else None, noise_std=self.gate_noise_std)

    blocks = dispatch.block_expert  # [M]
    tokens = dispatch.dispatch(groups.astype(self.dtype))  # [M, R, D]
    hidden = jnp.einsum("mrd,mdh->mrh", tokens, self.w_in[...][blocks].astype(self.dtype))
    hidden = hidden + self.b_in[...][blocks][:, None].astype(self.dtype)
    hidden = ACTIVATIONS[self.activation](hidden)
    out = jnp.einsum("mrh,mhd->mrd", hidden, self.w_out[...][blocks].astype(self.dtype))
    out = out + self.b_out[...][blocks][:, None].astype(self.dtype)
    y = dispatch.combine(out).reshape(x.shape).astype(x.dtype)

    metrics["aux_loss"] = (self.load_balance_weight * metrics["load_balance_loss"]
                           + self.z_loss_weight * metrics["z_loss"])
    return y, metrics

  def _dense(self, x: jax.Array) -> jax.Array:
    """The feed-forward of expert 0 on every token (the block when max_experts = 1)."""
    hidden = x.astype(self.dtype) @ self.w_in[...][0].astype(self.dtype) + self.b_in[...][0]
    hidden = ACTIVATIONS[self.activation](hidden.astype(self.dtype))
    out = hidden @ self.w_out[...][0].astype(self.dtype) + self.b_out[...][0]
    return out.astype(x.dtype)
