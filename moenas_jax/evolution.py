"""Regularized (aging) evolution over `Arch` candidates, in batches of P children.

Real et al. 2019, batched as in pyglove: each cycle draws P tournaments of S members from the
population (uniformly, without replacement within a tournament, independently across
tournaments), mutates each winner once (`SearchSpace.mutate`), and the caller scores the P
children in one evaluator call. The children are appended and the P oldest members leave, so
the population keeps `population_size` members and a good architecture dies of age, not of
being beaten.

The controller is host-side Python and NumPy with an evosax-like `ask()` / `tell()` loop
(`controllers.Controller`; `controllers.run` drives it and scores each architecture once):

    settings = EvolutionSettings(population_size=32, tournament_size=8, batch_size=8, seed=0)
    evolution = Evolution(space, settings)
    while evolution.cycle < cycles:
      archs = evolution.ask()                         # Arch [P, L]
      evolution.tell(archs, evaluate(archs))          # rewards [P]

Randomness comes from `jax.random.key(seed)`: the initial samples from one stream, cycle c's
tournaments and mutations from `fold_in(cycles_key, c)`. So `ask()` is a function of the
settings and the history alone, and replaying the history (`from_history`) rebuilds the same
state and the same next proposals; that is also how `from_state_dict` resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moenas_jax import search_space
from moenas_jax.search_space import Arch, SearchSpace


@dataclasses.dataclass(frozen=True)
class EvolutionSettings:
  """Sizes of the search (N population, S tournament, P children per cycle) and its seed.

  `max_remutations`: a child equal to an already scored architecture, or to an earlier child
  of the same batch, is replaced by a fresh mutation of its parent up to this many times
  (0 turns it off). Each retry is one more call of the compiled proposal function (a few
  milliseconds on a 2-core CPU for P = 16, L = 9); with dozens of one-gene neighbours per
  parent, three retries find a new child unless the parent's neighbourhood is nearly all
  scored, and then the repeat is kept: the search loop's cache tells it its first reward again.
  """

  population_size: int
  tournament_size: int
  batch_size: int
  seed: int
  max_remutations: int = 3

  def __post_init__(self):
    for name in ("population_size", "tournament_size", "batch_size", "seed", "max_remutations"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"EvolutionSettings.{name} must be an integer, got {value!r}")
    if self.population_size < 2:
      raise ValueError(f"population_size={self.population_size} must be at least 2: the "
                       f"initial population holds the dense and the largest model")
    if not 1 <= self.tournament_size <= self.population_size:
      raise ValueError(f"tournament_size={self.tournament_size} must be in "
                       f"1..population_size={self.population_size}; lower it or raise "
                       f"population_size")
    if not 1 <= self.batch_size < self.population_size:
      raise ValueError(f"batch_size={self.batch_size} must be in 1..population_size - 1 = "
                       f"{self.population_size - 1}: with P >= N every cycle replaces the whole "
                       f"population, so no member ages and the search is a generational GA, "
                       f"not regularized evolution; lower batch_size or raise "
                       f"population_size (e.g. N = 4 P)")
    if self.max_remutations < 0:
      raise ValueError(f"max_remutations={self.max_remutations} must be >= 0 (0 turns "
                       f"re-mutation off)")


class Record(NamedTuple):
  """One told candidate: its arch (`search_space.to_dict`), the reward used, its cycle."""

  arch: dict[str, list[int]]
  reward: float
  cycle: int


def select(key: jax.Array, rewards: jax.Array, tournament_size: int,
           num_tournaments: int) -> tuple[jax.Array, jax.Array]:
  """Draws tournaments over a population in age order; returns (members [P, S], winners [P]).

  Members are population indices, distinct within a tournament. The winner has the highest
  reward (any ordered values: rewards or their ranks); among equal rewards the youngest
  (largest index) wins.
  """
  # The S first of a random order of the N members: a uniform subset without replacement.
  order = jnp.argsort(jax.random.bits(key, (num_tournaments, rewards.shape[0])), axis=-1)
  members = order[:, :tournament_size]  # [P, S]
  scores = rewards[members]
  best = scores.max(-1, keepdims=True)
  winners = jnp.where(scores == best, members, -1).max(-1)
  return members, winners


@functools.partial(jax.jit, static_argnames="space")
def _sample(key: jax.Array, index: jax.Array, *, space: SearchSpace) -> Arch:
  """Initial sample `index`; one at a time, so one compile serves every population size."""
  return space.sample(jax.random.fold_in(key, index))


@functools.partial(jax.jit, static_argnames=("space", "tournament_size", "batch_size"))
def _mutants(key: jax.Array, population: Arch, ranks: jax.Array, attempt: jax.Array, *,
             space: SearchSpace, tournament_size: int, batch_size: int) -> Arch:
  """The P children of one cycle; `attempt` changes the mutations, not the tournaments."""
  select_key, mutate_key = jax.random.split(key)
  _, winners = select(select_key, ranks, tournament_size, batch_size)
  parents = jax.tree.map(lambda values: values[winners], population)  # [P, L]
  keys = jax.random.split(jax.random.fold_in(mutate_key, attempt), batch_size)
  return jax.vmap(space.mutate)(keys, parents)


class Evolution:
  """Regularized evolution controller: `ask()` P candidates, `tell()` their rewards.

  `batch_size` is P, for the `controllers.Controller` protocol.

  The first cycles propose the initial population in chunks of P: random samples, then the
  dense and the largest model (the youngest, so they live longest). It holds
  ceil(N / P) · P candidates, so when P does not divide N the oldest samples age out as soon
  as the population is full. After that every cycle proposes P children.

  The reward cache lives in the search loop (`controllers.ScoreCache`), which tells a
  repeated architecture its first reward again; the controller only remembers which
  architectures it was told, to re-mutate children that repeat one.
  """

  def __init__(self, space: SearchSpace, settings: EvolutionSettings):
    self.space, self.settings = space, settings
    self.batch_size = settings.batch_size
    init_key, self._cycles_key = jax.random.split(jax.random.key(settings.seed))
    size = math.ceil(settings.population_size / settings.batch_size) * settings.batch_size
    samples = [jax.tree.map(np.asarray, _sample(init_key, np.int32(i), space=space))
               for i in range(size - 2)]
    self._initial = samples + [space.smallest(), space.largest()]
    self._population: list[tuple[Arch, float]] = []  # oldest first
    self._seen: set[tuple] = set()
    self._history: list[Record] = []
    self._pending: Arch | None = None

  @property
  def cycle(self) -> int:
    """Number of batches told so far; the next `ask()` proposes batch `cycle`."""
    return len(self._history) // self.settings.batch_size

  @property
  def population(self) -> list[tuple[Arch, float]]:
    """(arch, reward) of the living members, oldest first."""
    return list(self._population)

  @property
  def history(self) -> list[Record]:
    """Every told candidate in order, P per cycle, repeats included."""
    return list(self._history)

  def best(self) -> tuple[Arch, float]:
    """The highest reward ever told (not only among the living); ties: the earliest."""
    if not self._history:
      raise ValueError("best() needs at least one tell(); ask() and tell() a batch first")
    record = max(self._history, key=lambda r: r.reward)
    return search_space.from_json(record.arch), record.reward

  def ask(self) -> Arch:
    """The P candidates of this cycle, [P, L] NumPy int32; the same until `tell()`."""
    if self._pending is None:
      batch, start = self.settings.batch_size, self.cycle * self.settings.batch_size
      if start < len(self._initial):
        self._pending = search_space.stack(self._initial[start:start + batch])
      else:
        self._pending = search_space.stack(self._children())
    return jax.tree.map(np.copy, self._pending)

  def tell(self, archs: Arch, rewards: Sequence[float] | np.ndarray) -> None:
    """Records the finite rewards [P] of the batch `ask()` returned and ages the population."""
    expected = self.ask()
    candidates = search_space.unstack(self.space.validate(archs))
    if [a.key() for a in candidates] != [a.key() for a in search_space.unstack(expected)]:
      raise ValueError(f"tell() got architectures that differ from the proposals of cycle "
                       f"{self.cycle}; tell the batch ask() returned (a replayed history "
                       f"must come from the same space, settings and seed)")
    rewards = np.asarray(rewards, np.float64)
    if rewards.shape != (self.settings.batch_size,):
      raise ValueError(f"rewards have shape {rewards.shape}; give one per candidate: "
                       f"({self.settings.batch_size},)")
    bad = np.flatnonzero(~np.isfinite(rewards))
    if len(bad):
      raise ValueError(f"rewards[{bad[0]}] = {rewards[bad[0]]} must be finite; give "
                       f"infeasible candidates a finite penalty")
    cycle = self.cycle
    for arch, reward in zip(candidates, rewards.tolist()):
      self._seen.add(arch.key())
      self._population.append((arch, reward))
      self._history.append(Record(search_space.to_dict(arch), reward, cycle))
    del self._population[:-self.settings.population_size]
    self._pending = None

  def state_dict(self) -> dict[str, Any]:
    """JSON-able state: the settings and the history (the rest follows from replaying it)."""
    return {"settings": dataclasses.asdict(self.settings),
            "history": [record._asdict() for record in self._history]}

  @classmethod
  def from_state_dict(cls, space: SearchSpace, state: dict[str, Any]) -> Evolution:
    """Inverse of `state_dict()` (e.g. after `json.loads`), by replaying its history."""
    if set(state) != {"settings", "history"}:
      raise ValueError(f"an evolution state has the keys ['history', 'settings'], got "
                       f"{sorted(state)}; pass what state_dict() returned")
    try:
      settings = EvolutionSettings(**state["settings"])
      records = [Record(**record) for record in state["history"]]
    except TypeError as error:
      raise ValueError(f"the evolution state does not fit EvolutionSettings and Record "
                       f"{Record._fields}: {error}") from error
    return cls.from_history(space, settings, records)

  @classmethod
  def from_history(cls, space: SearchSpace,
                   settings: EvolutionSettings, history: Iterable[Sequence]) -> Evolution:
    """Replays (arch, reward, cycle) triples (arch as an Arch or a dict) batch by batch.

    Gives the same population, cycle and next proposals as the run that wrote the
    history; raises if the history does not follow from these settings.
    """
    evolution = cls(space, settings)
    records = [Record(*entry) for entry in history]
    batch = settings.batch_size
    if len(records) % batch:
      raise ValueError(f"the history has {len(records)} entries, not whole batches of "
                       f"batch_size={batch}; keep every cycle's {batch} entries")
    for start in range(0, len(records), batch):
      chunk = records[start:start + batch]
      if {r.cycle for r in chunk} != {evolution.cycle}:
        raise ValueError(f"history entries {start}..{start + batch - 1} carry cycles "
                         f"{sorted({r.cycle for r in chunk})}, expected {evolution.cycle}")
      archs = [r.arch if isinstance(r.arch, Arch) else search_space.from_json(r.arch)
               for r in chunk]
      evolution.tell(search_space.stack(archs), [r.reward for r in chunk])
    return evolution

  def _children(self) -> list[Arch]:
    """One mutant per tournament; repeats of scored archs (or of an earlier child) are
    re-mutated from the same parent up to `max_remutations` times."""
    population = search_space.stack([arch for arch, _ in self._population])  # [N, L]
    # Ranks [N] order the rewards exactly (float64 on the host, no float32 ties in JAX).
    ranks = np.unique([reward for _, reward in self._population], return_inverse=True)[1]
    key = jax.random.fold_in(self._cycles_key, self.cycle)

    def mutants(attempt: int) -> list[Arch]:
      return search_space.unstack(_mutants(
          key, population, ranks.astype(np.int32), np.int32(attempt), space=self.space,
          tournament_size=self.settings.tournament_size, batch_size=self.settings.batch_size))

    children = mutants(0)
    for attempt in range(1, self.settings.max_remutations + 1):
      seen, repeats = set(self._seen), []
      for child in children:
        repeats.append(child.key() in seen)
        seen.add(child.key())
      if not any(repeats):
        break
      children = [new if repeat else old
                  for old, new, repeat in zip(children, mutants(attempt), repeats)]
    return children
