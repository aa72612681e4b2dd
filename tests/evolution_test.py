"""Tests of the regularized evolution controller (fake rewards, no model)."""

import json

import chex
import jax
import numpy as np
import pytest

from moenas_jax import search_space
from moenas_jax.compilation import count_compilations
from moenas_jax.controllers import ScoreCache
from moenas_jax.evolution import Evolution, EvolutionSettings, Record, select
from moenas_jax.search_space import Arch, MoELayerShape, SearchSpace
from synthetic_search import WIDTH_DEPTH, check_width_depth_proposals

SPACE = SearchSpace(max_experts=(8,) * 4, max_top_k=(2,) * 4,
                    layers=(MoELayerShape(8, 16, 10),) * 4, base_params=0, base_macs=0)
# The fake reward's optimum (0): minus the L1 distance to this arch.
TARGET = Arch(np.array([5, 2, 7, 3]), np.array([2, 1, 2, 1]))
# Most tests share N = 6, S = 3, P = 4 (one compile); P does not divide N on purpose.
SIZES = (6, 3, 4)
# 16 architectures (1..4 experts in 2 layers, top-1), 6 one-gene neighbours each: repeats
# are frequent. Its tests share N = S = 5, P = 4: every tournament holds the whole population.
SMALL = SearchSpace(max_experts=(4, 4), max_top_k=(1, 1), layers=(MoELayerShape(4, 4, 4),) * 2,
                    base_params=0, base_macs=0)


def _distance_reward(arch):
  return -float(np.abs(np.asarray(arch.num_experts) - TARGET.num_experts).sum()
                + np.abs(np.asarray(arch.top_k) - TARGET.top_k).sum())


def _two_experts_reward(arch):
  return -float(np.abs(np.asarray(arch.num_experts) - 2).sum())


def _step(evolution, reward_fn, cache=None):
  """One ask/tell cycle scoring only what `cache` (a `ScoreCache`, kept on the evolution
  object between calls) does not know, as the search loop does; returns the reward calls."""
  if cache is None:
    cache = evolution.__dict__.setdefault("_test_cache", ScoreCache())
  archs = evolution.ask()
  rewards = np.full(evolution.settings.batch_size, np.nan)
  candidates = search_space.unstack(archs)
  todo = cache.to_score(archs)
  for index in todo:
    rewards[index] = reward_fn(candidates[index])
  evolution.tell(archs, cache.fill(archs, rewards))
  return len(todo)


def _run(settings, cycles, space=SPACE, reward_fn=_distance_reward):
  evolution = Evolution(space, settings)
  calls = sum(_step(evolution, reward_fn) for _ in range(cycles))
  return evolution, calls


def _keys(archs):
  return [a.key() for a in search_space.unstack(archs)]


def _population_keys(evolution):
  return [arch.key() for arch, _ in evolution.population]


@pytest.mark.parametrize("sizes, message", [
    ((1, 1, 1, 0), r"population_size=1 must be at least 2"),
    ((8, 9, 2, 0), r"tournament_size=9 must be in 1..population_size=8"),
    ((8, 0, 2, 0), r"tournament_size=0 must be in"),
    ((8, 2, 9, 0), r"batch_size=9 must be in 1..population_size - 1 = 7"),
    ((8, 2, 8, 0), r"batch_size=8 .* no member ages .* not regularized evolution"),
    ((8, 2, 2, -1), r"max_remutations=-1 must be >= 0"),
])
def test_settings_name_the_bad_value(sizes, message):
  population, tournament, batch, remutations = sizes
  with pytest.raises(ValueError, match=message):
    EvolutionSettings(population, tournament, batch, seed=0, max_remutations=remutations)
  with pytest.raises(TypeError, match=r"population_size must be an integer, got 8.0"):
    EvolutionSettings(8.0, 2, 2, seed=0)


def test_tournaments_are_uniform_without_replacement_and_the_best_wins():
  rewards = np.array([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])  # N = 8, in age order
  members, winners = jax.jit(select, static_argnums=(2, 3))(jax.random.key(0), rewards, 2, 2000)
  members, winners = np.asarray(members), np.asarray(winners)
  chex.assert_shape(members, (2000, 2))
  assert (members[:, 0] != members[:, 1]).all()  # without replacement
  # Each index is in about S / N = 1/4 of the tournaments (sd about 0.01).
  np.testing.assert_allclose(np.bincount(members.ravel(), minlength=8) / 2000, 1 / 4,
                             atol=0.04)
  best = rewards[members].max(-1)
  np.testing.assert_array_equal(rewards[winners], best)
  # The tie of indices 1 and 3 (both 1.0): the youngest, 3, wins.
  ones = (rewards[members] == 1.0).all(-1)
  assert ones.any()
  np.testing.assert_array_equal(winners[ones], 3)


def test_initial_population_comes_in_chunks_with_dense_and_largest():
  # N = 6, P = 4: ceil(6 / 4) * 4 = 8 initial candidates; dense and largest come last.
  evolution = Evolution(SPACE, EvolutionSettings(*SIZES, seed=0))
  sizes = []
  for _ in range(2):
    batch = evolution.ask()
    chex.assert_shape([batch.num_experts, batch.top_k], (4, 4))
    _step(evolution, _distance_reward)
    sizes.append(len(evolution.population))
  assert batch.num_experts.dtype == np.int32
  assert _keys(batch)[2:] == [SPACE.dense().key(), SPACE.largest().key()]
  initial = [search_space.from_json(r.arch).key() for r in evolution.history]
  assert sizes == [4, 6]
  assert _population_keys(evolution) == initial[2:]  # the 2 oldest samples aged out
  for _ in range(3):
    _step(evolution, _distance_reward)
    assert len(evolution.population) == 6


def test_aging_removes_the_oldest_not_the_worst():
  evolution = Evolution(SPACE, EvolutionSettings(*SIZES, seed=3))
  # Initial rewards: the older chunk is the best (100..103), the younger one 0..3; the two
  # oldest (100, 101) age out when the population is full.
  for rewards in (100.0 + np.arange(4), np.arange(4.0)):
    archs = evolution.ask()
    evolution.tell(archs, rewards)
  before = _population_keys(evolution)
  np.testing.assert_array_equal([r for _, r in evolution.population], [102, 103, 0, 1, 2, 3])
  children = evolution.ask()
  assert set(_keys(children)).isdisjoint(before)  # re-mutation: all new
  evolution.tell(children, np.full(4, -100.0))
  assert _population_keys(evolution) == before[4:] + _keys(children)
  np.testing.assert_array_equal([r for _, r in evolution.population], [2, 3] + [-100] * 4)
  assert evolution.best()[1] == 103.0  # best() remembers what aged out


def test_whole_population_tournaments_mutate_the_best():
  evolution, _ = _run(EvolutionSettings(5, 5, 4, seed=1), 2, SMALL, _two_experts_reward)
  # The best member; among equal rewards the youngest, as in `select`.
  best_arch, _ = max(reversed(evolution.population), key=lambda member: member[1])
  children = evolution.ask()
  changed = ((children.num_experts != best_arch.num_experts)
             | (children.top_k != best_arch.top_k)).sum(-1)
  np.testing.assert_array_equal(changed, 1)  # one mutation away from the best member


def test_deterministic_from_the_seed():
  first, _ = _run(EvolutionSettings(*SIZES, seed=5), 6)
  second, _ = _run(EvolutionSettings(*SIZES, seed=5), 6)
  assert first.history == second.history
  assert _keys(first.ask()) == _keys(second.ask())
  other, _ = _run(EvolutionSettings(*SIZES, seed=6), 6)
  assert [r.arch for r in other.history] != [r.arch for r in first.history]


def test_the_loop_cache_scores_each_arch_once_and_keeps_its_first_reward():
  # No re-mutation, 24 candidates in a space of 16: repeats must occur.
  evolution = Evolution(SMALL, EvolutionSettings(5, 5, 4, seed=0, max_remutations=0))
  cache, scored = ScoreCache(), []
  for _ in range(6):
    archs = evolution.ask()
    todo = cache.to_score(archs)
    keys = _keys(archs)
    # The first occurrence of each key not yet cached, in batch order.
    expected = [i for i, (key, arch) in enumerate(zip(keys, search_space.unstack(archs)))
                if key not in keys[:i] and cache.get(arch) is None]
    np.testing.assert_array_equal(todo, expected)
    scored += [keys[i] for i in todo]
    # Distinct rewards on every call: only the ones at `todo` may be used.
    evolution.tell(archs, cache.fill(archs, 10.0 * evolution.cycle + np.arange(4.0)))
  assert len(scored) == len(set(scored)) < 24
  first_reward = {}
  for record in evolution.history:
    key = search_space.from_json(record.arch).key()
    assert first_reward.setdefault(key, record.reward) == record.reward
  assert len(evolution.history) == 24
  assert cache.get(SMALL.dense()) == first_reward[SMALL.dense().key()]
  assert cache.get(Arch(np.array([4, 4]), np.array([2, 1]))) is None
  assert cache.best() == max(first_reward.values())


def test_remutation_proposes_new_archs_without_recompiling():
  calls = {}
  for retries in (0, 8):
    evolution = Evolution(SMALL, EvolutionSettings(5, 5, 4, seed=0, max_remutations=retries))
    # Cycles 0 and 1: the initial population; 2 compiles the proposal function.
    calls[retries] = sum(_step(evolution, _two_experts_reward) for _ in range(3))
    with count_compilations() as seen:  # cycles 3..5 propose children, with retries
      calls[retries] += sum(_step(evolution, _two_experts_reward) for _ in range(3))
    assert seen.of("_mutants") == 0
    unique = {tuple(map(tuple, r.arch.values())) for r in evolution.history}
    assert calls[retries] == len(unique)  # each architecture scored once
  assert calls[0] < calls[8] < 24


@pytest.mark.parametrize("cycles", [1, 7])  # inside the initial population and after it
def test_state_round_trip_and_replay_give_the_same_next_batch(cycles):
  settings = EvolutionSettings(*SIZES, seed=11)
  live, _ = _run(settings, cycles)
  text = json.dumps(live.state_dict(), allow_nan=False)
  for rebuilt in (Evolution.from_state_dict(SPACE, json.loads(text)),
                  Evolution.from_history(SPACE, settings, live.history)):
    assert rebuilt.cycle == live.cycle == cycles
    assert rebuilt.history == live.history
    assert _population_keys(rebuilt) == _population_keys(live)
    assert [r for _, r in rebuilt.population] == [r for _, r in live.population]
    assert _keys(rebuilt.ask()) == _keys(live.ask())
  # Both continue in lockstep.
  _step(live, _distance_reward)
  _step(rebuilt, _distance_reward)
  assert _keys(rebuilt.ask()) == _keys(live.ask())


def test_replay_rejects_a_history_from_other_settings():
  settings = EvolutionSettings(*SIZES, seed=11)
  live, _ = _run(settings, 3)
  history = live.history
  with pytest.raises(ValueError, match="differ from the proposals of cycle 0"):
    Evolution.from_history(SPACE, EvolutionSettings(*SIZES, seed=12), history)
  with pytest.raises(ValueError, match="has 11 entries, not whole batches of batch_size=4"):
    Evolution.from_history(SPACE, settings, history[:-1])
  shifted = [Record(r.arch, r.reward, r.cycle + 1) for r in history]
  with pytest.raises(ValueError, match=r"entries 0..3 carry cycles \[1\], expected 0"):
    Evolution.from_history(SPACE, settings, shifted)
  state = live.state_dict()
  with pytest.raises(ValueError, match="does not fit EvolutionSettings.*population_size"):
    Evolution.from_state_dict(SPACE, {"settings": {"seed": 1}, "history": []})
  with pytest.raises(ValueError, match="does not fit .*Record.*'score'"):
    Evolution.from_state_dict(SPACE, {**state, "history": [{"score": 1.0}]})
  with pytest.raises(ValueError, match=r"has the keys \['history', 'settings'\]"):
    Evolution.from_state_dict(SPACE, {"history": []})


def test_tell_checks_its_inputs():
  evolution = Evolution(SPACE, EvolutionSettings(*SIZES, seed=0))
  archs = evolution.ask()
  with pytest.raises(ValueError, match=r"rewards have shape \(3,\); .* \(4,\)"):
    evolution.tell(archs, [1.0, 2.0, 3.0])
  with pytest.raises(ValueError, match=r"rewards\[1\] = nan must be finite"):
    evolution.tell(archs, [1.0, np.nan, 3.0, 4.0])
  other = jax.tree.map(lambda v: v[::-1], archs)
  with pytest.raises(ValueError, match="differ from the proposals of cycle 0"):
    evolution.tell(other, np.zeros(4))
  with pytest.raises(ValueError, match="best.. needs at least one tell"):
    evolution.best()
  assert evolution.cycle == 0 and not evolution.history


def test_evolution_improves_the_reward():
  # 15^4 = 50625 architectures; 2 initial cycles, then 20 cycles of 4 children.
  evolution = Evolution(SPACE, EvolutionSettings(*SIZES, seed=0))
  for _ in range(2):
    _step(evolution, _distance_reward)
  initial = np.array([r for _, r in evolution.population])
  for _ in range(20):
    _step(evolution, _distance_reward)
  final = np.array([r for _, r in evolution.population])
  # Seeds 0..7 moved the population mean 3.8 to 12.7 steps closer to the optimum, and each
  # found an arch better than every initial member (seed 0: mean -14.0 -> -4.7, best -1).
  assert final.mean() > initial.mean() + 3
  assert evolution.best()[1] > initial.max()


def test_evolution_asks_and_tells_width_and_depth_genes():
  controller = Evolution(WIDTH_DEPTH, EvolutionSettings(population_size=8, tournament_size=3,
                                                        batch_size=4, seed=0))
  batches = []
  for _ in range(4):  # two cycles fill the population, two mutate it
    archs = controller.ask()
    check_width_depth_proposals(archs)
    batches.append(_keys(archs))
    controller.tell(archs, -WIDTH_DEPTH.macs(archs).astype(float))
  assert WIDTH_DEPTH.smallest().key() in batches[1] and WIDTH_DEPTH.largest().key() in batches[1]
