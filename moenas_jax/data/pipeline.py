"""Batches for training and evaluation, from a dataset split held in memory.

A split is read once into NumPy arrays (`read_split`): uint8 images [N, H, W, C], int32 labels
and group ids. Batches are `{"image": float32 [B, H, W, C] in [0, 1], "label": int32 [B],
"group": int32 [B]}` (float32 "images", e.g. a frozen trunk's cached features, pass as they
are); evaluation batches add `"mask": bool [B]` and always have the same shape
(the last one is padded and masked), so the evaluator compiles once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

Examples = dict[str, np.ndarray]


def read_split(source: Sequence[dict], num_classes: int, num_groups: int,
               name: str = "split") -> Examples:
  """All examples of a random-access source as arrays; checks label and group ranges."""
  examples = source.__getitems__(list(range(len(source)))) if len(source) else []
  if not examples:
    raise ValueError(f"{name} has no examples; check the dataset and its split names")
  arrays = {
      "image": np.stack([np.asarray(e["image"], np.uint8) for e in examples]),
      "label": np.asarray([e["label"] for e in examples], np.int32),
      "group": np.asarray([e["group"] for e in examples], np.int32),
  }
  for key, count in (("label", num_classes), ("group", num_groups)):
    bad = (arrays[key] < 0) | (arrays[key] >= count)
    if bad.any():
      raise ValueError(f"{name}: example {int(np.argmax(bad))} has {key} "
                       f"{int(arrays[key][bad][0])}, outside the {count} declared {key}s")
  return arrays


def _batch(examples: Examples, indices: np.ndarray) -> dict[str, np.ndarray]:
  images = examples["image"][indices]
  return {"image": images.astype(np.float32) / 255.0 if images.dtype == np.uint8 else images,
          "label": examples["label"][indices], "group": examples["group"][indices]}


def epoch_order(size: int, seed: int, epoch: int) -> np.ndarray:
  """The shuffled example order of one epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(size)


def train_batches(examples: Examples, batch_size: int, seed: int,
                  epoch: int) -> Iterator[dict[str, np.ndarray]]:
  """One epoch of shuffled full batches (the remainder waits for a later epoch's order)."""
  size = len(examples["label"])
  if not 0 < batch_size <= size:
    raise ValueError(f"batch_size={batch_size} must be in 1..{size} (the split's size)")
  order = epoch_order(size, seed, epoch)
  for start in range(0, size - batch_size + 1, batch_size):
    yield _batch(examples, order[start:start + batch_size])


def sampled_batches(examples: Examples, batch_size: int, num_batches: int,
                    seed: int | Sequence[int]) -> Iterator[dict[str, np.ndarray]]:
  """`num_batches` shuffled full batches of distinct examples, a function of `seed` only.

  Like `train_batches` over consecutive epochs, but any number of batches and any seed
  NumPy accepts (e.g. a JAX key's data): each pass is a fresh shuffle whose remainder is dropped.
  """
  size = len(examples["label"])
  if not 0 < batch_size <= size:
    raise ValueError(f"batch_size={batch_size} must be in 1..{size} (the split's size)")
  rng = np.random.default_rng(seed)
  order = np.zeros(0, np.int64)
  for _ in range(num_batches):
    if len(order) < batch_size:
      order = rng.permutation(size)
    yield _batch(examples, order[:batch_size])
    order = order[batch_size:]


def eval_batches(examples: Examples, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example once, in order, in batches of exactly batch_size with a validity mask."""
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  size = len(examples["label"])
  for start in range(0, size, batch_size):
    indices = np.arange(start, start + batch_size)
    valid = indices < size
    batch = _batch(examples, np.where(valid, indices, 0))
    batch["mask"] = valid
    yield batch


def held_train_subset(examples: Examples, size: int, seed: int) -> Examples:
  """A fixed random subset of a split, e.g. training examples to measure the gap on."""
  total = len(examples["label"])
  indices = np.sort(np.random.default_rng([seed, 1]).choice(total, min(size, total),
                                                            replace=False))
  return {key: values[indices] for key, values in examples.items()}
