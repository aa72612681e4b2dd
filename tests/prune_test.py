"""Tests of expert pruning: usage on a calibration split, the tree surgery, the exported size."""

import jax
import numpy as np
import pytest
from flax import nnx

from moenas_jax import costs, export, models, prune
from moenas_jax.compilation import count_compilations
from moenas_jax.search_space import Arch
from tests.conftest import TINY_SUPERNET

# Layers 0 and 1: all 3 experts, top-2; layer 2: one expert.
ARCH = Arch(np.array([3, 3, 1], np.int32), np.array([2, 2, 1], np.int32))
FFN_1 = ("vit", 1, "transformer", 0, "ffn")  # MoE layer 1: D = 48, H = 96
NORM_1 = ("vit", 1, "transformer", 0, "ffn_norm")


def _examples(size):
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (size, 28, 28, 3), dtype=np.uint8),
          "label": rng.integers(0, 10, size).astype(np.int32),
          "group": rng.integers(0, 2, size).astype(np.int32)}


def _images(examples):
  return examples["image"].astype(np.float32) / 255


def _replace(params, values):
  """A copy of params with the leaves at the given flat paths replaced."""
  return nnx.map_state(lambda path, v: v.copy(values.get(path, v.get_value())), params)


def _value(params, path):
  return np.asarray(dict(nnx.to_flat_state(params))[path].get_value())


@pytest.fixture(scope="module")
def forward(tiny_supernet):
  """jit(apply) of the tiny supernet: (params, state, images, arch) → (logits, state, aux)."""
  graphdef = tiny_supernet[1]
  return jax.jit(lambda params, state, images, arch: models.apply(graphdef, params, state,
                                                                   images, arch))


def test_usage_counts_each_valid_example_once_in_one_compile(tiny_supernet, forward):
  _, graphdef, params, state = tiny_supernet
  examples = _examples(5)
  other = Arch(np.array([2, 1, 3], np.int32), np.array([1, 1, 2], np.int32))
  with count_compilations() as seen:  # 2 batches: the second holds 1 example and 3 pads
    usage = prune.expert_usage(graphdef, params, state, ARCH, examples, batch_size=4)
    usage_other = prune.expert_usage(graphdef, params, state, other, examples, batch_size=4)
  assert seen.of("usage_counts") == 1
  np.testing.assert_array_equal(usage_other[1], [1.0, 0.0, 0.0])
  assert usage_other[0][2] == 0 and usage_other[2].min() > 0
  # The same 5 examples as one plain batch of 5 (no padding) of the model: the same shares.
  _, _, aux = forward(params, state, _images(examples), ARCH)
  for shares, counts in zip(usage, aux["expert_counts"]):
    np.testing.assert_array_equal(shares, np.asarray(counts) / int(counts.sum()))
  np.testing.assert_allclose([shares.sum() for shares in usage], 1.0, rtol=1e-12)
  assert usage[0].min() > 0 and usage[1].min() > 0  # every active expert took choices
  np.testing.assert_array_equal(usage[2], [1.0, 0.0, 0.0])  # one active expert takes all


def test_pruning_an_unused_expert_keeps_the_logits_and_shrinks_the_export(tiny_supernet,
                                                                          forward):
  model, graphdef, params, state = tiny_supernet
  space = model.search_space()
  dim, hidden = space.layers[1].dim, space.layers[1].hidden
  assert (dim, hidden) == (48, 96)
  # Layer 1's tokens get +3 on every channel (its norm's bias) and expert 1 the router column
  # -1: its logit is about -3 · D = -144 for every token while the others stay near 0 (router
  # weights ~ N(0, 0.02)), so no token picks it and each token's top-2 is experts 0 and 2.
  router = _value(params, (*FFN_1, "router")).copy()
  router[:, 1] = -1.0
  params = _replace(params, {(*FFN_1, "router"): router,
                             (*NORM_1, "bias"): np.full(dim, 3.0, np.float32)})
  examples = _examples(5)
  usage = prune.expert_usage(graphdef, params, state, ARCH, examples, batch_size=4)
  np.testing.assert_array_equal(usage[1], [0.5, 0.0, 0.5])

  pruned, arch, report = prune.prune(params, ARCH, usage, min_fraction=0.01)
  assert report[1] == {"usage": [0.5, 0.0, 0.5], "kept": [0, 2], "removed": [1],
                       "num_experts": (3, 2), "top_k": (2, 2)}
  assert [layer["removed"] for layer in report] == [[], [1], []]
  np.testing.assert_array_equal(arch.num_experts, [3, 2, 1])
  np.testing.assert_array_equal(arch.top_k, [2, 2, 1])
  images = _images(examples)
  np.testing.assert_array_equal(forward(pruned, state, images, arch)[0],
                                forward(params, state, images, ARCH)[0])
  # One expert of layer 1 less: D·H + H + H·D + D = 2·48·96 + 96 + 48, and its router column D.
  assert int(space.params(ARCH)) - int(space.params(arch)) == 2 * 48 * 96 + 96 + 48 + 48

  supernet = nnx.clone(model)
  nnx.update(supernet, pruned)
  small = export.standalone(supernet, arch)
  assert costs.count_params(small) == int(space.params(arch))
  ffn = small.vit[1].transformer[0].ffn
  np.testing.assert_array_equal(ffn.router[...], router[:, [0, 2]])
  np.testing.assert_array_equal(ffn.w_out[...], _value(params, (*FFN_1, "w_out"))[[0, 2]])
  assert _value(params, (*FFN_1, "router"))[0, 1] == -1.0  # the input was not changed


def test_prune_keeps_the_most_used_expert_clips_top_k_and_permutes_weights(tiny_supernet):
  _, _, params, _ = tiny_supernet
  arch = Arch(np.array([3, 3, 2]), np.array([2, 2, 2]))
  usage = [np.array([0.5, 0.3, 0.2]), np.array([0.1, 0.6, 0.3]), np.array([0.7, 0.3, 0.0])]

  _, alone, report = prune.prune(params, arch, usage, min_fraction=1.0)
  assert [layer["kept"] for layer in report] == [[0], [1], [0]]  # below 1: the most used
  assert [layer["removed"] for layer in report] == [[1, 2], [0, 2], [1]]
  np.testing.assert_array_equal(alone.num_experts, [1, 1, 1])
  np.testing.assert_array_equal(alone.top_k, [1, 1, 1])

  pruned, arch, report = prune.prune(params, arch, usage, min_fraction=0.25)
  assert [layer["kept"] for layer in report] == [[0, 1], [1, 2], [0, 1]]
  assert [layer["removed"] for layer in report] == [[2], [0], []]  # expert 2 of layer 2 is off
  np.testing.assert_array_equal(arch.num_experts, [2, 2, 2])
  np.testing.assert_array_equal(arch.top_k, [2, 2, 2])
  orders = {("vit", 0, "transformer", 0, "ffn"): [0, 1, 2], FFN_1: [1, 2, 0],
            ("vit", 2, "transformer", 0, "ffn"): [0, 1, 2]}
  new = dict(nnx.to_flat_state(pruned))
  for path, variable in nnx.to_flat_state(params):
    old = np.asarray(variable.get_value())
    if path[:-1] in orders:  # router [D, E]: columns; experts [E, ...]: rows
      axis = 1 if path[-1] == "router" else 0
      old = np.take(old, orders[path[:-1]], axis=axis)
    np.testing.assert_array_equal(new[path].get_value(), old, err_msg=str(path))


def test_bad_inputs_are_named(tiny_supernet):
  _, _, params, _ = tiny_supernet
  usage = [np.array([0.5, 0.5, 0.0])] * 3
  arch = Arch(np.array([2, 2, 2]), np.array([1, 1, 1]))
  for bad in (-0.1, 1.5, float("nan")):
    with pytest.raises(ValueError, match=r"min_fraction=.* must be in \[0, 1\]"):
      prune.prune(params, arch, usage, min_fraction=bad)
  with pytest.raises(ValueError, match=r"usage must hold one array per MoE layer"):
    prune.prune(params, arch, usage[:2], min_fraction=0.1)
  with pytest.raises(ValueError, match=r"num_experts\[0\] = 4 must be in 1..3"):
    prune.prune(params, Arch(np.array([4, 2, 2]), np.ones(3, np.int32)), usage,
                min_fraction=0.1)
  with pytest.raises(ValueError, match="params hold no MoE layer"):
    prune.prune(nnx.State({"head": params["head"]}), arch, usage, min_fraction=0.1)
  # Routing groups of 32 tokens would span two 16-token images: usage cannot be per image.
  grouped = nnx.eval_shape(lambda: models.build(
      "mobilevit_v2", rngs=nnx.Rngs(0), **TINY_SUPERNET, moe_settings={"group_size": 32}))
  with pytest.raises(ValueError, match=r"group_size=32 tokens, which span its 16-token"):
    prune.expert_usage(*models.split(grouped), arch, _examples(2), batch_size=2)
