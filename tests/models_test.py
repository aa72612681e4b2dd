"""Tests of the model families, the name table and the supernet under vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moenas_jax import costs, models, search_space
from moenas_jax.compilation import count_compilations
from moenas_jax.models import layers, mobilevit

SMALL = {
    "mobilevit_v2": dict(width_multiplier=0.25, depths=(1, 1, 1), max_experts=4, max_top_k=2),
    "mobilevit_v2_dense": dict(width_multiplier=0.25, depths=(1, 1, 1)),
    "mobilenet_v2": dict(width_multiplier=0.35),
    "resnet": dict(depth=8),
}
SHAPES = [((28, 28), 1), ((32, 32), 3), ((64, 64), 3)]


def _abstract(name, **config):
  """The model's structure without initialising (or compiling) anything."""
  return nnx.eval_shape(lambda: models.build(name, rngs=nnx.Rngs(0), **config))


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("image_size, channels", SHAPES)
def test_every_model_maps_images_to_logits_at_every_size(name, image_size, channels):
  model = _abstract(name, num_classes=7, image_size=image_size, channels=channels,
                    **SMALL[name])
  graphdef, params, state = models.split(model)
  images = jax.ShapeDtypeStruct((2, *image_size, channels), jnp.float32)
  for train in (False, True):
    logits, new_state, aux = jax.eval_shape(
        lambda p, s, x: models.apply(graphdef, p, s, x, train=train, key=jax.random.key(0)),
        params, state, images)
    chex.assert_shape(logits, (2, 7))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    assert aux["aux_loss"].shape == ()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_updates_batch_norm_statistics_and_has_gradients(name):
  model = models.build(name, num_classes=3, image_size=(16, 16) if name == "resnet" else (32, 32),
                       rngs=nnx.Rngs(0), **SMALL[name])
  graphdef, params, state = models.split(model)
  images = jax.random.normal(jax.random.key(1), (2, *model.input_shape))

  def loss(params, train):
    logits, new_state, aux = models.apply(graphdef, params, state, images, train=train,
                                          key=jax.random.key(2))
    return jnp.sum(logits) + aux["aux_loss"], (logits, new_state)

  step = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (logits, new_state)), grads = step(params, True)
  chex.assert_tree_all_finite((logits, grads, new_state))
  assert not any(jax.tree.leaves(jax.tree.map(jnp.array_equal, state, new_state)))
  _, eval_state, _ = jax.jit(lambda p, s: models.apply(graphdef, p, s, images))(params, state)
  chex.assert_trees_all_equal(eval_state, state)


@pytest.mark.parametrize("size, stride", [(7, 1), (7, 2), (8, 2), (5, 2)])
def test_depthwise_conv_equals_the_grouped_convolution_and_its_gradient(size, stride):
  conv = nnx.Conv(3, 3, (3, 3), strides=stride, padding="SAME", feature_group_count=3,
                  use_bias=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, size, size + 1, 3))
  kernel = conv.kernel[...]
  grouped = lambda x, k: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(  # noqa: E731
      x, k, (stride, stride), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=3)))
  shifted = lambda x, k: jnp.sum(jnp.sin(layers.depthwise_conv(x, k, stride)))  # noqa: E731
  np.testing.assert_allclose(layers.depthwise_conv(x, kernel, stride), conv(x), atol=1e-5)
  for want, got in zip(jax.grad(grouped, (0, 1))(x, kernel), jax.grad(shifted, (0, 1))(x, kernel)):
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_full_depth_supernet_has_nine_moe_layers():
  model = _abstract("mobilevit_v2", num_classes=10, width_multiplier=0.25)
  space = model.search_space()
  assert space.num_layers == 9
  # 32 px, strides (1, 1, 2, 2, 2, 2): the transformer stages see 8x8, 4x4 and 2x2 maps.
  assert [layer.tokens for layer in space.layers] == [64] * 2 + [16] * 4 + [4] * 3
  # Width 0.25: attention widths make_divisible(128, 192, 256 * 0.25) = 32, 48, 64,
  # feed-forward 2x those.
  assert [(layer.dim, layer.hidden) for layer in space.layers[::4]] == [(32, 64), (48, 96),
                                                                        (64, 128)]
  graphdef, params, state = models.split(model)
  _, _, aux = jax.eval_shape(lambda p, s, x, a: models.apply(graphdef, p, s, x, a), params,
                             state, jnp.zeros((1, 32, 32, 3)), space.largest())
  assert aux["drop_fraction"].shape == (9,) and len(aux["expert_counts"]) == 9


def test_odd_feature_maps_use_one_pixel_patches():
  model = _abstract("mobilevit_v2", num_classes=3, image_size=(28, 28), channels=1,
                    width_multiplier=0.25, depths=(1, 1, 1))
  assert [block.patch for block in model.vit] == [1, 2, 2]  # maps 7x7, 4x4, 2x2


def test_unknown_model_name_lists_the_valid_ones():
  with pytest.raises(ValueError, match="unknown model 'vit'; valid names: mobilenet_v2, "
                                       "mobilevit_v2, mobilevit_v2_dense, resnet"):
    models.build("vit", num_classes=2, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name, config, message", [
    ("mobilevit_v2", dict(image_size=(8, 8)),
     "mobilevit_v2 downsamples by 16, so it takes images of at least 16x16 px; got 8x8"),
    ("mobilenet_v2", dict(image_size=(4, 4)), "at least 8x8 px; got 4x4"),
    ("resnet", dict(image_size=(2, 2)), "at least 4x4 px; got 2x2"),
    ("resnet", dict(depth=10), "ResNet depth must be 6n \\+ 2"),
    ("mobilevit_v2", dict(max_experts=(2, 2)), "max_experts has 2 entries but the model has 9"),
    ("mobilevit_v2", dict(max_experts=2, max_top_k=3), r"top_k\[0\] = 3 must not exceed"),
])
def test_bad_model_configs_fail_at_construction(name, config, message):
  with pytest.raises(ValueError, match=message):
    models.build(name, num_classes=2, rngs=nnx.Rngs(0), **config)


def test_the_supernet_rejects_an_arch_of_the_wrong_shape():
  model = _abstract("mobilevit_v2", num_classes=2, width_multiplier=0.25, depths=(1, 1, 1),
                    max_experts=4)
  images = jnp.zeros((1, 32, 32, 3))
  for shape in ((5,), (2,), (4, 3)):
    arch = search_space.Arch(np.ones(shape, np.int32), np.ones(shape, np.int32))
    with pytest.raises(ValueError, match=r"takes one candidate, Arch with \[3\] arrays"):
      jax.eval_shape(lambda a: model(images, a), arch)


def test_bad_calls_name_the_fix():
  model = _abstract("resnet", num_classes=2, depth=8)
  with pytest.raises(ValueError, match=r"built for images \[B, 32, 32, 3\], got \(1, 28, 28, 1\)"):
    model(jnp.zeros((1, 28, 28, 1)))
  with pytest.raises(ValueError, match="dense model with no MoE layers"):
    model(jnp.zeros((1, 32, 32, 3)), search_space.Arch(np.ones(9), np.ones(9)))


def test_dense_mobilevit_has_the_parameters_of_the_all_ones_supernet():
  config = dict(num_classes=10, width_multiplier=0.25, depths=(1, 1, 1))
  supernet = _abstract("mobilevit_v2", max_experts=4, max_top_k=2, **config)
  space = supernet.search_space()
  dense = _abstract("mobilevit_v2_dense", **config)
  assert costs.count_params(dense) == int(space.params(space.dense()))
  assert costs.count_params(supernet) == int(space.params(space.largest()))


def test_vmap_over_a_population_equals_a_loop_and_compiles_once():
  model = mobilevit.MobileViTV2(num_classes=5, width_multiplier=0.25, depths=(1, 1, 1),
                                max_experts=4, max_top_k=2, rngs=nnx.Rngs(0))
  space = model.search_space()
  graphdef, params, state = models.split(model)

  def logits_of(arch, images):
    return models.apply(graphdef, params, state, images, arch)[0]

  population_logits = jax.jit(jax.vmap(logits_of, in_axes=(0, None)))
  images = jax.random.normal(jax.random.key(3), (3, 32, 32, 3))
  first = space.sample_population(jax.random.key(4), 6)
  second = space.sample_population(jax.random.key(5), 6)
  with count_compilations() as seen:
    batched = population_logits(first, images)
    jax.block_until_ready(population_logits(second, images))
  assert seen.of("logits_of") == 1
  single = jax.jit(logits_of)
  for p, arch in enumerate(search_space.unstack(first)):
    np.testing.assert_allclose(batched[p], single(arch, images), rtol=1e-5, atol=1e-5)
  # Different candidates give different outputs (the arch really reaches the layers).
  assert not np.allclose(batched[0], batched[1])


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet"])
def test_the_stem_stride_follows_the_input_so_a_64px_input_costs_what_a_32px_one_does(name):
  def macs(size, **options):
    model = _abstract(name, num_classes=2, image_size=(size, size), **SMALL[name], **options)
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    head = model.head.in_features * model.head.out_features
    graphdef, params, state = models.split(model)
    count = costs.count_macs(lambda p, s, x: models.apply(graphdef, p, s, x)[0], params, state,
                             images)
    return model.stem.stride, count, head

  stride_32, macs_32, head = macs(32)
  stride_64, macs_64, _ = macs(64)
  assert (stride_32, stride_64) == (1, 2)
  # Stride 2 on 64 px gives the 32 px stem's output map from the same 3x3x3 kernel: equal cost.
  assert macs_64 == macs_32
  # Forced stride 1: every conv sees 4x the positions; the linear head costs the same.
  assert macs(64, stem_stride=1)[1] == 4 * (macs_32 - head) + head
  with pytest.raises(ValueError, match="stem_stride must be 1, 2 or None"):
    _abstract(name, num_classes=2, stem_stride=3, **SMALL[name])


WIDTH_DEPTH = dict(num_classes=5, width_multiplier=0.25, depths=(1, 2, 1), max_experts=4,
                   max_top_k=2, width_choices=(0.5, 0.75, 1.0), search_depth=True)


def test_width_and_depth_candidates_are_masks_under_one_compile():
  model = mobilevit.MobileViTV2(rngs=nnx.Rngs(0), **WIDTH_DEPTH)
  space = model.search_space()
  assert [(gene.name, gene.maxima, gene.unit) for gene in space.genes[2:]] == [
      ("width", (2, 3, 3, 3, 3), "stage"), ("depth", (1, 2, 1), "stage")]
  # Width 0.25: stages of 16, 32, 64, 96, 128 channels; make_divisible(c * m, 8) per choice,
  # distinct counts only: 16 · 0.75 and 16 · 1.0 both give 16, one value of the gene.
  assert model.stage_channels == ((8, 16), (16, 24, 32), (32, 48, 64), (48, 72, 96),
                                  (64, 96, 128))
  # The model's own default candidate (no arch) is the space's largest.
  assert search_space.to_dict(model.full_arch()) == search_space.to_dict(space.largest())
  graphdef, params, state = models.split(model)

  def outputs(arch, images):
    logits, _, aux = models.apply(graphdef, params, state, images, arch)
    return logits, aux

  population_outputs = jax.jit(jax.vmap(outputs, in_axes=(0, None)))
  images = jax.random.normal(jax.random.key(3), (3, 32, 32, 3))
  first = space.sample_population(jax.random.key(4), 6)
  second = space.sample_population(jax.random.key(5), 6)
  with count_compilations() as seen:
    logits, aux = population_outputs(first, images)
    jax.block_until_ready(population_outputs(second, images))
  assert seen.of("outputs") == 1
  single = jax.jit(outputs)
  for p, arch in enumerate(search_space.unstack(first)):
    np.testing.assert_allclose(logits[p], single(arch, images)[0], rtol=1e-5, atol=1e-5)
  # A layer beyond its stage's depth counts nothing: stage 1's second layer is MoE layer 2.
  depth = np.asarray(first.depth)
  assert (np.asarray(aux["expert_counts"][2]).sum(-1)[depth[:, 1] == 1] == 0).all()
  assert (np.asarray(aux["drop_fraction"])[depth[:, 1] == 1, 2] == 0).all()
  assert len({tuple(np.round(row, 4).ravel()) for row in np.asarray(logits)}) == 6


def test_a_layer_beyond_the_depth_passes_its_input_through():
  model = mobilevit.MobileViTV2(rngs=nnx.Rngs(0), **WIDTH_DEPTH)
  space = model.search_space()
  images = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  arch = space.validate(space.sample(jax.random.key(1)))
  shallow = arch.replace(depth=np.array([1, 1, 1], np.int32))
  # The same network with stage 1's second layer given other experts: the same logits.
  other = shallow.replace(num_experts=shallow.num_experts.copy())
  other.num_experts[2] = 4
  np.testing.assert_array_equal(model(images, shallow)[0], model(images, other)[0])
  assert space.validate(other).key() == space.validate(shallow).key()  # unused layers at 1
  assert not np.allclose(model(images, shallow)[0], model(images, arch.replace(
      depth=np.array([1, 2, 1], np.int32), num_experts=other.num_experts))[0])


@pytest.mark.parametrize("config, message", [
    (dict(width_choices=(0.5, 0.75)), r"ending with 1.0 .* got \(0.5, 0.75\)"),
    (dict(width_choices=(0.75, 0.5, 1.0)), r"ascending .* got \(0.75, 0.5, 1.0\)"),
    (dict(width_choices=(0.0, 1.0)), r"in \(0, 1\]"),
    (dict(width_choices=(0.5, 1.5)), r"in \(0, 1\]"),
    (dict(search_depth=1), "search_depth must be True or False, got 1"),
    (dict(stage_widths=(8, 16)), "stage_widths must be 5 positive channel counts"),
])
def test_bad_width_and_depth_options_fail_at_construction(config, message):
  with pytest.raises(ValueError, match=message):
    models.build("mobilevit_v2", num_classes=2, rngs=nnx.Rngs(0), **config)


def test_a_width_supernet_names_a_missing_gene_and_its_dense_model_is_full():
  model = _abstract("mobilevit_v2", **WIDTH_DEPTH)
  images = jnp.zeros((1, 32, 32, 3))
  with pytest.raises(ValueError, match=r"searches gene width \(\[5\] values\); got "
                                       r"arch.width = None"):
    jax.eval_shape(lambda: model(images, search_space.Arch(np.ones(4, np.int32),
                                                           np.ones(4, np.int32))))
  dense = _abstract("mobilevit_v2_dense", **WIDTH_DEPTH)
  space = model.search_space()
  assert costs.count_params(dense) == int(space.params(space.dense()))
  assert costs.count_params(model) == int(space.params(space.largest()))
  assert space.params(space.smallest()) < space.params(space.dense())
