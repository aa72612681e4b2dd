"""Deterministic stratified train/validation/test splits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "validation", "test")


def stratified_split(strata: np.ndarray, fractions: Sequence[float], seed: int) -> np.ndarray:
  """Split id (0 train, 1 validation, 2 test) per example, in the given fractions per stratum.

  Each stratum (e.g. a (label, group) cell) is shuffled from the seed and cut into the three
  splits. Rounding is carried from stratum to stratum, so the split sizes are exact overall
  and small strata still feed the small splits.
  """
  fractions = np.asarray(fractions, np.float64)
  if fractions.shape != (3,) or (fractions < 0).any() or not np.isclose(fractions.sum(), 1.0):
    raise ValueError(f"split fractions must be 3 non-negative numbers summing to 1 (train, "
                     f"validation, test), got {tuple(fractions.tolist())}")
  rng = np.random.default_rng(seed)
  split = np.zeros(len(strata), np.int32)
  assigned, seen = np.zeros(3, np.int64), 0
  for stratum in np.unique(strata):
    members = rng.permutation(np.flatnonzero(strata == stratum))
    seen += len(members)
    target = np.diff(np.round(np.cumsum(fractions) * seen), prepend=0).astype(np.int64)
    take = np.maximum(target - assigned, 0)
    take[2] = len(members) - take[:2].sum()
    if take[2] < 0:  # the first two splits asked for more than this stratum has
      take[1] = max(0, len(members) - take[0])
      take[0], take[2] = min(take[0], len(members)), 0
    split[members] = np.repeat(np.arange(3, dtype=np.int32), take)
    assigned += take
  return split


def resolve(given: Sequence | np.ndarray | None, labels: np.ndarray, groups: np.ndarray,
            fractions: Sequence[float], seed: int, source: str) -> np.ndarray:
  """Split ids from a user's split column (0/1/2 or names), else stratified by (label, group)."""
  if given is None:
    return stratified_split(labels * 100_000 + groups, fractions, seed)
  values = [str(v).strip() for v in np.asarray(given).tolist()]
  lookup = {**{str(i): i for i in range(3)}, **{name: i for i, name in enumerate(SPLIT_NAMES)}}
  bad = sorted(set(values) - set(lookup))
  if bad:
    raise ValueError(f"{source}: split values {bad} are not 0/1/2 or {list(SPLIT_NAMES)}")
  return np.array([lookup[v] for v in values], np.int32)
