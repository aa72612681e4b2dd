"""Tests of the optuna (TPE) controller: genes, budgets as constraints, search, resume."""

import json
import sys

import numpy as np
import pytest

from moenas_jax import controllers, search_space, tpe
from moenas_jax.search_space import Arch
from synthetic_search import SPACE, STAGED, run
from synthetic_search import WIDTH_DEPTH, check_width_depth_proposals
from synthetic_search import cycles as _cycles
from synthetic_search import keys as _keys
from synthetic_search import reward as _reward


def _tpe(batch=4, seed=0, **options):
  return controllers.make("optuna", SPACE, population_size=8, tournament_size=2,
                          batch_size=batch, seed=seed, optuna=options)


def test_genes_map_to_valid_architectures_with_top_k_clipped_to_the_experts():
  controller = _tpe()
  assert isinstance(controller, tpe.TPESearch)
  params = {"num_experts_0": 1, "num_experts_1": 3, "num_experts_2": 8, "num_experts_3": 2,
            "top_k_0": 2, "top_k_1": 2, "top_k_2": 1, "top_k_3": 2}
  arch = controller._arch(params)
  assert arch.num_experts.tolist() == [1, 3, 8, 2] and arch.top_k.tolist() == [1, 2, 1, 2]
  assert sorted(controller._distributions) == sorted(params)


def test_over_budget_and_scored_proposals_are_told_at_once_and_never_proposed():
  budget_arch = Arch(np.array([4] * 4), np.array([2] * 4))
  params, macs = int(SPACE.params(budget_arch)), int(SPACE.macs(budget_arch)) - 1
  controller = _tpe(startup_trials=8, param_budget=params, mac_budget=macs)
  told = set()
  for _ in range(6):
    archs = controller.ask()
    assert told.isdisjoint(_keys(archs))
    assert (SPACE.params(archs) <= params).all() and (SPACE.macs(archs) <= macs).all()
    told.update(_keys(archs))
    controller.tell(archs, _reward(archs))
  trials = controller.state_dict()["trials"]
  over = [t for t in trials if any(v > 0 for v in t["constraints"].values())]
  assert over and all(not t.get("scored") for t in over)  # told, not scored
  # count / budget − 1, by hand, for one of them.
  arch = search_space.stack([search_space.from_json(over[0]["arch"])])
  np.testing.assert_allclose(over[0]["constraints"]["params"],
                             SPACE.params(arch)[0] / params - 1)
  assert len(told) == 24  # 6 batches of 4 distinct, unscored architectures


def test_tpe_beats_random_at_equal_budget():
  """Best reward after 12 batches of 8, summed over 3 seeds: TPE's is the higher."""
  def best(controller):
    rewards = []
    for _ in range(12):
      archs = controller.ask()
      rewards.extend(_reward(archs))
      controller.tell(archs, _reward(archs))
    return max(rewards)

  tpe_best = sum(best(_tpe(batch=8, seed=seed)) for seed in range(3))
  random_best = sum(best(controllers.make("random", SPACE, population_size=16,
                                          tournament_size=2, batch_size=8, seed=seed))
                    for seed in range(3))
  assert tpe_best > random_best, (tpe_best, random_best)


def test_proposals_follow_from_the_seed_and_resume_from_the_state():
  controller = _tpe(startup_trials=8)
  batches = _cycles(controller, 4)  # 2 random start-up batches, 2 from TPE
  assert batches == _cycles(_tpe(startup_trials=8), 4)
  assert batches != _cycles(_tpe(seed=1, startup_trials=8), 4)
  pending = controller.ask()  # saved with its batch pending, as the search loop does
  rebuilt = tpe.TPESearch.from_state_dict(SPACE,
                                          json.loads(json.dumps(controller.state_dict())))
  assert rebuilt.cycle == controller.cycle == 4
  assert _keys(rebuilt.ask()) == _keys(pending)
  for each in (controller, rebuilt):
    each.tell(pending, _reward(pending))
  assert _keys(rebuilt.ask()) == _keys(controller.ask())
  with pytest.raises(ValueError, match="needs 4 finite rewards"):
    rebuilt.tell(rebuilt.ask(), [0.0, 1.0, np.nan, 2.0])
  with pytest.raises(ValueError, match="the batch the last ask"):
    rebuilt.tell(search_space.stack([SPACE.dense()] * 4), np.zeros(4))


def test_a_killed_tpe_search_resumes_to_the_same_records(tmp_path):
  def make():
    return _tpe(startup_trials=8)

  straight = run(make, tmp_path / "a")
  with pytest.raises(KeyboardInterrupt):
    run(make, tmp_path / "b", fail_at=3)
  assert run(make, tmp_path / "b") == straight
  assert len({json.dumps(r["arch"]) for r in straight}) == 20


def test_a_missing_optuna_names_the_pip_command(monkeypatch):
  monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna now fails
  with pytest.raises(ImportError, match=r'optuna package.*pip install "moenas_jax\[optuna\]"'):
    _tpe()


@pytest.mark.parametrize("options, message", [
    (dict(startup_trials=0), "startup_trials >= 1"),
    (dict(max_redraws=-1), "max_redraws >= 0"),
    (dict(mac_budget=-5), "must be positive or None"),
])
def test_bad_settings_are_refused(options, message):
  with pytest.raises(ValueError, match=message):
    _tpe(**options)


def test_every_gene_of_the_table_is_searched_with_caps_clipped():
  controller = controllers.make("optuna", STAGED, population_size=8, tournament_size=2,
                                batch_size=4, seed=0, optuna={"startup_trials": 4})
  assert sorted(controller._distributions) == sorted(
      [f"num_experts_{i}" for i in range(2)] + [f"top_k_{i}" for i in range(2)]
      + [f"width_{i}" for i in range(3)] + [f"depth_{i}" for i in range(3)])
  params = {**dict.fromkeys(controller._distributions, 1), "num_experts_0": 2, "top_k_0": 2,
            "width_0": 3, "depth_0": 2, "depth_2": 3}  # depth_2 above width_2: clipped
  assert search_space.to_dict(controller._arch(params)) == {
      "num_experts": [2, 1], "top_k": [2, 1], "width": [3, 1, 1], "depth": [2, 1, 1]}
  for _ in range(2):
    archs = STAGED.validate(controller.ask())
    controller.tell(archs, search_space.features(STAGED, archs).sum(-1))


def test_optuna_asks_and_tells_width_and_depth_genes():
  controller = controllers.make("optuna", WIDTH_DEPTH, population_size=8, tournament_size=2,
                                batch_size=4, seed=0, optuna={"startup_trials": 4})
  for _ in range(3):
    archs = controller.ask()
    check_width_depth_proposals(archs)
    controller.tell(archs, -WIDTH_DEPTH.macs(archs).astype(float))
