"""Tests of moenas_jax.routing on hand-derived examples (G=1 group unless said)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moenas_jax import routing
from moenas_jax.compilation import count_compilations


@pytest.mark.parametrize("tokens, k, factor, experts, expected", [
    (10, 1, 1.1, 1, 11),  # 10 * 1.1 is 11.000000000000002 in floats; exactly 11 slots
    (64, 1, 1.25, 8, 10),  # ceil(80 / 8)
    (4096, 1, 1.25, 8, 640),
    (4096, 1, 1.25, 3, 1707),  # ceil(5120 / 3)
    (6, 2, 1.0, 4, 3),  # ceil(12 / 4)
    (5, 1, 0.5, 2, 2),  # ceil(2.5 / 2)
])
def test_capacity_is_exact_switch_formula(tokens, k, factor, experts, expected):
  assert routing.capacity(tokens, k, factor, experts) == expected
  assert routing.capacity(tokens, k, np.float32(factor), experts) == expected  # from configs


def test_plan_gives_whole_blocks_to_active_experts():
  # 4096 tokens, E_max=8, K_max=1, cf=1.25: 5120 slots = 8 blocks of 640.
  plan = routing.make_plan(1, 4096, 8, 1, 1.25)
  assert (plan.num_blocks, plan.block_size, plan.num_slots) == (8, 640, 5120)
  # n=3: 8 blocks split 3, 3, 2; Switch capacity ceil(5120 / 3) = 1707 fits 3 blocks (1920)
  # but not 2 (1280).
  first, count = plan.expert_blocks(jnp.int32(3))
  np.testing.assert_array_equal(first[:3], [0, 3, 6])
  np.testing.assert_array_equal(count, [3, 3, 2, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(plan.block_expert(jnp.int32(3)), [0, 0, 0, 1, 1, 1, 2, 2])
  np.testing.assert_array_equal(plan.expert_capacity(jnp.int32(3), jnp.int32(1)),
                                [1707, 1707, 1280, 0, 0, 0, 0, 0])
  # Expert counts that divide the 8 blocks get exactly the Switch capacity.
  for n in (1, 2, 4, 8):
    expected = [routing.capacity(4096, 1, 1.25, n)] * n + [0] * (8 - n)
    np.testing.assert_array_equal(plan.expert_capacity(jnp.int32(n), jnp.int32(1)), expected)
    np.testing.assert_array_equal(plan.block_expert(jnp.int32(n)), np.arange(8) * n // 8)


def test_more_blocks_per_expert_bring_capacity_closer_to_switch():
  # 16 blocks of 320: n=3 splits 6, 5, 5 -> room 1920, 1600, 1600 (Switch: 1707).
  plan = routing.make_plan(1, 4096, 8, 1, 1.25, blocks_per_expert=2)
  assert (plan.num_blocks, plan.block_size) == (16, 320)
  np.testing.assert_array_equal(plan.expert_capacity(jnp.int32(3), jnp.int32(1))[:3],
                                [1707, 1600, 1600])


# A worked example: 4 tokens, E_max=4 with expert 3 inactive (n=3), K_max=2, cf=1.
# Expert 3 has the best logit of token 2 but must get nothing.
LOGITS = np.array([[
    [2.0, 1.0, 0.0, 0.0],
    [2.0, 0.0, 1.0, 0.0],
    [0.0, 2.0, 0.5, 9.0],
    [3.0, 0.0, 1.0, 0.0],
]], np.float32)


def _softmax3(row):
  e = np.exp(np.asarray(row[:3], np.float64))
  return e / e.sum()


def _route(num_experts, top_k, **kwargs):
  return routing.route(jnp.asarray(LOGITS), jnp.int32(num_experts), jnp.int32(top_k),
                       max_top_k=2, capacity_factor=1.0, **kwargs)


def test_top1_gates_slots_and_drops_by_hand():
  # Layout: 4 * 2 * 1.0 = 8 slots = 4 blocks of 2. n=3 owns blocks {0,1}, {2}, {3}.
  # Top-1 capacity ceil(4 * 1 / 3) = 2. First choices: t0->e0, t1->e0, t2->e1, t3->e0.
  # e0 takes t0 (slot 0) and t1 (slot 1); t3 comes third and is dropped; t2 -> e1's
  # first block 2, slot 4.
  dispatch, metrics = _route(3, 1)
  np.testing.assert_array_equal(dispatch.token_slot[0, :, 0], [0, 1, 4, 8])
  np.testing.assert_array_equal(dispatch.token_slot[0, :, 1], [8, 8, 8, 8])  # masked choice
  np.testing.assert_array_equal(dispatch.slot_token, [0, 1, 4, 4, 2, 4, 4, 4])  # 4 = empty
  np.testing.assert_array_equal(dispatch.block_expert, [0, 0, 1, 2])
  expected_gates = [_softmax3(LOGITS[0, 0])[0], _softmax3(LOGITS[0, 1])[0],
                    _softmax3(LOGITS[0, 2])[1], 0.0]
  np.testing.assert_allclose(dispatch.combine_weights[0, :, 0], expected_gates, rtol=1e-6)
  np.testing.assert_array_equal(dispatch.combine_weights[0, :, 1], 0.0)
  np.testing.assert_array_equal(metrics["expert_counts"], [2, 1, 0, 0])
  np.testing.assert_allclose(metrics["drop_fraction"], 0.25)


def test_all_first_choices_claim_slots_before_second_choices():
  # Top-2 capacity ceil(4 * 2 / 3) = 3, bounded by room 4, 2, 2 -> [3, 2, 2].
  # First choices: e0 <- t0, t1, t3 (positions 0, 1, 2: all kept), e1 <- t2.
  # Second choices, in token order: t0->e1 (position 1, kept), t1->e2 (0), t2->e2 (1),
  # t3->e2 (position 2 = capacity: dropped), although t3's first choice was kept.
  dispatch, metrics = _route(3, 2)
  np.testing.assert_array_equal(dispatch.token_slot[0, :, 0], [0, 1, 4, 2])
  np.testing.assert_array_equal(dispatch.token_slot[0, :, 1], [5, 6, 7, 8])
  np.testing.assert_array_equal(metrics["expert_counts"], [3, 2, 2, 0])
  np.testing.assert_allclose(metrics["drop_fraction"], 1 / 8)
  second = [_softmax3(LOGITS[0, 0])[1], _softmax3(LOGITS[0, 1])[2], _softmax3(LOGITS[0, 2])[2],
            0.0]
  np.testing.assert_allclose(dispatch.combine_weights[0, :, 1], second, rtol=1e-6)


def test_aux_losses_on_a_worked_example():
  # Two tokens, n=2 of E_max=3 (expert 2's large logit is masked away), top-1.
  # t0 logits (0, 0): gates (1/2, 1/2), picks e0. t1 (ln 3, 0): gates (3/4, 1/4), picks e0.
  # f = (1, 0); P = (5/8, 3/8); load balance = n * sum f * P = 2 * 5/8 = 1.25.
  # z-loss = mean(logsumexp^2) = ((ln 2)^2 + (ln 4)^2) / 2.
  logits = jnp.array([[[0.0, 0.0, 7.0], [math.log(3.0), 0.0, 7.0]]])
  _, metrics = routing.route(logits, jnp.int32(2), jnp.int32(1), max_top_k=1,
                             capacity_factor=2.0)
  np.testing.assert_allclose(metrics["load_balance_loss"], 1.25, rtol=1e-6)
  np.testing.assert_allclose(metrics["z_loss"], (math.log(2) ** 2 + math.log(4) ** 2) / 2,
                             rtol=1e-6)


def test_balanced_routing_has_unit_load_balance_loss():
  # Each of 4 tokens prefers a different expert by the same margin: f = P = 1/4 each.
  logits = jnp.eye(4)[None] * 2.0
  _, metrics = routing.route(logits, jnp.int32(4), jnp.int32(1), max_top_k=1,
                             capacity_factor=1.0)
  np.testing.assert_allclose(metrics["load_balance_loss"], 1.0, rtol=1e-6)
  np.testing.assert_array_equal(metrics["expert_counts"], [1, 1, 1, 1])


def test_load_balance_counts_first_choices():
  # n=2, top-2, both tokens put e0 first: f = (1, 0) although second choices all go to e1.
  # Gates (3/4, 1/4) for both tokens: P = (3/4, 1/4), loss = 2 * 3/4 = 1.5 (collapsed
  # towards the maximum n = 2), not the 1.0 of a balanced router.
  logits = jnp.array([[[math.log(3.0), 0.0], [math.log(3.0), 0.0]]])
  _, metrics = routing.route(logits, jnp.int32(2), jnp.int32(2), max_top_k=2,
                             capacity_factor=2.0)
  np.testing.assert_allclose(metrics["load_balance_loss"], 1.5, rtol=1e-6)


def test_out_of_range_values_inside_jit_are_clipped_not_nan():
  # Host validation rejects these; inside traced code they must not poison the step.
  reference, ref_metrics = _route(3, 2)
  too_many, metrics = _route(3, 3)  # top_k above K_max and n: clipped to 2
  chex.assert_trees_all_equal(reference, too_many)
  _, zero = _route(0, 0)  # clipped to one expert, top-1
  chex.assert_tree_all_finite(zero)
  np.testing.assert_array_equal(zero["expert_counts"], [4, 0, 0, 0])


def test_gate_noise_follows_the_key_only():
  plain, _ = _route(3, 2)
  same, _ = _route(3, 2, noise_key=jax.random.key(0), noise_std=0.0)
  noisy_a, _ = _route(3, 2, noise_key=jax.random.key(0), noise_std=1.0)
  noisy_b, _ = _route(3, 2, noise_key=jax.random.key(0), noise_std=1.0)
  noisy_c, _ = _route(3, 2, noise_key=jax.random.key(1), noise_std=1.0)
  chex.assert_trees_all_equal(plain, same)
  chex.assert_trees_all_equal(noisy_a, noisy_b)
  assert not np.array_equal(noisy_a.combine_weights, noisy_c.combine_weights)
  assert not np.array_equal(plain.combine_weights, noisy_a.combine_weights)


def test_groups_are_routed_independently():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(3, 6, 4)), jnp.float32)
  both, metrics = routing.route(logits, jnp.int32(3), jnp.int32(2), max_top_k=2,
                                capacity_factor=0.7)
  # Group 1 alone: same kept choices and gates as inside the batch of groups.
  alone, _ = routing.route(logits[1:2], jnp.int32(3), jnp.int32(2), max_top_k=2,
                           capacity_factor=0.7)
  kept = both.token_slot[1] < both.slot_token.shape[0]
  np.testing.assert_array_equal(kept, alone.token_slot[0] < alone.slot_token.shape[0])
  np.testing.assert_array_equal(both.combine_weights[1], alone.combine_weights[0])
  assert 0.0 < float(metrics["drop_fraction"]) < 1.0


def test_new_architecture_values_never_recompile():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 4)), jnp.float32)

  def route_fn(logits, num_experts, top_k):
    return routing.route(logits, num_experts, top_k, max_top_k=2, capacity_factor=1.25)

  routed = jax.jit(route_fn)
  pairs = [(1, 1), (2, 1), (2, 2), (3, 2), (4, 1), (4, 2)]
  args = [(jnp.int32(n), jnp.int32(k)) for n, k in pairs]
  with count_compilations() as seen:
    counts = [jax.block_until_ready(routed(logits, n, k)[1]["expert_counts"]) for n, k in args]
  assert seen.of("route_fn") == 1
  for (n, _), count in zip(pairs, counts):
    assert int(count[n:].sum()) == 0  # no token reaches an inactive expert
