"""Tests of the reward, the size budget and the Pareto archive, on hand-worked examples."""

import itertools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from moenas_jax import reward
from moenas_jax.search_space import Arch, MoELayerShape, SearchSpace

# P = 3 candidates.
METRICS = {"accuracy": [0.9, 0.8, 0.7], "disparity": [0.1, 0.0, 0.3],
           "robustness": [0.8, 0.6, 0.5], "generalization_gap": [0.05, -0.1, 0.2],
           "worst_cell_accuracy": [0.5, 0.4, 0.0]}
# Default weights (1, 0.5, 0.5, 0):  0.9 − 0.1 + 0.4 − 0.025 = 1.175;  0.8 − 0 + 0.3 − 0
# (a negative gap costs nothing) = 1.1;  0.7 − 0.3 + 0.25 − 0.1 = 0.55.
UNCONSTRAINED = [1.175, 1.1, 0.55]


def test_reward_by_hand_with_numpy_and_jax():
  as_numpy = {name: np.array(values) for name, values in METRICS.items()}
  np.testing.assert_allclose(reward.scalar_reward(as_numpy), UNCONSTRAINED, rtol=1e-12)
  np.testing.assert_allclose(reward.scalar_reward(METRICS), UNCONSTRAINED, rtol=1e-12)  # lists
  params = np.array([100, 200, 150])
  # Budget 150: candidate 1 exceeds it by 200/150 − 1 = 1/3; the floor is −(1 + 1 + 0.5).
  expected = [1.175, -2.5 - 1 / 3, 0.55]
  out = reward.reward(as_numpy, params, param_budget=150)
  assert isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, expected, rtol=1e-12)
  as_jax = {name: jnp.array(values) for name, values in METRICS.items()}
  jitted = jax.jit(lambda m: reward.reward(m, params, param_budget=150))(as_jax)
  assert isinstance(jitted, jax.Array)
  np.testing.assert_allclose(jitted, expected, rtol=1e-6)
  # MAC budget 20 as well: candidate 2 exceeds it by 0.5.
  out = reward.reward(as_numpy, params, np.array([10, 10, 30]), param_budget=150,
                      mac_budget=20)
  np.testing.assert_allclose(out, [1.175, -2.5 - 1 / 3, -3.0], rtol=1e-12)
  # A worst-cell weight of 0.2 adds 0.1, 0.08, 0.
  weights = reward.RewardWeights(worst_cell=0.2)
  np.testing.assert_allclose(reward.scalar_reward(as_numpy, weights), [1.275, 1.18, 0.55],
                             rtol=1e-12)


def test_every_infeasible_candidate_ranks_below_every_feasible_one():
  weights = reward.RewardWeights(disparity=2.0, robustness=1.0, gap=3.0, worst_cell=1.0)
  # The worst feasible metrics and the barely infeasible one (3 · 10^9 MACs: beyond int32).
  worst = {"accuracy": 0.0, "disparity": 1.0, "robustness": 0.0, "generalization_gap": 1.0,
           "worst_cell_accuracy": 0.0}
  best = {"accuracy": 1.0, "disparity": 0.0, "robustness": 1.0, "generalization_gap": -1.0,
          "worst_cell_accuracy": 1.0}
  metrics = {name: np.array([worst[name], best[name], best[name]]) for name in worst}
  macs = np.array([3_000_000_000, 3_000_000_001, 3_000_000_002])
  out = reward.reward(metrics, np.array([1, 1, 1]), macs, weights=weights, param_budget=1,
                      mac_budget=3_000_000_000)
  np.testing.assert_allclose(out[0], -5.0)  # −λ_disp − λ_gap
  assert out[0] > out[1] > out[2] and out[1] <= reward.infeasible_floor(weights) == -6.0
  np.testing.assert_array_equal(
      reward.within_budget(np.array([1, 1, 1]), macs, param_budget=1, mac_budget=3e9),
      [True, False, False])


def test_weights_from_config_and_missing_metrics():
  config = ml_collections.ConfigDict({"disparity": 2.0, "gap": 0.0})
  assert reward.RewardWeights.from_config(config) == reward.RewardWeights(2.0, 0.5, 0.0, 0.0)
  with pytest.raises(ValueError, match=r"unknown reward weights \['fairness'\]"):
    reward.RewardWeights.from_config({"fairness": 1.0})
  with pytest.raises(ValueError, match="reward weight gap=-0.5 must be a finite number >= 0"):
    reward.RewardWeights(gap=-0.5)
  metrics = {"accuracy": 0.8, "disparity": 0.1}
  with pytest.raises(ValueError, match=r"needs metrics\['robustness'\] \(its weight is 0.5\)"):
    reward.scalar_reward(metrics)
  no_robustness = reward.RewardWeights(robustness=0.0, gap=0.0)
  np.testing.assert_allclose(reward.scalar_reward(metrics, no_robustness), 0.7)
  with pytest.raises(ValueError, match="mac_budget=10 is set but no MACs were given"):
    reward.reward(metrics, 5, weights=no_robustness, mac_budget=10)


SPACE = SearchSpace(max_experts=(3, 2), max_top_k=(2, 2),
                    layers=(MoELayerShape(4, 8, 5), MoELayerShape(6, 4, 3)),
                    base_params=100, base_macs=1000)


def test_the_dense_candidate_is_the_smallest_and_check_budget_refuses_less():
  archs = [Arch(np.array(e, np.int32), np.array(k, np.int32))
           for e in itertools.product((1, 2, 3), (1, 2))
           for k in itertools.product((1, 2), (1, 2)) if all(np.array(k) <= np.array(e))]
  params = [int(SPACE.params(a)) for a in archs]
  macs = [int(SPACE.macs(a)) for a in archs]
  dense_params, dense_macs = int(SPACE.params(SPACE.dense())), int(SPACE.macs(SPACE.dense()))
  assert min(params) == dense_params and min(macs) == dense_macs
  # Dense: 100 + (2·4·8 + 8 + 4) + (2·6·4 + 4 + 6) = 234 params; 1000 + 5·64 + 3·48 = 1464 MACs.
  assert (dense_params, dense_macs) == (234, 1464)
  reward.check_budget(SPACE, 234, 1464)
  reward.check_budget(SPACE, None)
  with pytest.raises(ValueError, match=r"param_budget=233 is below the 234 parameters of the "
                                       r"smallest candidate .* at least 234"):
    reward.check_budget(SPACE, 233)
  with pytest.raises(ValueError, match=r"mac_budget=1,000 is below the 1,464 MACs per image"):
    reward.check_budget(SPACE, 10_000, 1000)
  with pytest.raises(ValueError, match="param_budget=0 must be a positive number"):
    reward.check_budget(SPACE, 0)


def _entry(name, accuracy, disparity, robustness, gap, params):
  return {"arch": {"num_experts": [name], "top_k": [1]},
          "metrics": {"accuracy": accuracy, "disparity": disparity, "robustness": robustness,
                      "generalization_gap": gap, "params": params}}


# Objectives: accuracy ↑, disparity ↓, robustness ↑, gap ↓, params ↓.
A = _entry(1, 0.90, 0.10, 0.80, 0.05, 1000)
B = _entry(2, 0.85, 0.05, 0.80, 0.05, 1000)  # less accurate than A but fairer: both stay
C = _entry(3, 0.88, 0.12, 0.78, 0.06, 1200)  # worse than A in all five: rejected
D = _entry(4, 0.90, 0.10, 0.80, 0.05, 900)   # A with fewer params: dominates A, A is removed
E = _entry(5, 0.80, 0.20, 0.70, 0.10, 500)   # worst but smallest: a trade-off, kept
F = _entry(6, 0.90, 0.10, 0.80, 0.05, 900)   # D's values for another arch: a tie, kept
B_AGAIN = {"arch": B["arch"], "metrics": {**B["metrics"], "accuracy": 0.99}}  # same arch: no


def test_pareto_archive_worked_example():
  archive = reward.ParetoArchive()
  added = [archive.add(e) for e in (A, B, C, D, E, F, B_AGAIN)]
  assert added == [True, True, False, True, True, True, False]
  # Best accuracy first; D and F tie on every objective and are ordered by their arch JSON.
  assert [e["arch"]["num_experts"][0] for e in archive.front] == [4, 6, 2, 5]
  assert reward.dominates(D["metrics"], A["metrics"])
  assert not reward.dominates(D["metrics"], F["metrics"])
  assert not reward.dominates(A["metrics"], B["metrics"])
  assert not reward.dominates(B["metrics"], A["metrics"])
  # The front does not depend on the order of additions.
  for order in ((F, E, D, C, B, A), (C, E, B, F, A, D)):
    other = reward.ParetoArchive()
    for e in order:
      other.add(e)
    assert other.front == archive.front
  # JSON round trip; then one candidate better in everything leaves it alone in the front.
  restored = reward.ParetoArchive.from_state(json.loads(json.dumps(archive.state())))
  assert restored.front == archive.front and restored.objectives == archive.objectives
  assert restored.add(_entry(7, 0.95, 0.01, 0.90, 0.0, 400))
  assert [e["arch"]["num_experts"][0] for e in restored.front] == [7]


def test_pareto_archive_entries_and_objectives():
  archive = reward.ParetoArchive([("accuracy", "max"), ("params", "min")])
  entry = {"arch": {"num_experts": [2]}, "step": 3,
           "metrics": {"accuracy": np.float32(0.5), "params": np.int64(10),
                       "group_accuracy": jnp.array([0.4, jnp.nan])}}
  assert archive.add(entry)
  assert archive.front == [{"arch": {"num_experts": [2]}, "step": 3,
                            "metrics": {"accuracy": 0.5, "params": 10,
                                        "group_accuracy": [0.4000000059604645, None]}}]
  with pytest.raises(ValueError, match=r"lack the Pareto objectives \['params'\]"):
    archive.add({"arch": {}, "metrics": {"accuracy": 0.5}})
  with pytest.raises(ValueError, match="objective accuracy=nan is not a finite number"):
    archive.add({"arch": {}, "metrics": {"accuracy": np.nan, "params": 1}})
  with pytest.raises(ValueError, match="must be JSON-able"):
    archive.add({"arch": Arch(np.ones(1), np.ones(1)), "metrics": {"accuracy": 1, "params": 1}})
  with pytest.raises(ValueError, match=r"must be distinct \(name, 'max' \| 'min'\) pairs"):
    reward.ParetoArchive([("accuracy", "up")])
