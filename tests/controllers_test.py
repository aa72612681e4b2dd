"""Tests of the controller seam: random search, the loop's cache, aging end to end, resume."""

import json

import numpy as np
import pytest

import jax

from moenas_jax import candidate_log, checkpoint, controllers, evolution, search_space
from moenas_jax.search_space import MoELayerShape, SearchSpace

SPACE = SearchSpace(max_experts=(8,) * 4, max_top_k=(2,) * 4,
                    layers=(MoELayerShape(8, 16, 10),) * 4, base_params=0, base_macs=0)
# 16 architectures: 1..4 experts in 2 layers, top-1.
SMALL = SearchSpace(max_experts=(4, 4), max_top_k=(1, 1), layers=(MoELayerShape(4, 4, 4),) * 2,
                    base_params=0, base_macs=0)
TARGET = np.array([5, 2, 7, 3])


def _reward(arch):
  return -float(np.abs(np.asarray(arch.num_experts) - TARGET).sum())


def _record(arch):
  metrics = dict.fromkeys(candidate_log.METRIC_KEYS, 0.0)
  return {"metrics": metrics, "reward": _reward(arch)}


def _score(calls=None, fail_at=None):
  """A fake evaluator for `controllers.run`; raises at cycle `fail_at` (a kill)."""
  def score(archs, todo, cycle):
    if cycle == fail_at:
      raise KeyboardInterrupt(f"killed at cycle {cycle}")
    if calls is not None:
      calls.append([search_space.unstack(archs)[i].key() for i in todo])
    return [_record(search_space.unstack(archs)[i]) for i in todo]
  return score


def _evolution(population=6, tournament=3, batch=2, seed=0):
  return controllers.make("evolution", SPACE, population_size=population,
                          tournament_size=tournament, batch_size=batch, seed=seed)


def _run(controller, tmp_path, cycles, **score):
  return controllers.run(controller, SPACE, _score(**score), cycles=cycles,
                         checkpoint_dir=tmp_path / "checkpoints",
                         log_path=tmp_path / "candidates.jsonl")


def test_make_names_the_bad_controller_and_refuses_p_at_least_n():
  with pytest.raises(ValueError, match="unknown controller 'gp'; use one of bo, evolution, llm, "
                                       "optuna, random"):
    controllers.make("gp", SPACE, population_size=8, tournament_size=2, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="batch_size=8 must be in 1..population_size - 1 = 7"):
    _evolution(population=8, batch=8)
  assert isinstance(controllers.make("random", SPACE, population_size=8, tournament_size=2,
                                     batch_size=3, seed=0), controllers.RandomSearch)


def test_random_search_is_seeded_and_proposes_no_architecture_twice():
  def proposals(seed, cycles):
    search = controllers.RandomSearch(SMALL, controllers.RandomSettings(batch_size=4, seed=seed))
    keys = []
    for _ in range(cycles):
      archs = search.ask()
      keys += [a.key() for a in search_space.unstack(archs)]
      search.tell(archs, np.arange(4.0))
    return search, keys

  search, keys = proposals(0, 3)
  assert len(set(keys)) == 12  # 12 of the space's 16, none twice (redraws)
  assert keys == proposals(0, 3)[1]
  assert keys != proposals(1, 3)[1]
  rebuilt = controllers.RandomSearch.from_state_dict(
      SMALL, json.loads(json.dumps(search.state_dict())))
  assert rebuilt.cycle == search.cycle == 3
  assert [a.key() for a in search_space.unstack(rebuilt.ask())] == \
      [a.key() for a in search_space.unstack(search.ask())]
  with pytest.raises(ValueError, match="needs 4 finite rewards"):
    rebuilt.tell(rebuilt.ask(), np.zeros(3))


def test_the_loop_ages_regularized_evolution_out_of_its_initial_members(tmp_path):
  # N = 6, P = 2: cycles 0-2 fill the population (4 samples, then dense and largest), each
  # later cycle removes the 2 oldest; after cycle 5 no initial member is left.
  controller = _evolution()
  records = _run(controller, tmp_path, cycles=6)
  assert [r["cycle"] for r in records] == sorted(r["cycle"] for r in records)
  assert records[4]["arch"] == search_space.to_dict(SPACE.dense())
  assert records[5]["arch"] == search_space.to_dict(SPACE.largest())
  # The controller the loop drove is rebuilt from the checkpoint's state (same history).
  resumed = controllers.run(_evolution(), SPACE, _score(), cycles=6,
                            checkpoint_dir=tmp_path / "checkpoints",
                            log_path=tmp_path / "candidates.jsonl")
  assert resumed == records
  state = evolution.Evolution.from_state_dict(SPACE, _saved_state(tmp_path))
  living = [search_space.to_dict(arch) for arch, _ in state.population]
  told = [r.arch for r in state.history]
  assert living == told[-6:]  # the 6 youngest, oldest first
  assert search_space.to_dict(SPACE.dense()) not in living
  assert search_space.to_dict(SPACE.largest()) not in living
  assert all(r["arch"] not in living for r in records[:6])


def _saved_state(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as checkpoints:
    return checkpoints.restore()[1]["state"]


def test_a_killed_loop_resumes_to_the_same_records(tmp_path):
  straight = _run(_evolution(seed=3), tmp_path / "a", cycles=7)
  with pytest.raises(KeyboardInterrupt):
    _run(_evolution(seed=3), tmp_path / "b", cycles=7, fail_at=4)
  calls = []
  resumed = _run(_evolution(seed=3), tmp_path / "b", cycles=7, calls=calls)
  assert resumed == straight
  assert len(calls) == 3  # cycles 4, 5, 6 only


class _Unseeded(controllers.RandomSearch):
  """A controller whose proposals do not follow from its state (as an LLM's would not)."""

  draws = 0

  def ask(self):
    if self._pending is None:
      type(self).draws += 1
      self.settings = controllers.RandomSettings(batch_size=self.batch_size,
                                                 seed=1000 + type(self).draws)
      self._key = jax.random.key(self.settings.seed)
    return super().ask()

  @classmethod
  def from_state_dict(cls, space, state):
    controller = cls(space, controllers.RandomSettings(**state["settings"]))
    for record in state["history"]:
      controller._history.append(record)
      controller._seen.add(search_space.from_json(record["arch"]).key())
    return controller


def test_resume_scores_the_pending_proposals_of_the_killed_run(tmp_path):
  settings = controllers.RandomSettings(batch_size=3, seed=0)
  with pytest.raises(KeyboardInterrupt):
    _run(_Unseeded(SPACE, settings), tmp_path, cycles=4, fail_at=2)
  with open(tmp_path / "candidates.jsonl") as log:
    assert len(log.readlines()) == 6
  pending = _saved_pending(tmp_path)
  calls = []
  records = _run(_Unseeded(SPACE, settings), tmp_path, cycles=4, calls=calls)
  expected = [search_space.to_dict(arch)
              for arch in search_space.unstack(search_space.from_json(pending))]
  assert [r["arch"] for r in records[6:9]] == expected
  assert len(records) == 12 and len(calls) == 2


def _saved_pending(tmp_path):
  with checkpoint.Checkpointer(tmp_path / "checkpoints") as checkpoints:
    return checkpoints.restore()[1]["pending"]


def test_the_cache_refuses_a_missing_reward_for_a_new_architecture():
  cache = controllers.ScoreCache()
  archs = search_space.stack([SPACE.dense(), SPACE.largest(), SPACE.dense()])
  np.testing.assert_array_equal(cache.to_score(archs), [0, 1])
  np.testing.assert_array_equal(cache.fill(archs, [1.0, 2.0, np.nan]), [1.0, 2.0, 1.0])
  assert cache.to_score(archs).size == 0 and len(cache) == 2
  with pytest.raises(ValueError, match=r"rewards\[0\] = nan must be finite"):
    controllers.ScoreCache().fill(archs, [np.nan, 2.0, 3.0])
