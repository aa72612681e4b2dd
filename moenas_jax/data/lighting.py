"""Lighting perturbations for the robustness metric: pure JAX, jit- and vmap-able.

Images are float32 in [0, 1], shape [..., H, W, C]. Five kinds, five severities each (1 mild
to 5 strong); every result stays in [0, 1]:

- brightness: add 0.1 · s (a brighter scene), clipped.
- contrast: pull pixels towards the image mean, keeping 1 − 0.15 · s of the deviation.
- gamma: x ** (1 + 0.3 · s), darker mid-tones (a dim, high-contrast light).
- exposure: x · 2 ** (−0.5 · s), under-exposure by 0.5 to 2.5 stops.
- temperature: warm light, red gain 1 + 0.08 · s and blue gain 1 − 0.08 · s (RGB only;
  other channel counts are returned unchanged).

`LIGHTING_SET` names the 25 (kind, severity) pairs the robustness metric averages over.
`indexed(lighting_set)` gives the (index, severity) pairs of `perturb_indexed`, whose kind is
traced (index 0: the clean image, i: the i-th of `KINDS`), so one compiled evaluation function
serves the clean pass and every perturbation.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

SEVERITIES = (1, 2, 3, 4, 5)


def brightness(images: jax.Array, severity: jax.Array) -> jax.Array:
  return jnp.clip(images + 0.1 * severity, 0.0, 1.0)


def contrast(images: jax.Array, severity: jax.Array) -> jax.Array:
  mean = images.mean(axis=(-3, -2, -1), keepdims=True)
  return jnp.clip(mean + (images - mean) * (1.0 - 0.15 * severity), 0.0, 1.0)


def gamma(images: jax.Array, severity: jax.Array) -> jax.Array:
  return jnp.clip(images, 0.0, 1.0) ** (1.0 + 0.3 * severity)


def exposure(images: jax.Array, severity: jax.Array) -> jax.Array:
  return jnp.clip(images * 2.0 ** (-0.5 * severity), 0.0, 1.0)


def temperature(images: jax.Array, severity: jax.Array) -> jax.Array:
  if images.shape[-1] != 3:
    return images
  shift = 0.08 * severity
  gains = jnp.stack([1.0 + shift, jnp.ones_like(shift), 1.0 - shift])
  return jnp.clip(images * gains, 0.0, 1.0)


KINDS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "brightness": brightness, "contrast": contrast, "gamma": gamma, "exposure": exposure,
    "temperature": temperature,
}
LIGHTING_SET: tuple[tuple[str, int], ...] = tuple(
    (kind, severity) for kind in KINDS for severity in SEVERITIES)


def perturb(images: jax.Array, kind: str, severity: int | jax.Array) -> jax.Array:
  """Applies one named perturbation; severity may be traced (1..5, or fractional)."""
  if kind not in KINDS:
    raise ValueError(f"unknown lighting perturbation {kind!r}; choose one of {sorted(KINDS)}")
  return KINDS[kind](images, jnp.asarray(severity, jnp.float32))


def _identity(images: jax.Array, severity: jax.Array) -> jax.Array:
  del severity
  return images


def indexed(lighting_set) -> tuple[tuple[int, int], ...]:
  """The (index, severity) pairs of `perturb_indexed` for (kind, severity) pairs."""
  names = list(KINDS)
  unknown = sorted({kind for kind, _ in lighting_set} - set(names))
  if unknown:
    raise ValueError(f"unknown lighting kinds {unknown}; known: {', '.join(names)}")
  return tuple((names.index(kind) + 1, severity) for kind, severity in lighting_set)


def perturb_indexed(images: jax.Array, index: jax.Array, severity: jax.Array) -> jax.Array:
  """`perturb` with a traced kind: 0 the clean image, i the i-th of `KINDS` (`indexed`)."""
  branches = [_identity, *KINDS.values()]
  return jax.lax.switch(index, branches, images, jnp.asarray(severity, jnp.float32))
