"""Tests of standalone export: a candidate cut out of the supernet with its own shapes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import costs, export, models, search_space
from moenas_jax.models import mobilevit
from moenas_jax.search_space import Arch

CONFIG = dict(num_classes=6, width_multiplier=0.25, max_experts=4, max_top_k=2)


def _supernet(capacity_factor_eval, **config):
  """A supernet whose every weight and statistic is random (not the 0/1 of initialisation)."""
  model = mobilevit.MobileViTV2(moe_settings=dict(capacity_factor_eval=capacity_factor_eval),
                                rngs=nnx.Rngs(0), **{**CONFIG, **config})
  state = nnx.state(model)
  keys = iter(jax.random.split(jax.random.key(9), len(jax.tree.leaves(state))))
  nnx.update(model, jax.tree.map(
      lambda v: v + 0.1 * jnp.abs(jax.random.normal(next(keys), v.shape)), state))
  return model


def _logits(model, images, arch=None):
  graphdef, params, state = models.split(model)
  return jax.jit(lambda p, s, x, a: models.apply(graphdef, p, s, x, a)[0])(
      params, state, images, arch)


def test_standalone_logits_equal_the_supernet_under_its_arch():
  supernet = _supernet(capacity_factor_eval=8.0)  # ample: no token is dropped
  space = supernet.search_space()
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  for arch in (space.validate(space.sample(jax.random.key(0))), space.dense()):
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


def test_costs_match_for_odd_maps_and_per_layer_maxima():
  # 28x28x1: the first transformer stage sees a 7x7 map and uses 1x1 patches.
  supernet = nnx.eval_shape(lambda: mobilevit.MobileViTV2(
      num_classes=4, image_size=(28, 28), channels=1, width_multiplier=0.5, depths=(1, 2, 1),
      max_experts=(2, 4, 4, 1), max_top_k=(2, 1, 2, 1),
      moe_settings=dict(capacity_factor_eval=1.0), rngs=nnx.Rngs(0)))
  space = supernet.search_space()
  assert [layer.tokens for layer in space.layers] == [49, 16, 16, 4]
  arch = Arch(np.array([2, 4, 2, 1]), np.array([1, 1, 2, 1]))  # n divides tokens * k
  model = export.standalone(supernet, arch)
  assert costs.count_params(model) == int(space.params(arch))
  graphdef, params, state = models.split(model)
  images = jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32)
  macs = costs.count_macs(lambda p, s, x: models.apply(graphdef, p, s, x)[0], params, state,
                          images)
  # 49 tokens over 2 experts: ceil(49 / 2) = 25 slots each, one padded slot of 2 * D * H.
  assert macs == int(space.macs(arch)) + 2 * space.layers[0].dim * space.layers[0].hidden


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


# Width and depth genes: width_multiplier 0.5 gives stage widths (32, 64, 128, 192, 256), and
# multipliers (0.5, 0.75, 1.0) the channels (16, 24, 32), (32, 48, 64), ... of each stage.
STAGED = dict(width_multiplier=0.5, depths=(1, 2, 2), width_choices=(0.5, 0.75, 1.0),
              search_depth=True)
STAGED_ARCHS = [
    Arch(np.array([4, 1, 1, 2, 1]), np.array([2, 1, 1, 1, 1]), width=np.array([1, 1, 1, 1, 1]),
         depth=np.array([1, 1, 1])),
    # Stage widths 24, 64, 64, 96, 256: stage2's second block and the first downsample join
    # their equal widths with a residual (stride 1 at the second block only).
    Arch(np.array([2, 4, 2, 4, 2]), np.array([1, 2, 1, 2, 1]), width=np.array([2, 3, 2, 1, 3]),
         depth=np.array([1, 2, 2])),
    Arch(np.array([1, 2, 1, 4, 4]), np.array([1, 1, 1, 2, 1]), width=np.array([3, 2, 3, 2, 1]),
         depth=np.array([1, 1, 2])),
]


def test_width_and_depth_candidates_export_with_their_own_shapes_and_logits():
  supernet = _supernet(capacity_factor_eval=8.0, **STAGED)
  space = supernet.search_space()
  images = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  for arch in STAGED_ARCHS + [space.smallest(), space.largest()]:
    arch = space.validate(arch)
    model = export.standalone(supernet, arch)
    widths = [row[v - 1] for row, v in zip(supernet.stage_channels, arch.width)]
    assert model.config["stage_widths"] == tuple(widths)
    assert [len(vit.transformer) for vit in model.vit] == arch.depth.tolist()
    assert model.head.in_features == widths[-1]
    assert [gene.name for gene in model.search_space().genes] == ["num_experts", "top_k"]
    # Logits near 15; the masked channels change float32 summation order (in float64 the
    # two agree to 1e-9).
    np.testing.assert_allclose(_logits(model, images), _logits(supernet, images, arch),
                               rtol=1e-4, atol=1e-5)


def test_width_and_depth_costs_match_the_standalone_models():
  supernet = nnx.eval_shape(lambda: _supernet(capacity_factor_eval=1.0, **STAGED))
  space = supernet.search_space()
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  for arch in STAGED_ARCHS + [space.smallest(), space.dense(), space.largest()]:
    model = export.standalone(supernet, arch)
    graphdef, params, state = models.split(model)
    macs = costs.count_macs(lambda p, s, x: models.apply(graphdef, p, s, x)[0], params, state,
                            images)
    assert costs.count_params(model) == int(space.params(arch))
    assert macs == int(space.macs(arch))
  # Vectorised over a population, equal to the one-by-one counts.
  population = search_space.stack(STAGED_ARCHS)
  assert space.params(population).tolist() == [int(space.params(a)) for a in STAGED_ARCHS]
  assert space.macs(population).tolist() == [int(space.macs(a)) for a in STAGED_ARCHS]


def test_an_exported_width_candidate_loads_with_its_shapes(tmp_path):
  supernet = _supernet(capacity_factor_eval=8.0, **STAGED)
  model = export.standalone(supernet, STAGED_ARCHS[1])
  export.save(tmp_path / "final", model, model_name="mobilevit_v2", arch=STAGED_ARCHS[1],
              class_names=[str(i) for i in range(6)], group_names=["a", "b"])
  loaded = export.load(tmp_path / "final")
  images = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  np.testing.assert_allclose(loaded.predict(images), _logits(model, images), rtol=1e-5)
  assert loaded.metadata["arch"]["width"] == [2, 3, 2, 1, 3]
  # The same architecture from fresh weights: every shape as saved, weights from the seed.
  fresh = export.initialised(tmp_path / "final", seed=3)
  chex.assert_trees_all_equal_shapes_and_dtypes(nnx.state(fresh), nnx.state(loaded.model))
  chex.assert_trees_all_equal(nnx.state(fresh), nnx.state(export.initialised(tmp_path / "final",
                                                                             seed=3)))
  assert not np.allclose(_logits(fresh, images), _logits(model, images))
