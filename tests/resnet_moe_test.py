"""Tests of the convolutional MoE ResNet (`models.resnet_moe`) and its shared routing
(`models.conv_moe`): straight-through routing, train/eval agreement, the dense ResNet as the
one-expert case, analytic costs against measured ones, export, pruning, populations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import costs, export, models, prune
from moenas_jax.compilation import count_compilations
from moenas_jax.models import conv_moe, layers, resnet, resnet_moe
from moenas_jax.search_space import Arch

# Depth 8: 3 blocks (W = 2, 4, 8 at expert_ratio 0.5), router a ResNet-8 at width 0.25.
CONFIG = dict(num_classes=5, image_size=(8, 8), depth=8, width_multiplier=0.25,
              max_experts=3, max_top_k=2, router_width_multiplier=0.25)
MIXED = Arch(np.array([2, 3, 1], np.int32), np.array([1, 2, 1], np.int32))
TOP_1 = Arch(np.array([3, 2, 3], np.int32), np.array([1, 1, 1], np.int32))


def random_model(family, seed=0, **config):
  """An abstract model (no initialiser compiles) filled with random weights and statistics."""
  model = nnx.eval_shape(lambda: family(**config, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(model))
  keys = jax.random.split(jax.random.key(seed), len(flat))
  values = {}
  for key, (path, variable) in zip(keys, flat):
    noise = jax.random.normal(key, variable.get_value().shape)
    if path[-1] == "var":
      values[path] = 0.5 + jnp.abs(noise)
    elif path[-1] == "scale":
      values[path] = 1.0 + 0.2 * noise
    else:
      values[path] = 0.5 * noise
  nnx.update(model, nnx.map_state(lambda path, v: v.copy(values[path]), nnx.state(model)))
  return model


def images(count, seed=1, size=(8, 8)):
  return jax.random.uniform(jax.random.key(seed), (count, *size, 3))


def logits_of(model, x, arch=None, train=False):
  graphdef, params, state = models.split(model)
  return models.apply(graphdef, params, state, x, arch, train=train)[0]


def recalibrating_logits(model, x, arch):
  """Evaluation-mode logits with every batch norm on the batch's statistics (as training)."""
  model = nnx.clone(model)
  for _, module in nnx.iter_graph(model):
    if isinstance(module, layers.ConvBN):
      module.recalibrating = True
  return model(x, arch, train=False)[0]


@pytest.fixture(scope="module")
def supernet():
  return random_model(resnet_moe.ResNetMoE, **CONFIG)


def test_route_is_straight_through_top_1_and_renormalised_top_k():
  logits = jnp.array([[0.1, 2.0, -1.0, 5.0], [1.0, 0.5, 0.7, 9.0]])  # expert 3 inactive
  choices, gates, probs = conv_moe.route(logits, jnp.int32(3), jnp.int32(1), max_top_k=2)
  np.testing.assert_array_equal(choices[:, 0], [1, 0])
  np.testing.assert_array_equal(gates, [[1.0, 0.0], [1.0, 0.0]])  # exactly one-hot
  np.testing.assert_array_equal(probs[:, 3], [0.0, 0.0])
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)

  # The gradient reaches the chosen probability (identity) and through it the logits.
  def chosen_gate(x):
    return conv_moe.route(x, jnp.int32(3), jnp.int32(1), max_top_k=2)[1][:, 0].sum()

  def chosen_prob(x):
    p = conv_moe.route(x, jnp.int32(3), jnp.int32(1), max_top_k=2)[2]
    return p[0, 1] + p[1, 0]

  grad = jax.grad(chosen_gate)(logits)
  assert np.abs(grad[:, :3]).min() > 0 and not grad[:, 3].any()
  np.testing.assert_allclose(grad, jax.grad(chosen_prob)(logits), rtol=1e-6)

  choices, gates, probs = conv_moe.route(logits, jnp.int32(3), jnp.int32(2), max_top_k=2)
  np.testing.assert_array_equal(choices, [[1, 0], [0, 2]])
  top = np.take_along_axis(np.asarray(probs), np.asarray(choices), 1)
  np.testing.assert_allclose(gates, top / top.sum(1, keepdims=True), rtol=1e-6)
  np.testing.assert_allclose(gates.sum(1), 1.0, rtol=1e-6)

  # Dense gates: top-1 one-hot forward, d(gates · v)/dp = v for every expert.
  choices, gates, probs = conv_moe.route(logits, jnp.int32(3), jnp.int32(1), max_top_k=2)
  dense = conv_moe.dense_gates(choices, gates, probs, jnp.int32(1))
  np.testing.assert_array_equal(dense, [[0, 1, 0, 0], [1, 0, 0, 0]])
  v = jnp.arange(8.0).reshape(2, 4)
  grad = jax.grad(lambda p: (conv_moe.dense_gates(choices, gates, p, jnp.int32(1)) * v).sum())(
      probs)
  np.testing.assert_array_equal(grad, v)


def test_training_mode_equals_evaluation_mode_for_the_same_routing(supernet):
  x = images(4)
  for arch in (TOP_1, MIXED, None):
    np.testing.assert_allclose(logits_of(supernet, x, arch, train=True),
                               recalibrating_logits(supernet, x, arch), rtol=1e-4, atol=1e-5)


def test_training_reaches_the_router_and_counts_images(supernet):
  graphdef, params, state = models.split(supernet)
  x = images(4)

  def loss(params):
    logits, _, aux = models.apply(graphdef, params, state, x, TOP_1, train=True)
    return logits.sum(), aux

  grads, aux = jax.grad(loss, has_aux=True)(params)
  head = grads["router"]["head"]["kernel"].get_value()
  assert np.abs(head).sum() > 0
  assert [int(c.sum()) for c in aux["expert_counts"]] == [4, 4, 4]
  _, _, aux = models.apply(graphdef, params, state, x, MIXED)
  assert [int(c.sum()) for c in aux["expert_counts"]] == [4, 8, 4]  # top-2 in block 1
  assert aux["expert_counts"][0][2] == 0  # block 0 has 2 experts in MIXED
  assert aux["router_logits"].shape == (4, 3) and aux["load_balance_loss"].shape == (3,)


def test_one_expert_at_full_ratio_is_the_dense_resnet():
  config = {**CONFIG, "expert_ratio": 1.0}
  model = random_model(resnet_moe.dense, **config)
  assert model.router is None
  plain = nnx.eval_shape(lambda: resnet.ResNet(num_classes=5, image_size=(8, 8), depth=8,
                                               width_multiplier=0.25, rngs=nnx.Rngs(0)))
  nnx.update(plain, nnx.state(model))  # the same tree of weights
  x = images(3)
  np.testing.assert_allclose(logits_of(model, x), logits_of(plain, x), rtol=1e-5, atol=1e-6)
  assert costs.count_params(model) == costs.count_params(plain)
  assert (costs.count_macs(lambda y: model(y)[0], x[:1])
          == costs.count_macs(lambda y: plain(y)[0], x[:1]))
  space = model.search_space()
  assert int(space.params(space.dense())) == costs.count_params(plain)
  assert int(space.macs(space.dense())) == costs.count_macs(lambda y: plain(y)[0], x[:1])


def test_standalone_matches_the_supernet_and_the_analytic_costs(supernet):
  space = supernet.search_space()
  x = images(3)
  archs = [space.dense(), space.largest(), MIXED, TOP_1,
           Arch(np.array([1, 2, 1], np.int32), np.array([1, 2, 1], np.int32))]
  for arch in archs:
    model = export.standalone(supernet, arch)
    assert [block.max_experts for block in model.blocks] == arch.num_experts.tolist()
    scores = arch.num_experts.max()
    assert (model.router is None if scores == 1
            else model.router.head.out_features == scores)
    assert costs.count_params(model) == int(space.params(arch)), arch
    assert costs.count_macs(lambda y, m=model: m(y)[0], x[:1]) == int(space.macs(arch)), arch
    np.testing.assert_allclose(logits_of(model, x), logits_of(supernet, x, arch), rtol=1e-5,
                               atol=1e-5)
  # Costs rise with experts (the router, the kernels) and with top-k (the MACs) only.
  assert space.params(TOP_1) > space.params(MIXED)
  more = Arch(MIXED.num_experts, np.array([2, 2, 1], np.int32))
  assert space.params(more) == space.params(MIXED) and space.macs(more) > space.macs(MIXED)
  np.testing.assert_array_equal(space.params(Arch(np.stack([MIXED.num_experts] * 2),
                                                  np.stack([MIXED.top_k] * 2))),
                                [space.params(MIXED)] * 2)


def _examples(size, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.integers(0, 256, (size, 8, 8, 3), dtype=np.uint8),
          "label": rng.integers(0, 5, size).astype(np.int32),
          "group": rng.integers(0, 2, size).astype(np.int32)}


def test_usage_excludes_padding_and_pruning_drops_an_expert_no_block_uses(supernet):
  graphdef, params, state = models.split(supernet)
  # Router column 1 gets bias -1e4: no image of any block chooses expert 1.
  bias = np.asarray(params["router"]["head"]["bias"].get_value()).copy()
  bias[1] = -1e4
  params = nnx.map_state(lambda path, v: v.copy(bias) if path == ("router", "head", "bias")
                         else v, params)
  arch = Arch(np.array([3, 3, 2], np.int32), np.array([1, 2, 1], np.int32))
  examples = _examples(5)
  x = examples["image"].astype(np.float32) / 255
  with count_compilations() as seen:  # batches of 4: the second has 1 example and 3 pads
    usage = prune.expert_usage(graphdef, params, state, arch, examples, batch_size=4)
  assert seen.of("usage_counts") == 1
  _, _, aux = models.apply(graphdef, params, state, jnp.asarray(x), arch)  # one plain batch
  for share, count in zip(usage, aux["expert_counts"]):
    np.testing.assert_allclose(share, np.asarray(count) / count.sum())
  assert [u[1] for u in usage] == [0, 0, 0]
  np.testing.assert_allclose(usage[1], [0.5, 0.0, 0.5])  # top-2 of the 2 usable experts

  pruned, new_arch, report = prune.prune(params, arch, usage, min_fraction=0.01)
  np.testing.assert_array_equal(new_arch.num_experts, [2, 2, 1])
  np.testing.assert_array_equal(new_arch.top_k, [1, 2, 1])
  assert [layer["removed"] for layer in report] == [[1], [1], [1]]
  assert [layer["kept"] for layer in report] == [[0, 2], [0, 2], [0]]
  # One order for router and blocks: [0, 2, 1]; each block's channel blocks alike.
  new = dict(nnx.to_flat_state(pruned))
  old = dict(nnx.to_flat_state(params))
  np.testing.assert_array_equal(new[("router", "head", "bias")].get_value(),
                                bias[[0, 2, 1]])
  for b, width in enumerate((2, 4, 8)):
    path = ("blocks", b, "second", "conv", "kernel")
    kernel = np.asarray(old[path].get_value()).reshape(3, 3, width, 3, width)
    np.testing.assert_array_equal(np.asarray(new[path].get_value()).reshape(kernel.shape),
                                  kernel[:, :, :, [0, 2, 1]])
  before = models.apply(graphdef, params, state, jnp.asarray(x), arch)[0]
  np.testing.assert_allclose(models.apply(graphdef, pruned, state, jnp.asarray(x), new_arch)[0],
                             before, rtol=1e-5, atol=1e-5)
  small_supernet = nnx.merge(graphdef, pruned, state)
  small = export.standalone(small_supernet, new_arch)
  space = supernet.search_space()
  assert costs.count_params(small) == int(space.params(new_arch)) < int(space.params(arch))
  np.testing.assert_allclose(logits_of(small, jnp.asarray(x)), before, rtol=1e-5, atol=1e-5)


def test_a_population_runs_in_one_vmapped_call_compiled_once(supernet):
  graphdef, params, state = models.split(supernet)
  space = supernet.search_space()
  x = images(2)
  scores = jax.jit(jax.vmap(lambda a: models.apply(graphdef, params, state, x, a)[0]))
  first = space.sample_population(jax.random.key(0), 4)
  second = space.sample_population(jax.random.key(1), 4)
  with count_compilations() as seen:
    out_first = scores(first)
    out_second = scores(second)
  assert seen.count == 1
  assert out_first.shape == (4, 2, 5)
  for i in range(4):
    one = Arch(second.num_experts[i], second.top_k[i])
    np.testing.assert_allclose(out_second[i], logits_of(supernet, x, one), rtol=1e-5,
                               atol=1e-5)


def test_bad_inputs_are_named():
  build = lambda **c: nnx.eval_shape(  # noqa: E731
      lambda: resnet_moe.ResNetMoE(**{**CONFIG, **c}, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"depth must be 6n \+ 2"):
    build(depth=10)
  for ratio in (0, 1.5):
    with pytest.raises(ValueError, match=r"expert_ratio=.* must be in \(0, 1\]"):
      build(expert_ratio=ratio)
  with pytest.raises(ValueError, match=r"max_experts=\(2, 2\) must be one int or 3 ints"):
    build(max_experts=(2, 2))
  with pytest.raises(ValueError, match=r"top_k.* must not exceed num_experts"):
    build(max_experts=(1, 2, 2))  # max_top_k 2 in a one-expert block
  model = build(max_experts=2, max_top_k=1)
  with pytest.raises(ValueError, match=r"takes one candidate, Arch with \[3\] arrays"):
    model(images(1), Arch(np.ones((2, 3), np.int32), np.ones((2, 3), np.int32)))
  with pytest.raises(ValueError, match=r"num_experts\[1\] = 3 must be in 1..2"):
    model.search_space().validate(Arch(np.array([1, 3, 1]), np.array([1, 1, 1])))


def test_pruning_keeps_an_expert_that_any_block_uses(supernet):
  _, params, _ = models.split(supernet)
  arch = Arch(np.array([2, 3, 3], np.int32), np.array([1, 2, 2], np.int32))
  usage = [np.array([0.0, 1.0, 0.0]), np.array([0.5, 0.0, 0.5]), np.array([0.0, 0.5, 0.5])]
  pruned, new_arch, report = prune.prune(params, arch, usage, min_fraction=0.1)
  # Every expert is used somewhere: nothing moves, though block 1 never chose expert 1.
  assert [layer["removed"] for layer in report] == [[], [], []]
  np.testing.assert_array_equal(new_arch.num_experts, [2, 3, 3])
  usage[0], usage[2] = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0])
  pruned, new_arch, report = prune.prune(params, arch, usage, min_fraction=0.1)
  assert [layer["kept"] for layer in report] == [[0], [0, 2], [0, 2]]  # block 2 also keeps 0
  np.testing.assert_array_equal(new_arch.num_experts, [1, 2, 2])
  np.testing.assert_array_equal(new_arch.top_k, [1, 2, 2])
  new = dict(nnx.to_flat_state(pruned))
  old = dict(nnx.to_flat_state(params))
  np.testing.assert_array_equal(new[("router", "head", "kernel")].get_value(),
                                np.take(old[("router", "head", "kernel")].get_value(),
                                        [0, 2, 1], axis=1))
