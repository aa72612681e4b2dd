"""Tests of the deterministic stratified split."""

import numpy as np
import pytest

from moenas_jax.data import splits


def test_sizes_are_exact_and_every_stratum_is_spread():
  strata = np.repeat(np.arange(10), 5)  # 10 cells of 5: rounding per cell alone gives 40/0/10
  split = splits.stratified_split(strata, (0.8, 0.1, 0.1), seed=0)
  np.testing.assert_array_equal(np.bincount(split), [40, 5, 5])
  for cell in range(10):
    assert np.bincount(split[strata == cell], minlength=3)[0] == 4  # 80% of 5 in every cell


def test_the_seed_fixes_the_split():
  strata = np.repeat(np.arange(3), [30, 12, 9])
  a = splits.stratified_split(strata, (0.6, 0.2, 0.2), seed=1)
  np.testing.assert_array_equal(a, splits.stratified_split(strata, (0.6, 0.2, 0.2), seed=1))
  assert not np.array_equal(a, splits.stratified_split(strata, (0.6, 0.2, 0.2), seed=2))
  np.testing.assert_array_equal(np.bincount(a), [31, 10, 10])


def test_bad_fractions_are_refused():
  with pytest.raises(ValueError, match=r"3 non-negative numbers summing to 1.*\(0.5, 0.5\)"):
    splits.stratified_split(np.zeros(4), (0.5, 0.5), seed=0)
