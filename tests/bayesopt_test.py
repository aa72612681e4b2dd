"""Tests of the bo controller: its surrogates, warm-up, budget filter, search, resume."""

import json
import sys

import jax
import numpy as np
import pytest

from moenas_jax import bayesopt, controllers, search_space
from moenas_jax.search_space import Arch, MoELayerShape, SearchSpace
from synthetic_search import BEST, SPACE, STAGED, run
from synthetic_search import WIDTH_DEPTH, check_width_depth_proposals
from synthetic_search import cycles as _cycles
from synthetic_search import keys as _keys
from synthetic_search import reward as _reward

# 16 architectures: 1..4 experts in 2 layers, top-1.
SMALL = SearchSpace(max_experts=(4, 4), max_top_k=(1, 1), layers=(MoELayerShape(4, 4, 4),) * 2,
                    base_params=0, base_macs=0)


def _bo(space=SPACE, batch=4, seed=0, **options):
  return controllers.make("bo", space, population_size=8, tournament_size=2, batch_size=batch,
                          seed=seed, bo=options)


def test_make_builds_bo_with_the_default_surrogate():
  controller = _bo()
  assert isinstance(controller, bayesopt.BayesOpt)
  assert controller.settings.surrogate == "xgboost" and controller.batch_size == 4


@pytest.mark.parametrize("name", ["ridge", "xgboost"])
def test_a_surrogate_recovers_a_linear_reward_of_the_features(name):
  """Ridge at a small penalty recovers it almost exactly (it is linear in the one-hot
  genes); trees approximate it."""
  archs = SPACE.sample_population(jax.random.key(0), 400)
  train, test = (jax.tree.map(lambda v, s=s: np.asarray(v)[s], archs)
                 for s in (slice(0, 300), slice(300, 400)))
  weights = np.array([1.0, -2.0, 0.5, 3.0, 0.0, 1.0, -1.0, 2.0])

  def reward(population):
    return search_space.features(SPACE, population) @ weights + 3.0

  surrogate = bayesopt.RidgeEnsemble(alpha=0.01) if name == "ridge" else \
      bayesopt.XGBoostQuantiles()
  surrogate.fit(surrogate.design(SPACE, train), reward(train), np.random.default_rng(0))
  mean, spread = surrogate.predict(surrogate.design(SPACE, test))
  spread_of_rewards = reward(test).std()
  if name == "ridge":
    np.testing.assert_allclose(mean, reward(test), atol=0.02 * spread_of_rewards)
    assert spread.max() < 0.05 * spread_of_rewards
  else:
    assert np.corrcoef(mean, reward(test))[0, 1] > 0.9
    assert (spread >= 0).all() and spread.mean() < 0.5 * spread_of_rewards


@pytest.mark.parametrize("name", ["ridge", "xgboost"])
def test_a_surrogate_refuses_fewer_points_than_it_needs(name):
  surrogate = bayesopt.SURROGATES[name]()
  x = surrogate.design(SPACE, search_space.stack([SPACE.dense()]))
  with pytest.raises(ValueError, match="at least 2 scored architectures .* got 1 rows"):
    surrogate.fit(x, np.zeros(1), np.random.default_rng(0))


def test_warm_up_proposes_random_samples_whatever_the_rewards():
  # warmup 8, P = 4: cycles 0 and 1 do not depend on the rewards told; cycle 2 fits on them.
  told = [_cycles(_bo(surrogate="ridge", warmup=8), 3,
                  reward_of=lambda archs, sign=sign: sign * _reward(archs)) for sign in (1, -1)]
  assert told[0][:2] == told[1][:2]
  assert len({key for batch in told[0][:2] for key in batch}) == 8
  assert told[0][2] != told[1][2]


def test_proposals_are_distinct_unscored_and_within_budget():
  budget_arch = Arch(np.array([4] * 4), np.array([2] * 4))
  params, macs = int(SPACE.params(budget_arch)), int(SPACE.macs(budget_arch)) - 1
  controller = _bo(surrogate="ridge", warmup=8, param_budget=params, mac_budget=macs)
  told = set()
  for _ in range(8):
    archs = controller.ask()
    assert len(set(_keys(archs))) == 4 and told.isdisjoint(_keys(archs))
    assert (SPACE.params(archs) <= params).all() and (SPACE.macs(archs) <= macs).all()
    told.update(_keys(archs))
    controller.tell(archs, _reward(archs))


def test_scored_architectures_then_the_dense_model_fill_an_exhausted_pool():
  controller = _bo(SMALL, surrogate="ridge")
  batches = _cycles(controller, 5, reward_of=lambda archs: np.sum(archs.num_experts, -1) * 1.0)
  assert len({key for batch in batches[:4] for key in batch}) == 16  # the whole space
  assert len(set(batches[4])) == 4  # 4 scored ones again (the loop's cache scores them)
  # Only the dense model is within the params budget: it fills the batch.
  only_dense = _bo(SMALL, surrogate="ridge", param_budget=int(SMALL.params(SMALL.dense())))
  assert _keys(only_dense.ask()) == [SMALL.dense().key()] * 4


@pytest.mark.parametrize("name", ["ridge", "xgboost"])
def test_bo_finds_the_optimum_in_fewer_evaluations_than_random(name):
  def evaluations_to_best(controller, cycles=14):
    for cycle, batch in enumerate(_cycles(controller, cycles)):
      if BEST.key() in batch:
        return (cycle + 1) * controller.batch_size
    return np.inf

  for seed in range(3):
    random = controllers.make("random", SPACE, population_size=16, tournament_size=2,
                              batch_size=8, seed=seed)
    found = evaluations_to_best(_bo(batch=8, seed=seed, surrogate=name))
    assert found <= 112 and found < evaluations_to_best(random), seed


@pytest.mark.parametrize("name", ["ridge", "xgboost"])
def test_proposals_follow_from_the_seed_and_resume_from_the_state(name):
  controller = _bo(surrogate=name, warmup=8)
  batches = _cycles(controller, 4)  # 2 random, 2 from the surrogate
  assert batches == _cycles(_bo(surrogate=name, warmup=8), 4)
  assert batches != _cycles(_bo(seed=1, surrogate=name, warmup=8), 4)
  rebuilt = bayesopt.BayesOpt.from_state_dict(
      SPACE, json.loads(json.dumps(controller.state_dict())))
  assert rebuilt.cycle == controller.cycle == 4
  assert _keys(rebuilt.ask()) == _keys(controller.ask())
  with pytest.raises(ValueError, match="needs 4 finite rewards"):
    rebuilt.tell(rebuilt.ask(), [0.0, 1.0, np.nan, 2.0])


def test_a_killed_bo_search_resumes_to_the_same_records(tmp_path):
  def make():
    return _bo(surrogate="ridge", warmup=8)

  straight = run(make, tmp_path / "a")
  with pytest.raises(KeyboardInterrupt):
    run(make, tmp_path / "b", fail_at=3)
  assert run(make, tmp_path / "b") == straight
  assert len({json.dumps(r["arch"]) for r in straight}) == 20


def test_a_missing_xgboost_names_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "xgboost", None)  # import xgboost now fails
  with pytest.raises(ImportError, match=r'xgboost-cpu .* pip install "moenas_jax\[bo\]", or '
                                        r"use the surrogate 'ridge'"):
    _bo()
  assert _bo(surrogate="ridge").settings.surrogate == "ridge"


@pytest.mark.parametrize("options, message", [
    (dict(warmup=1), "warmup >= 2"),
    (dict(kappa=-1.0), "kappa >= 0"),
    (dict(pool_size=2), "pool_size >= batch_size"),
    (dict(param_budget=0), "must be positive or None"),
    (dict(surrogate="gp"), "unknown surrogate 'gp'; use one of xgboost, ridge"),
])
def test_bad_settings_are_refused(options, message):
  with pytest.raises(ValueError, match=message):
    _bo(**options)


def test_every_gene_of_the_table_is_featurised_sampled_and_mutated():
  # warmup 8, P = 4: cycle 2 ranks random samples and mutants of the best on the features.
  controller, told = _bo(STAGED, surrogate="ridge", warmup=8), set()
  for _ in range(3):
    archs = STAGED.validate(controller.ask())  # every gene of the table, legal
    assert told.isdisjoint(_keys(archs))
    told.update(_keys(archs))
    controller.tell(archs, search_space.features(STAGED, archs).sum(-1))
  assert len(told) == 12


def test_bo_asks_and_tells_width_and_depth_genes():
  controller = _bo(WIDTH_DEPTH, surrogate="ridge", warmup=4)
  for _ in range(3):
    archs = controller.ask()
    check_width_depth_proposals(archs)
    controller.tell(archs, -WIDTH_DEPTH.macs(archs).astype(float))
