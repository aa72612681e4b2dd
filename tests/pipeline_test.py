"""Tests of the batch pipeline: shapes, determinism, masks, the held training subset."""

import numpy as np
import pytest

from moenas_jax.data import pipeline


def _examples(size=10):
  images = np.arange(size, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
  return {"image": images, "label": np.arange(size, dtype=np.int32) % 3,
          "group": np.arange(size, dtype=np.int32) % 2}


class _Source(list):
  def __getitems__(self, indices):
    return [self[i] for i in indices]


def test_read_split_stacks_examples_and_checks_ranges():
  source = _Source({"image": np.full((2, 2, 3), i, np.uint8), "label": i % 3, "group": i % 2}
                   for i in range(5))
  arrays = pipeline.read_split(source, num_classes=3, num_groups=2)
  assert arrays["image"].shape == (5, 2, 2, 3) and arrays["image"].dtype == np.uint8
  np.testing.assert_array_equal(arrays["group"], [0, 1, 0, 1, 0])
  with pytest.raises(ValueError, match="test: example 1 has group 1, outside the 1 declared"):
    pipeline.read_split(source, num_classes=3, num_groups=1, name="test")
  with pytest.raises(ValueError, match="has no examples"):
    pipeline.read_split(_Source(), num_classes=3, num_groups=2)


def test_train_batches_are_a_deterministic_shuffle_per_epoch():
  examples = _examples()
  epoch0 = list(pipeline.train_batches(examples, 4, seed=7, epoch=0))
  again = list(pipeline.train_batches(examples, 4, seed=7, epoch=0))
  epoch1 = list(pipeline.train_batches(examples, 4, seed=7, epoch=1))
  assert len(epoch0) == 2  # 10 examples, batches of 4: the remainder of 2 waits
  seen = np.concatenate([(b["image"][:, 0, 0, 0] * 255).round() for b in epoch0])
  assert len(set(seen.tolist())) == 8  # distinct examples
  for a, b in zip(epoch0, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(epoch0, epoch1))
  batch = epoch0[0]
  assert batch["image"].dtype == np.float32 and batch["image"].max() <= 1.0
  assert batch["label"].dtype == np.int32 and batch["group"].dtype == np.int32
  with pytest.raises(ValueError, match="batch_size=11 must be in 1..10"):
    next(pipeline.train_batches(examples, 11, seed=0, epoch=0))


def test_eval_batches_have_one_shape_and_mask_the_padding():
  batches = list(pipeline.eval_batches(_examples(), 4))
  assert [b["image"].shape for b in batches] == [(4, 2, 2, 3)] * 3
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]),
                                [True] * 10 + [False] * 2)
  order = np.concatenate([(b["image"][:, 0, 0, 0] * 255).round() for b in batches])[:10]
  np.testing.assert_array_equal(order, np.arange(10))  # every example once, in order


def test_held_train_subset_is_fixed_by_the_seed():
  examples = _examples(100)
  a = pipeline.held_train_subset(examples, 20, seed=3)
  b = pipeline.held_train_subset(examples, 20, seed=3)
  c = pipeline.held_train_subset(examples, 20, seed=4)
  assert len(a["label"]) == 20 and len(set(a["image"][:, 0, 0, 0].tolist())) == 20
  np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(a["image"], c["image"])
  assert len(pipeline.held_train_subset(examples, 500, seed=3)["label"]) == 100


def test_sampled_batches_are_fixed_by_the_seed_and_reshuffle_each_pass():
  examples = _examples()
  batches = list(pipeline.sampled_batches(examples, 4, 5, seed=[3, 4]))
  again = list(pipeline.sampled_batches(examples, 4, 5, seed=[3, 4]))
  other = list(pipeline.sampled_batches(examples, 4, 5, seed=[3, 5]))
  ids = [(b["image"][:, 0, 0, 0] * 255).round().astype(int).tolist() for b in batches]
  assert len(ids) == 5 and all(len(set(batch)) == 4 for batch in ids)
  assert len(set(ids[0] + ids[1])) == 8  # one pass: 2 batches of distinct examples, 2 left
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not all(np.array_equal(a["image"], b["image"]) for a, b in zip(batches, other))
  assert batches[0]["label"].dtype == np.int32 and "mask" not in batches[0]
  with pytest.raises(ValueError, match="batch_size=11 must be in 1..10"):
    next(pipeline.sampled_batches(examples, 11, 1, seed=0))
