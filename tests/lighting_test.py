"""Tests of the lighting perturbations: values by hand, range, monotone severity, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moenas_jax.data import lighting

IMAGES = jax.random.uniform(jax.random.key(0), (4, 6, 5, 3))


def test_the_set_has_five_kinds_at_five_severities():
  assert len(lighting.LIGHTING_SET) == 25
  assert {kind for kind, _ in lighting.LIGHTING_SET} == {
      "brightness", "contrast", "gamma", "exposure", "temperature"}


def test_values_by_hand():
  pixel = jnp.full((1, 1, 1, 3), 0.5)
  np.testing.assert_allclose(lighting.perturb(pixel, "brightness", 2), 0.7, rtol=1e-6)
  np.testing.assert_allclose(lighting.perturb(pixel, "gamma", 1), 0.5 ** 1.3, rtol=1e-6)
  np.testing.assert_allclose(lighting.perturb(pixel, "exposure", 2), 0.25, rtol=1e-6)
  np.testing.assert_allclose(lighting.perturb(pixel, "temperature", 5)[0, 0, 0],
                             [0.7, 0.5, 0.3], rtol=1e-6)
  two = jnp.array([0.2, 0.6]).reshape(1, 1, 2, 1)  # mean 0.4; keeps 0.7 of the +-0.2 deviation
  np.testing.assert_allclose(lighting.perturb(two, "contrast", 2).ravel(), [0.26, 0.54],
                             rtol=1e-6)


@pytest.mark.parametrize("kind", sorted(lighting.KINDS))
def test_range_is_preserved_and_severity_is_monotone(kind):
  distances = []
  for severity in lighting.SEVERITIES:
    out = lighting.perturb(IMAGES, kind, severity)
    assert out.shape == IMAGES.shape and out.dtype == IMAGES.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    distances.append(float(jnp.abs(out - IMAGES).mean()))
  assert distances[0] > 0
  assert all(a < b for a, b in zip(distances, distances[1:])), distances


def test_jit_and_vmap_over_severities():
  batched = jax.jit(jax.vmap(lambda s: lighting.perturb(IMAGES, "gamma", s)))(
      jnp.arange(1, 6))
  for i, severity in enumerate(lighting.SEVERITIES):
    np.testing.assert_allclose(batched[i], lighting.perturb(IMAGES, "gamma", severity),
                               rtol=1e-6)


def test_grayscale_images_ignore_colour_temperature():
  gray = IMAGES[..., :1]
  np.testing.assert_array_equal(lighting.perturb(gray, "temperature", 3), gray)


def test_unknown_kind_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown lighting perturbation 'fog'; choose one of"):
    lighting.perturb(IMAGES, "fog", 1)
