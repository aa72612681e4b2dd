"""A Llama decoder in pure JAX with a KV cache: one forward pass serves the prompt (prefill)
and each generated token (decode).

Axis letters: B sequences · T new tokens · S cache slots (= positions) · D width · F
feed-forward width · H query heads · K key/value heads (grouped-query attention: G = H / K
query heads share one) · E head width · V vocabulary · L layers. Layers run under one
`lax.scan` over the stacked per-layer weights (one layer's graph to compile). A token at
position p attends to the cache's slots 0..p−1 and to itself (the new tokens causally);
its key and value then go to slot p, so padding after the prompt is masked and later
overwritten. Decode updates the donated cache in place, outside the layer scan. Shapes are
static: the caller pads the prompt to a bucket, and each (bucket, cache size, B) compiles
once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from moenas_jax.llm.gguf_model import LlamaConfig

Cache = dict[str, jax.Array]  # {"k", "v"}: [L, B, S, K, E]


def init_cache(config: LlamaConfig, batch: int, size: int) -> Cache:
  shape = (config.num_layers, batch, size, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + eps) * weight


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotates adjacent pairs (2i, 2i+1) of x [B, T, heads, E] by position · theta^(−2i/E)."""
  half = x.shape[-1] // 2
  angles = positions[..., None] * theta ** (-jnp.arange(half) / half)  # [B, T, E/2]
  cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
  pairs = x.reshape(*x.shape[:-1], half, 2)
  even, odd = pairs[..., 0], pairs[..., 1]
  return jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1).reshape(x.shape)


def _attention(config: LlamaConfig, layer: dict[str, jax.Array], x: jax.Array,
               positions: jax.Array, k_cache: jax.Array, v_cache: jax.Array):
  """Self-attention of x [B, T, D] over the earlier slots of the cache [B, S, K, E] and the
  new tokens (causal); returns (output [B, T, D], the new keys and values [B, T, K, E])."""
  (b, t, _), heads, groups = x.shape, config.num_kv_heads, config.num_heads // config.num_kv_heads
  q = rope((x @ layer["wq"]).reshape(b, t, heads * groups, -1), positions, config.rope_theta)
  k = rope((x @ layer["wk"]).reshape(b, t, heads, -1), positions, config.rope_theta)
  v = (x @ layer["wv"]).reshape(b, t, heads, -1)
  slots = k_cache.shape[1]
  earlier = jnp.broadcast_to(jnp.arange(slots) < positions[:, :1, None], (b, t, slots))
  causal = jnp.broadcast_to(jnp.tri(t, dtype=bool), (b, t, t))
  visible = jnp.concatenate([earlier, causal], -1)  # [B, T, S + T]
  q = q.reshape(b, t, heads, groups, -1) / jnp.sqrt(q.shape[-1])  # head h uses K/V h // G
  scores = jnp.concatenate([jnp.einsum("btkge,bske->btkgs", q, k_cache),
                            jnp.einsum("btkge,bske->btkgs", q, k)], -1)  # the cache is not copied
  weights = jax.nn.softmax(jnp.where(visible[:, :, None, None], scores, -jnp.inf), -1)
  out = (jnp.einsum("btkgs,bske->btkge", weights[..., :slots], v_cache)
         + jnp.einsum("btkgs,bske->btkge", weights[..., slots:], v))
  return out.reshape(b, t, -1) @ layer["wo"], k, v


def forward(params: dict[str, Any], tokens: jax.Array, positions: jax.Array, cache: Cache,
            config: LlamaConfig) -> tuple[jax.Array, Cache]:
  """(final-normed hidden states [B, T, D], the new tokens' keys and values [L, B, T, K, E])
  of tokens [B, T] at consecutive positions, after the cache's earlier slots."""
  def block(h, xs):
    layer, k_cache, v_cache = xs
    attended, k, v = _attention(config, layer, rms_norm(h, layer["attn_norm"], config.norm_eps),
                                positions, k_cache, v_cache)
    h = h + attended
    x = rms_norm(h, layer["ffn_norm"], config.norm_eps)
    h = h + (jax.nn.silu(x @ layer["w_gate"]) * (x @ layer["w_up"])) @ layer["w_down"]
    return h, (k, v)

  h = params["embed"][tokens]
  h, (k, v) = jax.lax.scan(block, h, (params["layers"], cache["k"], cache["v"]))
  return rms_norm(h, params["norm"], config.norm_eps), {"k": k, "v": v}


def logits(params: dict[str, Any], hidden: jax.Array) -> jax.Array:
  """[..., V] from hidden states [..., D] (the embedding when the output is tied to it)."""
  if "output" in params:
    return hidden @ params["output"]
  return hidden @ params["embed"].T


@functools.partial(jax.jit, static_argnames=("config", "cache_size"))
def prefill(params: dict[str, Any], tokens: jax.Array, length: jax.Array, *,
            config: LlamaConfig, cache_size: int) -> tuple[jax.Array, Cache]:
  """One prompt, tokens [T] padded after its `length` real ones: (logits [V] of its last
  token, cache [L, 1, cache_size, K, E])."""
  positions = jnp.arange(tokens.shape[0])[None]
  hidden, new = forward(params, tokens[None], positions, init_cache(config, 1, 0), config)
  pad = [(0, 0), (0, 0), (0, cache_size - tokens.shape[0]), (0, 0), (0, 0)]
  return logits(params, hidden[0, length - 1]), jax.tree.map(lambda c: jnp.pad(c, pad), new)


@functools.partial(jax.jit, static_argnames="config", donate_argnames="cache")
def decode(params: dict[str, Any], tokens: jax.Array, positions: jax.Array, cache: Cache, *,
           config: LlamaConfig) -> tuple[jax.Array, Cache]:
  """One token per sequence, tokens [B] at positions [B]: (logits [B, V], cache)."""
  hidden, new = forward(params, tokens[:, None], positions[:, None], cache, config)
  rows = jnp.arange(tokens.shape[0])
  cache = {name: cache[name].at[:, rows, positions].set(new[name][:, :, 0]) for name in cache}
  return logits(params, hidden[:, 0]), cache
