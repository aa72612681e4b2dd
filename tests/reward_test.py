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


def _with(metrics, **costs):
  return {**metrics, **{name: np.asarray(value) for name, value in costs.items()}}


def test_reward_by_hand_with_numpy_and_jax():
  as_numpy = {name: np.array(values) for name, values in METRICS.items()}
  spec = reward.spec_from_config()
  np.testing.assert_allclose(spec.scalar_reward(as_numpy), UNCONSTRAINED, rtol=1e-12)
  np.testing.assert_allclose(spec.scalar_reward(METRICS), UNCONSTRAINED, rtol=1e-12)  # lists
  params = np.array([100, 200, 150])
  # Budget 150: candidate 1 exceeds it by 200/150 − 1 = 1/3; the floor is −(1 + 1 + 0.5).
  expected = [1.175, -2.5 - 1 / 3, 0.55]
  budgeted = reward.spec_from_config({"param_budget": 150})
  assert budgeted.infeasible_floor == -2.5
  out = budgeted.reward(_with(as_numpy, params=params))
  assert isinstance(out, np.ndarray)
  np.testing.assert_allclose(out, expected, rtol=1e-12)
  np.testing.assert_allclose(budgeted.budget_excess(_with(as_numpy, params=params)),
                             [0, 1 / 3, 0], rtol=1e-12)
  as_jax = {name: jnp.array(values) for name, values in METRICS.items()}
  jitted = jax.jit(lambda m: budgeted.reward({**m, "params": params}))(as_jax)
  assert isinstance(jitted, jax.Array)
  np.testing.assert_allclose(jitted, expected, rtol=1e-6)
  # MAC budget 20 as well: candidate 2 exceeds it by 0.5.
  both = reward.spec_from_config({"param_budget": 150, "mac_budget": 20})
  macs = np.array([10, 10, 30])
  np.testing.assert_allclose(both.reward(_with(as_numpy, params=params, macs=macs)),
                             [1.175, -2.5 - 1 / 3, -3.0], rtol=1e-12)
  # A worst-cell weight of 0.2 adds 0.1, 0.08, 0.
  np.testing.assert_allclose(reward.spec_from_config({"worst_cell": 0.2}).scalar_reward(as_numpy),
                             [1.275, 1.18, 0.55], rtol=1e-12)


def test_every_infeasible_candidate_ranks_below_every_feasible_one():
  spec = reward.spec_from_config({"disparity": 2.0, "robustness": 1.0, "gap": 3.0,
                                  "worst_cell": 1.0, "param_budget": 1,
                                  "mac_budget": 3_000_000_000})
  # The worst feasible metrics and the barely infeasible one (3 · 10^9 MACs: beyond int32).
  worst = {"accuracy": 0.0, "disparity": 1.0, "robustness": 0.0, "generalization_gap": 1.0,
           "worst_cell_accuracy": 0.0}
  best = {"accuracy": 1.0, "disparity": 0.0, "robustness": 1.0, "generalization_gap": -1.0,
          "worst_cell_accuracy": 1.0}
  metrics = {name: np.array([worst[name], best[name], best[name]]) for name in worst}
  metrics.update(params=np.array([1, 1, 1]),
                 macs=np.array([3_000_000_000, 3_000_000_001, 3_000_000_002]))
  out = spec.reward(metrics)
  np.testing.assert_allclose(out[0], -5.0)  # −λ_disp − λ_gap
  assert out[0] > out[1] > out[2] and out[1] <= spec.infeasible_floor == -6.0
  np.testing.assert_array_equal(spec.within_budget(metrics), [True, False, False])


def test_the_table_of_the_default_config():
  spec = reward.spec_from_config(ml_collections.ConfigDict(dict(
      disparity=1.0, robustness=0.5, gap=0.5, worst_cell=0.0, param_budget=None,
      mac_budget=None)))
  assert spec == reward.DEFAULT_SPEC == reward.spec_from_config()
  assert spec.to_dict() == {
      "accuracy": {"weight": 1.0, "direction": "max", "budget": None},
      "disparity": {"weight": 1.0, "direction": "min", "budget": None},
      "robustness": {"weight": 0.5, "direction": "max", "budget": None},
      "generalization_gap": {"weight": 0.5, "direction": "min", "budget": None},
      "params": {"weight": 0.0, "direction": "min", "budget": None}}
  # Today's five Pareto objectives; a MAC budget adds MACs, a worst-cell weight its metric.
  assert spec.objectives == (("accuracy", "max"), ("disparity", "min"), ("robustness", "max"),
                             ("generalization_gap", "min"), ("params", "min"))
  wider = reward.spec_from_config({"worst_cell": 0.1, "param_budget": 10, "mac_budget": 20})
  assert wider.objectives == spec.objectives[:4] + (("worst_cell_accuracy", "max"),
                                                    ("params", "min"), ("macs", "min"))
  assert [(t.metric, t.budget) for t in wider.budgets] == [("params", 10), ("macs", 20)]
  # Partial configs take the defaults; a gap weight of 0 keeps the gap as an objective only.
  partial = reward.spec_from_config(ml_collections.ConfigDict({"disparity": 2.0, "gap": 0.0}))
  assert partial == reward.RewardSpec.from_mapping({
      "accuracy": {"weight": 1}, "disparity": {"weight": 2}, "robustness": {"weight": 0.5},
      "generalization_gap": {}, "params": {}})
  assert partial.infeasible_floor == -3.0
  metrics = {"accuracy": 0.8, "disparity": 0.1, "robustness": 0.5}  # no gap needed
  np.testing.assert_allclose(partial.scalar_reward(metrics), 0.8 - 0.2 + 0.25)


def test_a_new_metric_is_one_entry():
  # Adversarial accuracy at weight 0.3: one entry of config.reward.terms.
  spec = reward.spec_from_config({"terms": {"adversarial_accuracy": {"weight": 0.3}}})
  assert spec.objectives[-1] == ("adversarial_accuracy", "max")
  assert spec.infeasible_floor == -2.5  # a "max" term in [0, 1] adds at least 0
  metrics = {**{name: np.array(values) for name, values in METRICS.items()},
             "adversarial_accuracy": np.array([0.5, 0.0, 1.0])}
  np.testing.assert_allclose(spec.scalar_reward(metrics), [1.325, 1.1, 0.85], rtol=1e-12)
  # A weighted cost enters as weight · value / budget: 0.9 − 0.5 · 100/200 = 0.65, 0.8 − 0.5,
  # 0.7 − 0.5 · 150/200 = 0.325; the floor is −0.5 − 1, and 300 params exceed 200 by 0.5.
  costly = reward.RewardSpec.from_mapping({"accuracy": {"weight": 1},
                                           "params": {"weight": 0.5, "budget": 200}})
  assert costly.infeasible_floor == -1.5
  np.testing.assert_allclose(costly.reward({"accuracy": [0.9, 0.8, 0.7, 0.7],
                                            "params": [100, 200, 150, 300]}),
                             [0.65, 0.3, 0.325, -2.0], rtol=1e-12)


@pytest.mark.parametrize("table, message", [
    ({"accuracy": {"weight": -1.0}}, r"accuracy: weight=-1.0 must be a finite number >= 0"),
    ({"accuracy": {"weight": float("nan")}}, r"accuracy: weight=nan must be a finite number"),
    ({"accuracy": {"weight": 1, "direction": "up"}},
     r"accuracy: direction='up' must be 'max' \(larger is better\) or 'min'; leave it out"),
    ({"accuracy": {"weight": 1, "direction": "min"}},
     r"accuracy: direction='min', but a larger accuracy is better; use 'max' or leave it out"),
    ({"accuracy": {"weight": 1}, "params": {"budget": 0}},
     r"params: budget=0 must be a positive number, or None for no budget"),
    ({"accuracy": {"weight": 1}, "params": {"budget": -5}}, r"params: budget=-5 must be"),
    ({"accuracy": {"weight": 1, "budget": 0.9}},
     r"accuracy: budget=0.9, but a budget caps a metric to minimise"),
    ({"accuracy": {"weight": 1}, "latency": {"weight": 1}},
     r"unknown metric 'latency' in the reward table; known: accuracy, .* reward.METRICS"),
    ({"accuracy": {"weight": 1}, "macs": {"weight": 0.1}},
     r"macs: weight=0.1 needs a budget: a cost enters the reward as weight · value / budget"),
    ({"accuracy": {"weight": 1, "scale": 2}},
     r"entry 'accuracy' has unknown keys \['scale'\]; an entry has weight, direction, budget"),
    ({"accuracy": 1.0}, r"entry 'accuracy' must be a mapping"),
    ({"accuracy": {}, "disparity": {}}, r"no term of the reward table .* has a weight > 0"),
])
def test_bad_tables_name_the_field_the_value_and_the_fix(table, message):
  with pytest.raises(ValueError, match=message):
    reward.RewardSpec.from_mapping(table)


def test_bad_config_values_name_the_config_field():
  for config, message in (
      ({"gap": -0.5}, r"config.reward.gap=-0.5: generalization_gap: weight=-0.5 must be a "
                      r"finite number >= 0"),
      ({"param_budget": 0}, r"config.reward.param_budget=0: params: budget=0 must be a "
                            r"positive number"),
      ({"mac_budget": -1}, r"config.reward.mac_budget=-1: macs: budget=-1 must be"),
      ({"fairness": 1.0}, r"unknown config.reward fields \['fairness'\]; the fields are"),
      ({"terms": {"disparity": {"weight": 3}}},
       r"config.reward.terms lists \['disparity'\], which the named fields"),
      ({"terms": {"latency": {"weight": 3}}}, r"config.reward.terms: unknown metric 'latency'"),
  ):
    with pytest.raises(ValueError, match=message):
      reward.spec_from_config(config)
  with pytest.raises(ValueError, match=r"params: budget=0 must be a positive number"):
    reward.spec_from_config({"param_budget": 0})


def test_missing_metrics_are_named():
  metrics = {"accuracy": 0.8, "disparity": 0.1}
  with pytest.raises(ValueError, match=r"reward \(its weight is 0.5\) needs "
                                       r"metrics\['robustness'\]; compute it or set its weight"):
    reward.spec_from_config().scalar_reward(metrics)
  no_robustness = reward.spec_from_config({"robustness": 0.0, "gap": 0.0})
  np.testing.assert_allclose(no_robustness.scalar_reward(metrics), 0.7)
  with pytest.raises(ValueError, match=r"budget macs <= 10 needs metrics\['macs'\]; compute "
                                       r"it or remove the budget"):
    reward.spec_from_config({"robustness": 0.0, "gap": 0.0, "mac_budget": 10}).reward(
        {**metrics, "params": 5})


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
  reward.spec_from_config({"param_budget": 234, "mac_budget": 1464}).check_budget(SPACE)
  reward.spec_from_config({"param_budget": None}).check_budget(SPACE)
  with pytest.raises(ValueError, match=r"the params budget 233 is below the 234 parameters of "
                                       r"the smallest candidate .* raise it "
                                       r"\(config.reward.param_budget\) to at least 234"):
    reward.spec_from_config({"param_budget": 233}).check_budget(SPACE)
  with pytest.raises(ValueError, match=r"the macs budget 1,000 is below the 1,464 MACs per image"):
    reward.spec_from_config({"param_budget": 10_000, "mac_budget": 1000}).check_budget(SPACE)


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
  assert archive.objectives == reward.DEFAULT_SPEC.objectives
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
  assert restored.spec == archive.spec
  assert restored.add(_entry(7, 0.95, 0.01, 0.90, 0.0, 400))
  assert [e["arch"]["num_experts"][0] for e in restored.front] == [7]
  with pytest.raises(ValueError, match=r"state has the keys \['front', 'spec'\]"):
    reward.ParetoArchive.from_state({"objectives": [], "front": []})


def test_the_pareto_archive_refuses_infeasible_candidates_and_counts_budgeted_macs():
  archive = reward.ParetoArchive(reward.spec_from_config({"param_budget": 1000}))
  # G would dominate every entry, but its 1100 params exceed the budget: refused.
  G = _entry(8, 0.99, 0.0, 0.99, 0.0, 1100)
  assert [archive.add(e) for e in (A, B, G, E)] == [True, True, False, True]
  assert [e["arch"]["num_experts"][0] for e in archive.front] == [1, 2, 5]
  # The round trip keeps the budget: G is refused again.
  restored = reward.ParetoArchive.from_state(json.loads(json.dumps(archive.state())))
  assert restored.spec.budgets == (reward.Term("params", budget=1000),)
  assert not restored.add(G) and restored.front == archive.front

  # H and K differ only in MACs. Without a MAC budget MACs are no objective: a tie, both kept;
  # with one, K (fewer MACs) dominates H, and J (over the MAC budget) is refused.
  H = {**A, "arch": {"num_experts": [9]}, "metrics": {**A["metrics"], "macs": 500}}
  K = {**A, "arch": {"num_experts": [10]}, "metrics": {**A["metrics"], "macs": 400}}
  J = {**A, "arch": {"num_experts": [11]}, "metrics": {**A["metrics"], "macs": 2001}}
  plain = reward.ParetoArchive()
  assert [plain.add(e) for e in (H, K)] == [True, True] and len(plain) == 2
  budgeted = reward.ParetoArchive(reward.spec_from_config({"mac_budget": 2000}))
  assert budgeted.objectives[-1] == ("macs", "min")
  assert [budgeted.add(e) for e in (H, K, J)] == [True, True, False]
  assert [e["arch"]["num_experts"][0] for e in budgeted.front] == [10]


def test_pareto_archive_entries_and_objectives():
  archive = reward.ParetoArchive(reward.RewardSpec.from_mapping({"accuracy": {"weight": 1},
                                                                 "params": {}}))
  assert archive.objectives == (("accuracy", "max"), ("params", "min"))
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
  with pytest.raises(ValueError, match=r"ParetoArchive takes a RewardSpec"):
    reward.ParetoArchive([("accuracy", "max")])
  with pytest.raises(ValueError, match=r"lists \['accuracy'\] more than once"):
    reward.RewardSpec((reward.Term("accuracy", 1.0), reward.Term("accuracy", 2.0)))


def test_hypervolume_by_hand():
  one = [[0.5, 0.5, 0.5]]
  assert reward.hypervolume(one, [1, 1, 1]) == pytest.approx(0.125)
  # Two boxes of 0.25 that share the cube [0.5, 1]^3 of 0.125.
  two = [[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]
  assert reward.hypervolume(two, [1, 1, 1]) == pytest.approx(0.375)
  # A dominated point, a point beyond the reference and a repeat add nothing; order is free.
  more = [[0.5, 0.0, 0.5], [0.7, 0.7, 0.7], [1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]
  assert reward.hypervolume(two + more, [1, 1, 1]) == pytest.approx(0.375)
  assert reward.hypervolume(np.zeros((0, 3)), [1, 1, 1]) == 0.0
  # Against a Monte Carlo estimate on random points.
  rng = np.random.default_rng(0)
  points, samples = rng.uniform(0, 1, (6, 3)), rng.uniform(0, 1, (200_000, 3))
  dominated = (samples[:, None, :] >= points[None]).all(-1).any(-1).mean()
  assert reward.hypervolume(points, [1, 1, 1]) == pytest.approx(dominated, abs=0.005)
  with pytest.raises(ValueError, match=r"points \[n, 3\]"):
    reward.hypervolume([[0.5, 0.5]], [1, 1, 1])
