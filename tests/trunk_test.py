"""Tests of the frozen trunk: its cached features, its weights left alone by training, a loaded
trunk, and one of other shapes refused before anything compiles."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_SUPERNET
from flax import nnx

from configs import smoke
from moenas_jax import export, models, search, settings, supernet, trunk
from moenas_jax.compilation import count_compilations
from moenas_jax.data import lighting
from moenas_jax.models.mobilevit import TRUNK_STAGES


def _frozen(tiny_supernet, stages=3):
  model = nnx.clone(tiny_supernet[0])  # the shared supernet stays as it is
  model.freeze_trunk(stages)
  return model


def _images(examples, seed, size):
  return examples(seed, size)["image"].astype(np.float32) / 255


def test_the_tail_on_the_trunk_features_is_the_whole_model(tiny_supernet, examples):
  model = tiny_supernet[0]
  frozen = _frozen(tiny_supernet)
  images = _images(examples, 0, 4)
  features = frozen.trunk(images)
  assert features.shape == (4, 7, 7, 32)  # 28 → 14 (stem, stride 2) → 14 → 7 (stage2): 32 ch.
  for arch in (None, model.search_space().smallest()):
    np.testing.assert_allclose(frozen(features, arch)[0], model(images, arch)[0], atol=1e-5)
  assert frozen.frozen_names() == TRUNK_STAGES


def test_cached_features_are_the_trunk_of_each_image_clean_and_perturbed(tiny_supernet,
                                                                          examples):
  frozen = _frozen(tiny_supernet)
  data = examples(1, 7)
  cache = trunk.FeatureCache(frozen, batch_size=4)  # 2 batches, the last one padded
  exposure = lighting.indexed([("exposure", 2)])[0]
  with count_compilations() as compiled:
    clean, dark = cache.features(data), cache.features(data, exposure)
  assert compiled.of("trunk_features") == 1
  images = data["image"].astype(np.float32) / 255
  np.testing.assert_allclose(clean["image"], frozen.trunk(images), atol=1e-5)
  np.testing.assert_allclose(dark["image"], frozen.trunk(lighting.perturb(images, "exposure", 2)),
                             atol=1e-5)
  np.testing.assert_array_equal(dark["label"], data["label"])
  assert clean["image"].dtype == np.float32 and not np.allclose(clean["image"], dark["image"])


def test_the_optimizer_leaves_the_frozen_names_out():
  ones = {"kernel": jnp.ones((2, 2))}
  params = {"stem": ones, "head": ones}
  optimizer = supernet.make_optimizer(supernet.OptimizerSettings(
      learning_rate=0.1, weight_decay=0.5, warmup_steps=0, total_steps=1, final_fraction=1.0),
      frozen=("stem",))
  updates, _ = optimizer.update(params, optimizer.init(params), params)  # gradients of 1
  np.testing.assert_array_equal(updates["stem"]["kernel"], 0.0)
  # Adam's first step is lr · sign(g) = 0.1, plus lr · weight decay · p = 0.1 · 0.5 · 1.
  np.testing.assert_allclose(updates["head"]["kernel"], -0.15, rtol=1e-5)  # float32 Adam


def test_supernet_training_leaves_the_frozen_trunk_unchanged_in_one_compile(tiny_supernet):
  frozen = _frozen(tiny_supernet)
  graphdef, params, state = models.split(frozen)
  trainer = supernet.SupernetTrainer(
      graphdef, frozen.search_space(), archs_per_step=2, frozen=frozen.frozen_names(),
      optimizer=supernet.OptimizerSettings(warmup_steps=0, total_steps=3))
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(4, 7, 7, 32)).astype(np.float32),
           "label": np.array([0, 1, 2, 1], np.int32), "group": np.array([0, 1, 0, 1], np.int32)}
  before = nnx.to_pure_dict(nnx.state(frozen))
  carry = jax.tree.map(jnp.copy, (params, state))  # the step donates its inputs
  carry = (*carry, trainer.init(carry[0]))
  with count_compilations() as compiled:
    for step in range(3):
      *carry, _ = trainer.step(*carry, batch, jax.random.key(step))
  assert compiled.of("supernet_step") == 1
  nnx.update(frozen, carry[0], carry[1])
  after = nnx.to_pure_dict(nnx.state(frozen))
  for name in TRUNK_STAGES:  # weights and batch-norm statistics
    jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
  assert not np.allclose(after["head"]["kernel"], before["head"]["kernel"])
  assert not np.allclose(after["downsample"][0]["project"]["norm"]["mean"],
                         before["downsample"][0]["project"]["norm"]["mean"])


def test_a_loaded_trunk_replaces_the_trunk_only(tiny_supernet, tmp_path):
  model = tiny_supernet[0]
  export.save(tmp_path / "trunk", model, model_name="mobilevit_v2", arch=None,
              class_names=[str(c) for c in range(10)], group_names=["light", "dark"])
  target = nnx.clone(model)
  nnx.update(target, jax.tree.map(jnp.zeros_like, nnx.state(target)))
  target.freeze_trunk(2)
  trunk.load_trunk(target, tmp_path / "trunk")
  loaded, source = nnx.to_pure_dict(nnx.state(target)), nnx.to_pure_dict(nnx.state(model))
  for name in ("stem", "stage1"):
    jax.tree.map(np.testing.assert_array_equal, loaded[name], source[name])
  for name in ("stage2", "head"):
    jax.tree.map(lambda v: np.testing.assert_array_equal(v, 0), loaded[name])


def test_a_trunk_of_other_shapes_is_refused_before_compiling(tiny_supernet, tmp_path):
  wider = tmp_path / "wider"
  wider.mkdir()
  (wider / "metadata.json").write_text(json.dumps(
      {"model": "mobilevit_v2", "config": {**TINY_SUPERNET, "width_multiplier": 0.5}}))
  frozen = _frozen(tiny_supernet, 2)
  # The stem has 16 channels at both widths; stage1 has 64 · α: 32 there, 16 here.
  message = (r"does not fit the supernet's frozen stages \('stem', 'stage1'\): "
             r"stage1/project/conv/kernel is \(1, 1, 32, 32\) there and \(1, 1, 32, 16\) in "
             r"the supernet")
  with count_compilations() as compiled:
    with pytest.raises(ValueError, match=message):
      trunk.check_trunk(frozen, wider)
    config = smoke.get_config()
    config.supernet.update(frozen_stages=2, trunk_checkpoint=str(wider))
    with pytest.raises(settings.ConfigError, match="config.supernet.trunk_checkpoint=.*" + message):
      search.run_search(config, tmp_path / "run")
  assert compiled.names == []
  assert not (tmp_path / "run").exists()


def test_a_trunk_with_a_searched_gene_or_an_attack_is_refused(tmp_path):
  from configs import fahana
  config = fahana.get_config()
  config.supernet.frozen_stages = 2
  with pytest.raises(settings.ConfigError, match=r"config.supernet.frozen_stages=2: 2 frozen "
                     r"stages would freeze stage1's width gene"):
    settings.check(config, tmp_path)
  config = smoke.get_config()
  config.supernet.frozen_stages = 3
  config.train.adversarial.method = "trades"
  with pytest.raises(settings.ConfigError, match="config.train.adversarial.method='trades': "
                     "attacks act on images"):
    settings.check(config, tmp_path)


def test_a_search_on_a_frozen_trunk_compiles_each_function_once_per_stage(tmp_path):
  config = smoke.get_config()
  config.supernet.update(frozen_stages=3, trunk_steps=2, steps=2, warmup_steps=1,
                         checkpoint_every=2)
  config.search.update(candidates=4, bn_batches=1)
  config.train.objective.name = "erm"
  config.update(baselines=())
  summary = search.run_search(config, tmp_path / "run")
  compiled = summary["compilations"]
  assert compiled["trunk"] == {"supernet_step": 1, "trunk_features": 1}  # whole, then cache
  assert compiled["supernet"] == {"supernet_step": 1}  # the tail's step
  assert compiled["search"] == {"bn_recalibrate": 1, "population_counts": 1}
  assert compiled["final"] == {"population_counts": 1, "train_step": 1}
  assert set(summary["timing"]) >= {"trunk", "supernet", "search", "final"}
  exported = export.load(tmp_path / "run" / "final")  # the whole model, on images
  assert exported.predict(np.zeros((2, 28, 28, 3), np.float32)).shape == (2, 10)
