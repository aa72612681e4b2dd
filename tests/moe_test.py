"""Tests of the MoE feed-forward block (tiny sizes: D=8, H=16, E_max=4)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import moe, routing
from moenas_jax.compilation import count_compilations

D, H, E = 8, 16, 4


def _block(**kwargs):
  settings = dict(max_experts=E, max_top_k=2, rngs=nnx.Rngs(0))
  settings.update(kwargs)
  return moe.MoEFeedForward(D, H, **settings)


def _tokens(batch=3, length=5, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, length, D))


def _reference(block, x, num_experts, top_k):
  """Every expert on every token (float64 numpy), mixed by the top-k active gates."""
  p = {name: np.asarray(getattr(block, name)[...], np.float64)
       for name in ("router", "w_in", "b_in", "w_out", "b_out")}
  x = np.asarray(x, np.float64)
  logits = x @ p["router"]
  logits[..., num_experts:] = -np.inf
  gates = np.exp(logits - logits.max(-1, keepdims=True))
  gates /= gates.sum(-1, keepdims=True)
  hidden = np.einsum("btd,edh->bteh", x, p["w_in"]) + p["b_in"]
  hidden = hidden / (1 + np.exp(-hidden))  # silu
  outs = np.einsum("bteh,ehd->bted", hidden, p["w_out"]) + p["b_out"]
  y = np.zeros_like(x)
  order = np.argsort(-gates, axis=-1, kind="stable")[..., :top_k]
  for b, t in np.ndindex(*x.shape[:2]):
    for e in order[b, t]:
      y[b, t] += gates[b, t, e] * outs[b, t, e]
  return y


@pytest.mark.parametrize("num_experts, top_k", [(1, 1), (2, 2), (3, 1), (3, 2), (4, 2)])
def test_equals_all_experts_reference_when_capacity_is_ample(num_experts, top_k):
  # Capacity factor 8 gives every expert room for all N * K tokens of a group.
  block = _block(capacity_factor_eval=8.0)
  x = _tokens()
  y, metrics = block(x, jnp.int32(num_experts), jnp.int32(top_k))
  chex.assert_shape(y, x.shape)
  np.testing.assert_allclose(y, _reference(block, x, num_experts, top_k), rtol=1e-4, atol=1e-5)
  assert float(metrics["drop_fraction"]) == 0.0
  assert int(metrics["expert_counts"].sum()) == x.shape[0] * x.shape[1] * top_k


def test_one_expert_top1_is_the_dense_ffn():
  block = _block(capacity_factor_eval=1.0)  # capacity ceil(5 * 1 * 1 / 1) = 5 = all tokens
  x = _tokens()
  y, _ = block(x, jnp.int32(1), jnp.int32(1))
  dense = jax.nn.silu(x @ block.w_in[...][0] + block.b_in[...][0])
  dense = dense @ block.w_out[...][0] + block.b_out[...][0]
  np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)


def test_a_one_expert_block_is_a_plain_feed_forward_without_router():
  block = moe.MoEFeedForward(D, H, max_experts=1, capacity_factor_eval=0.5, rngs=nnx.Rngs(0))
  assert block.router is None
  x = _tokens()
  y, metrics = block(x, jnp.int32(1), jnp.int32(1))
  dense = jax.nn.silu(x @ block.w_in[...][0] + block.b_in[...][0])
  dense = dense @ block.w_out[...][0] + block.b_out[...][0]
  np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-6)  # no capacity, nothing dropped
  assert float(metrics["aux_loss"]) == 0.0 and float(metrics["drop_fraction"]) == 0.0


def test_dropped_tokens_get_zero_and_kept_tokens_their_expert():
  # One expert, capacity factor 0.4: ceil(5 * 0.4) = 2 tokens per example are kept,
  # the first two; the other three are dropped (the caller's residual carries them).
  block = _block(capacity_factor_eval=0.4)
  x = _tokens()
  y, metrics = block(x, jnp.int32(1), jnp.int32(1))
  dense = jax.nn.silu(x @ block.w_in[...][0] + block.b_in[...][0])
  dense = dense @ block.w_out[...][0] + block.b_out[...][0]
  np.testing.assert_allclose(y[:, :2], dense[:, :2], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(y[:, 2:], 0.0)
  np.testing.assert_allclose(metrics["drop_fraction"], 3 / 5)


def test_an_example_does_not_depend_on_the_rest_of_the_batch():
  block = _block(capacity_factor_eval=1.0)
  x = _tokens(batch=4)
  y, _ = block(x, jnp.int32(3), jnp.int32(2))
  alone, _ = block(x[2:3], jnp.int32(3), jnp.int32(2))
  np.testing.assert_allclose(y[2:3], alone, rtol=1e-5, atol=1e-6)


def test_drops_with_several_experts_match_the_kept_choices():
  # Tight capacity (factor 0.5) with 3 of 4 experts and top-2: some choices are dropped.
  # Each token's output must be the gate-weighted sum over exactly its kept choices.
  block = _block(capacity_factor_eval=0.5)
  x = _tokens(batch=2, length=8)
  y, metrics = block(x, jnp.int32(3), jnp.int32(2))
  assert 0.1 < float(metrics["drop_fraction"]) < 0.9
  logits = jnp.einsum("gnd,de->gne", x, block.router[...])
  dispatch, _ = routing.route(logits, jnp.int32(3), jnp.int32(2), max_top_k=2,
                              capacity_factor=0.5)
  rows = dispatch.slot_token.shape[0] // dispatch.block_expert.shape[0]
  kept = np.asarray(dispatch.token_slot) < dispatch.slot_token.shape[0]
  expert = np.asarray(dispatch.block_expert)[np.minimum(dispatch.token_slot // rows,
                                                        dispatch.block_expert.shape[0] - 1)]
  p = {name: np.asarray(getattr(block, name)[...], np.float64)
       for name in ("w_in", "b_in", "w_out", "b_out")}
  hidden = np.einsum("btd,edh->bteh", np.asarray(x, np.float64), p["w_in"]) + p["b_in"]
  outs = np.einsum("bteh,ehd->bted", hidden / (1 + np.exp(-hidden)), p["w_out"]) + p["b_out"]
  expected = np.zeros(x.shape)
  for b, t, j in zip(*np.nonzero(kept)):
    expected[b, t] += dispatch.combine_weights[b, t, j] * outs[b, t, expert[b, t, j]]
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
  assert not kept.all() and kept.any()


def test_normalized_gates_sum_to_one_and_still_train_the_router():
  block = _block(normalize_gates=True, capacity_factor_eval=8.0)
  x = _tokens()
  y, _ = block(x, jnp.int32(4), jnp.int32(1))
  # Top-1 with normalized gates: each token gets exactly its expert's output.
  reference = _reference(block, x, 4, 1)
  logits = np.asarray(x @ block.router[...], np.float64)
  top_gate = 1 / np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)
  np.testing.assert_allclose(y, reference / top_gate[..., None], rtol=1e-4, atol=1e-5)
  forward, params = _population_fn(block)
  grads = jax.grad(lambda p: jnp.sum(forward(p, x, jnp.int32(4), jnp.int32(1), None)[0]))(params)
  assert float(jnp.abs(grads["router"][...]).sum()) > 0


def test_bfloat16_experts_stay_close_to_float32():
  x = _tokens()
  full, _ = _block()(x, jnp.int32(3), jnp.int32(2))
  half, _ = _block(dtype=jnp.bfloat16)(x, jnp.int32(3), jnp.int32(2))
  assert half.dtype == x.dtype
  np.testing.assert_allclose(half, full, rtol=0.05, atol=0.02)


def test_group_size_routes_across_examples():
  block = _block(group_size=15, capacity_factor_eval=8.0)
  x = _tokens(batch=4)  # 20 tokens do not split into groups of 15
  with pytest.raises(ValueError, match="group_size=15 does not divide the 20 tokens"):
    block(x, jnp.int32(2), jnp.int32(1))
  x = _tokens(batch=3)  # 15 tokens: one group
  y, _ = block(x, jnp.int32(2), jnp.int32(1))
  np.testing.assert_allclose(y, _reference(block, x, 2, 1), rtol=1e-4, atol=1e-5)


def test_aux_loss_is_the_weighted_sum():
  block = _block(load_balance_weight=0.5, z_loss_weight=0.25)
  _, m = block(_tokens(), jnp.int32(3), jnp.int32(1))
  np.testing.assert_allclose(m["aux_loss"], 0.5 * m["load_balance_loss"] + 0.25 * m["z_loss"],
                             rtol=1e-6)


def _population_fn(block):
  graphdef, params = nnx.split(block)

  def forward(params, x, num_experts, top_k, key):
    return nnx.merge(graphdef, params)(x, num_experts, top_k, train=True, key=key)

  return forward, params


def test_vmap_over_a_population_equals_a_loop_and_compiles_once():
  block = _block(gate_noise_std=0.1, capacity_factor_train=1.0)
  forward, params = _population_fn(block)
  population = jax.jit(jax.vmap(forward, in_axes=(None, 0, 0, 0, 0)))
  x = jax.random.normal(jax.random.key(2), (5, 3, 6, D))  # [P, B, T, D]
  keys = jax.random.split(jax.random.key(3), 5)
  first = (jnp.array([1, 2, 3, 4, 4], jnp.int32), jnp.array([1, 2, 1, 2, 1], jnp.int32))
  second = (jnp.array([4, 3, 2, 1, 3], jnp.int32), jnp.array([2, 2, 2, 1, 1], jnp.int32))
  with count_compilations() as seen:
    y1, m1 = population(params, x, *first, keys)
    y2, m2 = jax.block_until_ready(population(params, x, *second, keys))
  assert seen.count == 1
  single = jax.jit(forward)
  for p in range(5):
    y, m = single(params, x[p], first[0][p], first[1][p], keys[p])
    np.testing.assert_allclose(y1[p], y, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(jax.tree.map(lambda v: v[p], m1), m, rtol=1e-5, atol=1e-6)
  for p, n in enumerate(second[0].tolist()):
    assert int(m2["expert_counts"][p, n:].sum()) == 0


def test_gradients_are_finite_and_skip_inactive_experts():
  block = _block(gate_noise_std=0.5, capacity_factor_train=1.0)
  forward, params = _population_fn(block)

  def loss(params, x):
    y, metrics = forward(params, x, jnp.int32(3), jnp.int32(2), jax.random.key(4))
    return jnp.mean(jnp.square(y)) + metrics["aux_loss"]

  grads = jax.jit(jax.grad(loss))(params, _tokens(batch=4))
  chex.assert_tree_all_finite(grads)
  # Expert 3 is inactive: no token, no softmax mass, hence no gradient at all.
  for name in ("w_in", "b_in", "w_out", "b_out"):
    np.testing.assert_array_equal(grads[name][...][3], 0.0)
    assert float(jnp.abs(grads[name][...][:3]).sum()) > 0
  np.testing.assert_array_equal(grads["router"][...][:, 3], 0.0)
  assert float(jnp.abs(grads["router"][...][:, :3]).sum()) > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_experts=0), "max_experts must be a positive integer, got 0"),
    (dict(max_top_k=5), "max_top_k=5 exceeds max_experts=4"),
    (dict(capacity_factor_train=0.0), "capacity_factor_train must be > 0, got 0.0"),
    (dict(capacity_factor_eval=-1.0), "capacity_factor_eval must be > 0"),
    (dict(gate_noise_std=-0.1), "gate_noise_std must be >= 0"),
    (dict(group_size=0), "group_size must be a positive integer, got 0"),
    (dict(group_size=True), "group_size must be a positive integer, got True"),
    (dict(blocks_per_expert=0), "blocks_per_expert must be a positive integer"),
    (dict(activation="tanh"), "unknown activation 'tanh'; choose one of"),
])
def test_bad_static_sizes_fail_at_construction(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _block(**kwargs)


def test_bad_inputs_fail_with_a_clear_message():
  block = _block(gate_noise_std=0.1)
  with pytest.raises(ValueError, match=r"expects tokens \[B, T, D=8\], got shape \(2, 5, 6\)"):
    block(jnp.zeros((2, 5, 6)), jnp.int32(1), jnp.int32(1))
  with pytest.raises(ValueError, match="needs a PRNG key in training"):
    block(_tokens(), jnp.int32(1), jnp.int32(1), train=True)


def test_check_arch_accepts_valid_arrays_and_returns_int32():
  experts, top_k = moe.check_arch([[1, 4, 2], [3, 3, 1]], [[1, 2, 2], [1, 2, 1]],
                                  max_experts=4, max_top_k=2)
  assert experts.dtype == np.int32 and top_k.dtype == np.int32
  np.testing.assert_array_equal(experts, [[1, 4, 2], [3, 3, 1]])


@pytest.mark.parametrize("num_experts, top_k, message", [
    ([1, 5], [1, 1], r"num_experts\[1\] = 5 must be in 1..4 \(max_experts\)"),
    ([0, 2], [1, 1], r"num_experts\[0\] = 0 must be in 1..4"),
    ([2, 2], [1, 3], r"top_k\[1\] = 3 must be in 1..2 \(max_top_k\)"),
    ([2, 1], [1, 2], r"top_k\[1\] = 2 must not exceed num_experts"),
    ([2, 1], [1], r"num_experts has shape \(2,\) but top_k has shape \(1,\)"),
    ([2.0, 1.0], [1, 1], "num_experts must hold integers, got dtype float64"),
    (3, 0, r"top_k = 0 must be in 1..2"),
])
def test_check_arch_names_the_bad_value(num_experts, top_k, message):
  with pytest.raises(ValueError, match=message):
    moe.check_arch(num_experts, top_k, max_experts=4, max_top_k=2)
