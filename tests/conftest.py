"""Shared test fixtures: one tiny MoE supernet on 28x28 RGB images (the embedded data's shape).

Building a model compiles one initialiser per parameter shape (about 15 s on 2 CPU cores), so
tests share this one and its shapes.
"""

import pytest
from flax import nnx

from moenas_jax import models

# 3 MoE layers of up to 3 experts, top-2; 28 -> 14 -> 7 -> 4 px; 10 classes.
TINY_SUPERNET = dict(num_classes=10, image_size=(28, 28), channels=3, width_multiplier=0.25,
                     depths=(1, 1, 1), strides=(2, 1, 2, 2, 1, 1), max_experts=3, max_top_k=2)


@pytest.fixture(scope="session")
def tiny_supernet():
  """(model, graphdef, params, state) of the tiny supernet, seed 0."""
  model = models.build("mobilevit_v2", rngs=nnx.Rngs(0), **TINY_SUPERNET)
  return model, *models.split(model)
