"""Tests of standalone export: a candidate cut out of the supernet with its own shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import costs, export, models, search_space
from moenas_jax.models import mobilevit
from moenas_jax.search_space import Arch

CONFIG = dict(num_classes=6, width_multiplier=0.25, max_experts=4, max_top_k=2)


def _supernet(capacity_factor_eval):
  return mobilevit.MobileViTV2(moe_settings=dict(capacity_factor_eval=capacity_factor_eval),
                               rngs=nnx.Rngs(0), **CONFIG)


def _logits(model, images, arch=None):
  graphdef, params, state = models.split(model)
  return jax.jit(lambda p, s, x, a: models.apply(graphdef, p, s, x, a)[0])(
      params, state, images, arch)


def test_standalone_logits_equal_the_supernet_under_its_arch():
  supernet = _supernet(capacity_factor_eval=8.0)  # ample: no token is dropped
  space = supernet.search_space()
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  for seed in (0, 1):
    arch = space.validate(space.sample(jax.random.key(seed)))
    model = export.standalone(supernet, arch)
    assert [vit.transformer[0].ffn.max_experts for vit in model.vit] == \
        arch.num_experts[[0, 2, 6]].tolist()
    np.testing.assert_allclose(_logits(model, images), _logits(supernet, images, arch),
                               rtol=1e-5, atol=1e-5)


def test_standalone_size_and_macs_match_the_search_space():
  # Capacity factor 1 and expert counts that divide every layer's tokens x top-k: the
  # standalone MoE layers then run exactly one expert per token choice, no padding.
  supernet = _supernet(capacity_factor_eval=1.0)
  space = supernet.search_space()
  images = jnp.zeros((1, 32, 32, 3))
  archs = [space.dense(), space.largest(),
           Arch(np.array([1, 2, 4, 4, 2, 1, 4, 2, 1]), np.array([1, 2, 1, 2, 2, 1, 2, 1, 1]))]
  for arch in archs:
    model = export.standalone(supernet, arch)
    assert costs.count_params(model) == int(space.params(arch))
    assert costs.count_macs(lambda x, m=model: m(x)[0], images) == int(space.macs(arch))
  # With 3 experts the 64 tokens of a layer need ceil(64 / 3) = 22 slots each: 2 padded.
  arch = Arch(np.array([3] + [1] * 8), np.ones(9, np.int64))
  model = export.standalone(supernet, arch)
  padded = 2 * 2 * space.layers[0].dim * space.layers[0].hidden
  assert costs.count_macs(lambda x: model(x)[0], images) == int(space.macs(arch)) + padded


def test_dense_export_is_the_dense_mobilevit():
  supernet = _supernet(capacity_factor_eval=2.0)
  space = supernet.search_space()
  model = export.standalone(supernet, space.dense())
  dense = nnx.eval_shape(lambda: models.build("mobilevit_v2_dense", rngs=nnx.Rngs(0),
                                              **{**CONFIG, "max_experts": 4, "max_top_k": 2}))
  shapes = jax.tree.map(lambda v: v.shape, nnx.state(model))
  assert shapes == jax.tree.map(lambda v: v.shape, nnx.state(dense))


def test_export_rejects_a_population_or_a_bad_arch():
  supernet = nnx.eval_shape(lambda: _supernet(2.0))
  space = supernet.search_space()
  with pytest.raises(ValueError, match="takes one candidate, got a population"):
    export.standalone(supernet, search_space.stack([space.dense(), space.largest()]))
  with pytest.raises(ValueError, match=r"num_experts\[0\] = 5 must be in 1..4"):
    export.standalone(supernet, Arch(np.array([5] + [1] * 8), np.ones(9, np.int64)))
