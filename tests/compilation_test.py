"""Tests of the compilation counter."""

import jax
import jax.numpy as jnp

from moenas_jax.compilation import count_compilations


def test_counts_each_new_signature_once_and_names_it():
  def scale(a, b):
    return a * b

  scaled = jax.jit(scale)
  x, y = jnp.ones(3), jnp.ones(4)
  with count_compilations() as seen:
    for value in (1.0, 2.0, 3.0):
      scaled(x, value).block_until_ready()
    scaled(y, 1.0).block_until_ready()  # a new shape compiles again
  assert seen.of("scale") == 2
  assert seen.count == 2
  with count_compilations() as later:
    scaled(x, 5.0).block_until_ready()  # cached: no compilation
  assert later.count == 0
