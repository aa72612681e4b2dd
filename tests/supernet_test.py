"""Tests of supernet training: sandwich rule, averaged statistics, one compile, loss decreases."""

import jax
import numpy as np
import optax
import pytest

from moenas_jax import adversarial, loop, loss, models, search_space, supernet
from moenas_jax.compilation import count_compilations
from moenas_jax.data import fashion_tones, pipeline
from moenas_jax.search_space import MoELayerShape, SearchSpace


def _copy(tree):
  """A host copy: the trainer's step donates (consumes) its inputs."""
  return jax.tree.map(np.array, tree)


def test_sandwich_holds_the_largest_the_smallest_and_random_candidates(tiny_supernet):
  space = tiny_supernet[0].search_space()
  archs = supernet.sandwich(space, jax.random.key(0), 5)
  space.validate(archs)
  np.testing.assert_array_equal(archs.num_experts[0], space.max_experts)
  np.testing.assert_array_equal(archs.top_k[0], space.max_top_k)
  np.testing.assert_array_equal(archs.num_experts[1], 1)
  np.testing.assert_array_equal(archs.top_k[1], 1)
  assert archs.num_experts.shape == (5, 3)
  assert supernet.sandwich(space, jax.random.key(0), 2).num_experts.shape == (2, 3)


def test_sandwich_trains_the_widest_deepest_and_the_narrowest_shallowest():
  space = SearchSpace(max_experts=(4,) * 3, max_top_k=(2,) * 3,
                      layers=(MoELayerShape(4, 8, 4),) * 3, base_params=0, base_macs=0,
                      width_maxima=(3, 3), depth_maxima=(1, 2))
  archs = jax.jit(supernet.sandwich, static_argnums=(0, 2))(space, jax.random.key(0), 4)
  assert [search_space.to_dict(a) for a in search_space.unstack(archs)[:2]] == [
      {"num_experts": [4] * 3, "top_k": [2] * 3, "width": [3, 3], "depth": [1, 2]},
      {"num_experts": [1] * 3, "top_k": [1] * 3, "width": [1, 1], "depth": [1, 1]}]
  space.validate(archs)


def test_a_step_averages_batch_statistics_over_candidates_and_is_deterministic(tiny_supernet):
  model, graphdef, params, state = tiny_supernet
  space = model.search_space()
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((4, 28, 28, 3), np.float32),
           "label": np.array([0, 1, 2, 1], np.int32), "group": np.zeros(4, np.int32)}
  new_state = jax.jit(lambda arch: models.apply(graphdef, params, state, batch["image"], arch,
                                                train=True)[1])
  expected = [new_state(arch) for arch in (space.largest(), space.smallest())]
  expected = jax.tree.map(lambda a, b: (a + b) / 2, *expected)
  trainer = supernet.SupernetTrainer(graphdef, space, archs_per_step=2,
                                     optimizer=supernet.OptimizerSettings(warmup_steps=2,
                                                                          total_steps=10))
  runs = []
  with count_compilations() as seen:
    for _ in range(2):
      p, s = _copy(params), _copy(state)
      o = trainer.init(p)
      for step in range(2):
        p, s, o, logs = trainer.step(p, s, o, batch, jax.random.key(step))
        if step == 0:
          first_state = _copy(s)
      runs.append((_copy(p), logs))
  assert seen.of("supernet_step") == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               first_state, expected)
  jax.tree.map(np.testing.assert_array_equal, runs[0][0], runs[1][0])
  assert set(runs[0][1]) >= {"loss", "cross_entropy", "aux_loss", "accuracy_largest"}


def test_trades_attacks_each_candidate_in_the_one_compiled_step(tiny_supernet):
  model, graphdef, params, state = tiny_supernet
  space = model.search_space()
  rng = np.random.default_rng(1)
  batch = {"image": rng.random((4, 28, 28, 3), np.float32),
           "label": np.array([0, 1, 2, 1], np.int32), "group": np.zeros(4, np.int32)}
  optimizer = supernet.OptimizerSettings(warmup_steps=2, total_steps=10)
  trainer = supernet.SupernetTrainer(graphdef, space, archs_per_step=2, optimizer=optimizer,
                                     adversarial_settings=adversarial.AdversarialSettings("trades"))
  with count_compilations() as seen:
    p, s = _copy(params), _copy(state)
    *_, logs = trainer.step(p, s, trainer.init(p), batch, jax.random.key(0))
  assert seen.of("supernet_step") == 1
  # Two candidates: the largest and the dense one. TRADES adds β · KL > 0 to their clean
  # cross-entropies (no gate noise: the clean forwards are those of `loss.terms`).
  archs = supernet.sandwich(space, jax.random.key(0), 2)
  clean = jax.jit(jax.vmap(lambda arch: loss.terms(graphdef, params, state, batch, arch)[0]))
  assert float(logs["cross_entropy"]) > float(clean(archs).mean()) + 1e-4
  with pytest.raises(ValueError, match="AdvMoE is for final training"):
    supernet.SupernetTrainer(graphdef, space, archs_per_step=2, optimizer=optimizer,
                             adversarial_settings=adversarial.AdversarialSettings("advmoe"))


def test_supernet_loss_decreases_on_the_embedded_dataset(tiny_supernet):
  train = fashion_tones.load("train")
  model, graphdef, params, state = tiny_supernet
  params, state = _copy(params), _copy(state)
  trainer = supernet.SupernetTrainer(
      graphdef, model.search_space(), archs_per_step=2,
      optimizer=supernet.OptimizerSettings(learning_rate=3e-3, warmup_steps=5, total_steps=30))
  opt_state = trainer.init(params)
  losses = []
  for step, batch in zip(range(30), pipeline.train_batches(train, 32, seed=0, epoch=0)):
    params, state, opt_state, logs = trainer.step(params, state, opt_state, batch,
                                                  jax.random.key(step))
    loop.check_finite(logs, step)
    losses.append(float(logs["loss"]))
  # Chance level is ln(10) = 2.30; the last steps must be clearly below the first ones.
  assert np.mean(losses[:5]) > 2.1
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3


def test_bad_settings_and_a_nan_loss_are_refused(tiny_supernet):
  model, graphdef, _, _ = tiny_supernet
  space = model.search_space()
  with pytest.raises(ValueError, match="archs_per_step=1"):
    supernet.SupernetTrainer(graphdef, space, archs_per_step=1,
                             optimizer=supernet.OptimizerSettings())
  with pytest.raises(ValueError, match="warmup_steps=20"):
    supernet.OptimizerSettings(warmup_steps=20, total_steps=10)
  with pytest.raises(FloatingPointError, match="at step 7"):
    loop.check_finite({"loss": np.float32("nan")}, 7)
  with pytest.raises(FloatingPointError, match="gradient norm is inf at step 9"):
    loop.check_finite({"loss": np.float32(2.3), "grad_norm": np.float32("inf")}, 9)
  loop.check_finite({"loss": np.float32(2.3), "grad_norm": np.float32(0.5)}, 10)


def _flat(tree):
  """{'a/b/c': leaf} of a nested params tree (nnx.State or dicts)."""
  return {"/".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_weight_decay_is_masked_to_kernels_and_expert_matrices(tiny_supernet):
  params = tiny_supernet[2]
  mask = _flat(supernet.decay_mask(params))
  ffn = "vit/0/transformer/0/ffn"
  decayed = {name for name, value in mask.items() if value}
  for name in ("stem/conv/kernel", "stage1/depthwise/conv/kernel", "vit/0/to_tokens/kernel",
               "vit/0/transformer/0/attention/qkv/kernel", "head/kernel", f"{ffn}/w_in",
               f"{ffn}/w_out"):
    assert name in decayed, name
  for name in ("stem/norm/scale", "stem/norm/bias", "vit/0/norm/scale", "head/bias",
               "vit/0/transformer/0/attention/qkv/bias", "vit/0/transformer/0/ffn_norm/scale",
               f"{ffn}/b_in", f"{ffn}/b_out", f"{ffn}/router"):
    assert name in mask and name not in decayed, name
  # Every decayed leaf ends in a kernel or an expert matrix; nothing else is.
  assert {name.rsplit("/", 1)[1] for name in decayed} == {"kernel", "w_in", "w_out"}
  assert all(mask[name] for name in mask if name.rsplit("/", 1)[1] in ("w_in", "w_out"))

  # One step with zero gradients: Adam's update is 0, so only decay moves a weight, by
  # lr · wd · value on kernels (here 0.1 · 0.5 = 5% of it) and not at all elsewhere.
  # Shifted by 0.5 so that biases (zero at initialisation) would visibly decay too.
  params = jax.tree.map(lambda v: np.asarray(v) + 0.5, params)
  optimizer = supernet.make_optimizer(supernet.OptimizerSettings(
      learning_rate=0.1, weight_decay=0.5, warmup_steps=0, total_steps=10))
  @jax.jit  # one program, not one per leaf shape
  def step(params):
    zeros = jax.tree.map(jax.numpy.zeros_like, params)
    updates, _ = optimizer.update(zeros, optimizer.init(params), params)
    return optax.apply_updates(params, updates)

  new = _flat(step(params))
  old = _flat(params)
  np.testing.assert_allclose(new["head/kernel"], 0.95 * old["head/kernel"], rtol=1e-6)
  np.testing.assert_allclose(new[f"{ffn}/w_in"], 0.95 * old[f"{ffn}/w_in"], rtol=1e-6)
  for name in ("head/bias", "stem/norm/scale", f"{ffn}/router", f"{ffn}/b_in"):
    np.testing.assert_array_equal(new[name], old[name])


_DATA_PARALLEL_SCRIPT = """
import sys
from pathlib import Path
import jax, numpy as np
from configs import smoke
from moenas_jax.stages import data as data_stage, supernet as supernet_stage

assert jax.device_count() == 8
config = smoke.get_config()
config.log_every = 2
config.data.update(train_size=256, held_train_size=64, eval_size=100, eval_batch_size=100)
config.supernet.update(steps=6, checkpoint_every=2)  # batches of 32: 4 examples per device
root = Path(sys.argv[1])
data = data_stage.load_data(config, root)

class Stop(Exception):
  pass

def train(workdir, stop_at=None):
  def log(line):
    if stop_at and line.startswith(f"[supernet] {stop_at}/"):
      raise Stop
  model = supernet_stage.build_supernet(config, data)  # training donates its weights
  return supernet_stage.train_supernet(config, model, data, workdir, log)

straight = train(root / "straight")
try:
  train(root / "resumed", stop_at=4)  # stopped mid-epoch, after the checkpoint of step 2
except Stop:
  pass
resumed = train(root / "resumed")
sharding = jax.tree.leaves(resumed)[0].sharding
assert len(sharding.device_set) == 8, sharding  # restored replicated over the 8 devices
equal = jax.tree.map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))),
                     straight, resumed)
assert all(jax.tree.leaves(equal)), "resumed differs from uninterrupted"
print("ok")
"""


def test_data_parallel_training_on_8_devices_resumes_exactly(tmp_path):
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
  done = subprocess.run([sys.executable, "-c", _DATA_PARALLEL_SCRIPT, str(tmp_path)],
                        env=dict(os.environ, XLA_FLAGS=flags.strip(), PYTHONPATH=root,
                                 JAX_PLATFORMS="cpu"),
                        cwd=root, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().endswith("ok")
