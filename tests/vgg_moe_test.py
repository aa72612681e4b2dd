"""Tests of the convolutional MoE VGG (`models.vgg_moe`): costs, export, training/evaluation
agreement, pruning and bad plans. The routing itself is tested in resnet_moe_test.py."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import costs, export, models, prune, settings
from moenas_jax.models import vgg_moe
from moenas_jax.search_space import Arch
from tests.resnet_moe_test import images, logits_of, random_model, recalibrating_logits

# 8 px: stem 4 → pool → MoE 8 → MoE 8 → pool → MoE 16 (L = 3; W = 4, 4, 8 at ratio 0.5).
CONFIG = dict(num_classes=5, image_size=(8, 8), plan=(4, "M", 8, 8, "M", 16),
              max_experts=(2, 3, 3), max_top_k=(1, 2, 2), router_width_multiplier=0.25)
MIXED = Arch(np.array([2, 1, 3], np.int32), np.array([1, 1, 2], np.int32))


@pytest.fixture(scope="module")
def supernet():
  return random_model(vgg_moe.VGGMoE, seed=3, **CONFIG)


def test_layout_and_registration(supernet):
  assert [conv.width for conv in supernet.convs] == [4, 4, 8]
  assert [conv.experts for conv in supernet.convs] == [2, 3, 3]
  assert supernet.pools == (-1, 1)
  assert models.MODELS["vgg_moe"] is vgg_moe.VGGMoE
  dense = nnx.eval_shape(lambda: models.build("vgg_moe_dense", rngs=nnx.Rngs(0), **CONFIG))
  assert dense.router is None and dense.max_experts == (1, 1, 1)
  vgg11 = nnx.eval_shape(lambda: vgg_moe.VGGMoE(num_classes=10, rngs=nnx.Rngs(0)))
  assert len(vgg11.convs) == 7 and vgg11.pools == (-1, 0, 2, 4, 6)


def test_standalone_matches_the_supernet_and_the_analytic_costs(supernet):
  space = supernet.search_space()
  x = images(3)
  for arch in (space.dense(), space.largest(), MIXED):
    model = export.standalone(supernet, arch)
    assert [conv.experts for conv in model.convs] == arch.num_experts.tolist()
    assert costs.count_params(model) == int(space.params(arch)), arch
    assert costs.count_macs(lambda y, m=model: m(y)[0], x[:1]) == int(space.macs(arch)), arch
    np.testing.assert_allclose(logits_of(model, x), logits_of(supernet, x, arch), rtol=1e-5,
                               atol=1e-5)


def test_training_mode_equals_evaluation_mode(supernet):
  x = images(4)
  for arch in (MIXED, None):
    np.testing.assert_allclose(logits_of(supernet, x, arch, train=True),
                               recalibrating_logits(supernet, x, arch), rtol=1e-4, atol=1e-5)


def test_pruning_removes_an_unused_expert(supernet):
  graphdef, params, state = models.split(supernet)
  usage = [np.array([1.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.array([0.5, 0.0, 0.5])]
  pruned, arch, report = prune.prune(params, supernet.search_space().largest(), usage,
                                     min_fraction=0.1)
  assert [layer["removed"] for layer in report] == [[1], [1], [1]]
  np.testing.assert_array_equal(arch.num_experts, [1, 2, 2])
  np.testing.assert_array_equal(arch.top_k, [1, 2, 2])
  old = np.asarray(dict(nnx.to_flat_state(params))[("convs", 2, "conv", "kernel")].get_value())
  new = dict(nnx.to_flat_state(pruned))[("convs", 2, "conv", "kernel")].get_value()
  np.testing.assert_array_equal(np.asarray(new).reshape(3, 3, 4, 3, 8),
                                old.reshape(3, 3, 4, 3, 8)[:, :, :, [0, 2, 1]])
  small = export.standalone(nnx.merge(graphdef, pruned, state), arch)
  assert costs.count_params(small) == int(supernet.search_space().params(arch))


def test_bad_plans_and_options_are_named():
  build = lambda **c: nnx.eval_shape(  # noqa: E731
      lambda: vgg_moe.VGGMoE(**{**CONFIG, **c}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"plan='vgg9' is not one of"):
    build(plan="vgg9")
  for plan in (("M", 8, 8), (8,), (8, 0, 8)):
    with pytest.raises(ValueError, match=r"must start with a conv and hold at least two"):
      build(plan=plan)
  with pytest.raises(ValueError, match=r"downsamples by 4"):
    build(image_size=(2, 2))
  with pytest.raises(ValueError, match=r"expert_ratio=0 must be in \(0, 1\]"):
    build(expert_ratio=0)
  with pytest.raises(ValueError, match=r"max_experts=\(2, 2\) must be one int or 3 ints"):
    build(max_experts=(2, 2))


def test_the_default_config_builds_a_conv_moe_family_without_moe_settings():
  from configs import default
  config = default.get_config()
  config.model = dict(name="vgg_moe", width_multiplier=0.25, max_experts=2, max_top_k=1,
                      moe_settings={})
  options = settings.model_options(config)
  assert "moe_settings" not in options
  model = nnx.eval_shape(lambda: models.build("vgg_moe", rngs=nnx.Rngs(0), num_classes=3,
                                              **options))
  assert model.max_experts == (2,) * 7 and jnp.ndim(model.head.kernel.get_value()) == 2
