"""Top-k token routing whose capacity follows the candidate architecture.

Axis letters: G routing groups · N tokens per group · D model width · E experts (the static
maximum E_max) · K choices per token (static maximum K_max) · M expert blocks · R rows per
block, over all groups (G · block_size).

A candidate layer has `num_experts = n ≤ E_max` active experts and `top_k = k ≤ K_max`
choices, both traced int32 scalars, so new values never recompile. Shapes stay static through
a `CapacityPlan`: each group's `N · K_max · capacity_factor` slots form M = r · E_max equal
blocks (r = `blocks_per_expert`), and the n active experts own ⌈M/n⌉ or ⌊M/n⌋ consecutive
whole blocks. An expert's capacity is the Switch capacity of the candidate,
`ceil(N · k · capacity_factor / n)`, bounded by the room of its blocks. The room always suffices
when n divides M (n = 1, 2, 4, 8 for E_max = 8, r = 1); otherwise the experts with one block
fewer hold up to 1/⌊M/n⌋ less, a bias that a larger r shrinks at the cost of more, smaller
matmuls. The expert work is one batched matmul over the M blocks, each with its own expert's
weights: about `N · K_max · capacity_factor` token-FFNs per group, never `N · E`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct


def capacity(num_tokens: int, top_k: int, capacity_factor: float, num_experts: int) -> int:
  """Switch capacity `ceil(tokens · k · capacity_factor / experts)`, in exact arithmetic.

  The factor is read as the decimal the user wrote (1.1 is 11/10), so 10 tokens at factor 1.1
  give 11 slots, not the 12 that float rounding of 10 * 1.1 would give.
  """
  factor = Fraction(float(capacity_factor)).limit_denominator(1_000_000)
  return math.ceil(num_tokens * top_k * factor / num_experts)


@dataclasses.dataclass(frozen=True)
class CapacityPlan:
  """Static slot layout of one layer call, shared by every candidate (n, k).

  `switch_capacity[n, k]` is the Switch capacity of a candidate (0 where k > n); each group
  has `num_blocks` blocks of `block_size` slots.
  """

  num_groups: int
  group_size: int
  num_blocks: int
  block_size: int
  switch_capacity: np.ndarray  # int32 [E+1, K+1]

  @property
  def num_slots(self) -> int:
    """Slots of all groups: M · G · block_size."""
    return self.num_blocks * self.num_groups * self.block_size

  def expert_blocks(self, num_experts: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int32 [E_max] first block and block count of each expert (0 blocks if inactive)."""
    experts = jnp.arange(self.switch_capacity.shape[0] - 1)
    base, extra = self.num_blocks // num_experts, self.num_blocks % num_experts
    count = jnp.where(experts < num_experts, base + (experts < extra), 0)
    return experts * base + jnp.minimum(experts, extra), count

  def block_expert(self, num_experts: jax.Array) -> jax.Array:
    """int32 [M]: the active expert that owns each block."""
    first, count = self.expert_blocks(num_experts)
    starts_before = (count > 0) & (first <= jnp.arange(self.num_blocks)[:, None])  # [M, E]
    return starts_before.sum(-1) - 1

  def expert_capacity(self, num_experts: jax.Array, top_k: jax.Array) -> jax.Array:
    """int32 [E_max]: choices each expert may take per group (0 if inactive)."""
    _, count = self.expert_blocks(num_experts)
    switch = jnp.asarray(self.switch_capacity)[num_experts, top_k]
    return jnp.minimum(switch, count * self.block_size)


@functools.lru_cache(maxsize=256)
def make_plan(num_groups: int, group_size: int, max_experts: int, max_top_k: int,
              capacity_factor: float, blocks_per_expert: int = 1) -> CapacityPlan:
  """The layout for G groups of N tokens: M = r · E_max blocks of the N · K_max · cf slots."""
  table = np.zeros((max_experts + 1, max_top_k + 1), np.int32)
  for n in range(1, max_experts + 1):
    for k in range(1, min(n, max_top_k) + 1):
      table[n, k] = capacity(group_size, k, capacity_factor, n)
  num_blocks = blocks_per_expert * max_experts
  return CapacityPlan(
      num_groups=num_groups, group_size=group_size, num_blocks=num_blocks,
      block_size=capacity(group_size, max_top_k, capacity_factor, num_blocks),
      switch_capacity=table)


@struct.dataclass
class Dispatch:
  """Where each token choice went; moves tokens into expert blocks and back.

  token_slot: int32 [G, N, K], flat slot of each kept choice (num_slots if not kept).
  slot_token: int32 [M · G · block_size], flat token of each slot (G · N if empty).
  combine_weights: float32 [G, N, K], gate of each kept choice (0 if not kept).
  block_expert: int32 [M], the expert whose weights each block uses.
  """

  token_slot: jax.Array
  slot_token: jax.Array
  combine_weights: jax.Array
  block_expert: jax.Array

  def dispatch(self, x: jax.Array) -> jax.Array:
    """[G, N, D] tokens → [M, R, D] expert inputs (zeros in empty slots)."""
    dim = x.shape[-1]
    padded = jnp.concatenate([x.reshape(-1, dim), jnp.zeros((1, dim), x.dtype)])
    return padded[self.slot_token].reshape(self.block_expert.shape[0], -1, dim)

  def combine(self, y: jax.Array) -> jax.Array:
    """[M, R, D] expert outputs → [G, N, D], the gate-weighted sum over kept choices."""
    flat = y.reshape(-1, y.shape[-1])
    picked = flat.at[self.token_slot].get(mode="fill", fill_value=0)  # [G, N, K, D]
    weights = self.combine_weights.astype(y.dtype)
    return jnp.einsum("gnk,gnkd->gnd", weights, picked)


def route(logits: jax.Array, num_experts: jax.Array, top_k: jax.Array, *, max_top_k: int,
          capacity_factor: float, blocks_per_expert: int = 1,
          normalize_gates: bool = False, noise_key: jax.Array | None = None,
          noise_std: float = 0.0) -> tuple[Dispatch, dict[str, jax.Array]]:
  """Routes the tokens of G groups to the top-k of the candidate's active experts.

  Args:
    logits: [G, N, E] router logits, cast to float32.
    num_experts: int32 scalar n; experts [0, n) are active, the others get no token and no
      softmax mass.
    top_k: int32 scalar k in [1, max_top_k]; choices [k, K) are masked.
    max_top_k: K, the static maximum of top_k.
    capacity_factor: per-expert slots relative to an even spread of the N · k choices.
    blocks_per_expert: r of the CapacityPlan (M = r · E_max blocks).
    normalize_gates: divide each token's kept gates by their sum, so the output scale does not
      shrink with n (the sum is held constant for gradients: the router still learns from
      the task loss, also at top-1). Off by default, as in Switch and V-MoE.
    noise_key: with noise_std > 0, Gaussian noise of that std is added to the logits.
    noise_std: standard deviation of the gate noise.

  Returns:
    The Dispatch, and metrics: `load_balance_loss` (Switch/GShard: n · Σ_e f_e · P_e over
    active experts, f_e the share of first choices sent to e before capacity, P_e the mean
    gate of e; 1 when balanced, n when collapsed onto one expert), `z_loss` (mean squared
    log-sum-exp of the active logits),
    `drop_fraction` (share of the choices dropped for lack of capacity) and `expert_counts`
    (int32 [E], choices kept per expert, summed over groups).
  """
  groups, tokens, experts = logits.shape
  # Validated on the host already; clipping keeps a stray value from producing NaNs here.
  num_experts = jnp.clip(num_experts, 1, experts)
  top_k = jnp.clip(top_k, 1, jnp.minimum(num_experts, max_top_k))
  plan = make_plan(groups, tokens, experts, max_top_k, capacity_factor, blocks_per_expert)
  logits = logits.astype(jnp.float32)
  if noise_key is not None and noise_std > 0:
    logits = logits + noise_std * jax.random.normal(noise_key, logits.shape, jnp.float32)
  active = jnp.arange(experts) < num_experts  # [E]
  logits = jnp.where(active, logits, -jnp.inf)
  gates = jax.nn.softmax(logits, axis=-1)  # [G, N, E]

  gate, expert = jax.lax.top_k(gates, max_top_k)  # [G, N, K]
  chosen = (jnp.arange(max_top_k) < top_k) & (expert < num_experts)
  one_hot = jax.nn.one_hot(expert, experts, dtype=jnp.int32) * chosen[..., None]  # [G,N,K,E]
  # Every first choice claims a slot before any second choice: count in (K, N) order.
  by_choice = one_hot.transpose(0, 2, 1, 3).reshape(groups, max_top_k * tokens, experts)
  earlier = jnp.cumsum(by_choice, axis=1) - by_choice
  position = (earlier * by_choice).sum(-1).reshape(groups, max_top_k, tokens)
  position = position.transpose(0, 2, 1)  # [G, N, K], place in the expert's buffer

  first_block, _ = plan.expert_blocks(num_experts)
  kept = chosen & (position < plan.expert_capacity(num_experts, top_k)[expert])
  block = first_block[expert] + position // plan.block_size
  group = jnp.arange(groups)[:, None, None]
  slot = (block * groups + group) * plan.block_size + position % plan.block_size
  token_slot = jnp.where(kept, slot, plan.num_slots)
  token = jnp.broadcast_to(group * tokens + jnp.arange(tokens)[:, None], token_slot.shape)
  slot_token = jnp.full((plan.num_slots,), groups * tokens, jnp.int32)
  slot_token = slot_token.at[token_slot.reshape(-1)].set(token.reshape(-1), mode="drop")
  combine_weights = jnp.where(kept, gate, 0.0)
  if normalize_gates:
    total = combine_weights.sum(-1, keepdims=True)
    combine_weights = combine_weights / jax.lax.stop_gradient(jnp.where(total > 0, total, 1.0))
  dispatch = Dispatch(token_slot=token_slot, slot_token=slot_token,
                      combine_weights=combine_weights,
                      block_expert=plan.block_expert(num_experts))

  share = one_hot[:, :, 0].mean(axis=1)  # [G, E], f_e over first choices
  mean_gate = gates.mean(axis=1)  # [G, E], P_e
  num_chosen = jnp.maximum(chosen.sum(), 1)
  metrics = {
      "load_balance_loss": (num_experts * (share * mean_gate).sum(-1)).mean(),
      "z_loss": jnp.square(jax.nn.logsumexp(logits, axis=-1)).mean(),
      "drop_fraction": 1.0 - kept.sum() / num_chosen,
      "expert_counts": (one_hot * kept[..., None]).sum(axis=(0, 1, 2)),
  }
  return dispatch, metrics
