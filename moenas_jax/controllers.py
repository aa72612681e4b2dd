"""The controller seam: search strategies behind one ask/tell protocol, and the loop that
drives them.

A `Controller` proposes a batch of P candidates (`ask`), takes their rewards (`tell`) and
saves its state as JSON (`state_dict` / `from_state_dict`). Strategies: `evolution`
(regularized evolution, `evolution.Evolution`), `bo` (Bayesian optimisation over a surrogate
of the reward, `bayesopt.BayesOpt`), `llm` (a local language model proposes,
`llm.controller.LLMSearch`) and `random` (`RandomSearch`, the baseline a search must beat at
equal budget). `make(name, ...)` builds one from the search settings.

`run` is the search loop for every controller. It owns the reward cache (`ScoreCache`): a
candidate whose architecture was scored before is not evaluated again, its first reward is
told again. It checkpoints after every `ask`, with the proposals still to score (`pending`),
so a resumed run scores exactly the proposals the killed one had in hand, also for a
controller whose `ask` is not a deterministic function of its state. The cache is rebuilt on
resume from the candidate log (`candidate_log.CandidateLog`), cut back to what the checkpoint
knows. A controller with an `observe(records)` method (llm) gets each batch's scored records,
metrics included, before its `tell`; one with `summary()` adds it to each progress line.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import numpy as np

from moenas_jax import bayesopt, candidate_log, checkpoint, evolution, search_space, tpe
from moenas_jax.llm import controller as llm
from moenas_jax.search_space import Arch, SearchSpace


class Controller(Protocol):
  """What the search loop needs of a strategy; `batch_size` candidates per `ask`."""

  batch_size: int

  def ask(self) -> Arch:
    """The next batch [P, L]; the same batch until `tell`."""

  def tell(self, archs: Arch, rewards: np.ndarray) -> None:
    """The finite rewards [P] of the batch `ask` returned (repeats carry their cached reward).

    After a resume this is the batch the killed run had pending; a controller rebuilt from
    its state must accept it (evolution does: its `ask` is a function of its state).
    """

  def state_dict(self) -> dict[str, Any]:
    """JSON-able state, enough for `from_state_dict`."""

  @classmethod
  def from_state_dict(cls, space: SearchSpace, state: dict[str, Any]) -> Controller:
    """The controller `state_dict` was taken from."""


@dataclasses.dataclass(frozen=True)
class RandomSettings:
  """P candidates per batch, the seed, and redraws of an already proposed architecture."""

  batch_size: int
  seed: int
  max_redraws: int = 10

  def __post_init__(self):
    if self.batch_size < 1 or self.max_redraws < 0:
      raise ValueError(f"random search needs batch_size >= 1 and max_redraws >= 0, got "
                       f"{self.batch_size} and {self.max_redraws}")


@functools.partial(jax.jit, static_argnames="space")
def _draw(key: jax.Array, *, space: SearchSpace) -> Arch:
  return space.sample(key)


class RandomSearch:
  """Uniform samples of the space (`SearchSpace.sample`), none proposed twice if avoidable.

  Sample i of the run comes from `fold_in(key(seed), i)`, redraw r of it from
  `fold_in(that, r)`: a function of the seed and the proposals so far, so replaying the
  history rebuilds the state. A draw equal to an earlier proposal is redrawn up to
  `max_redraws` times (then kept: the loop's cache scores it for free).
  """

  def __init__(self, space: SearchSpace, settings: RandomSettings):
    self.space, self.settings = space, settings
    self.batch_size = settings.batch_size
    self._key = jax.random.key(settings.seed)
    self._history: list[dict[str, Any]] = []
    self._seen: set[tuple] = set()
    self._pending: Arch | None = None

  @property
  def cycle(self) -> int:
    return len(self._history) // self.batch_size

  def ask(self) -> Arch:
    if self._pending is None:
      batch, start = [], len(self._history)
      for index in range(start, start + self.batch_size):
        key = jax.random.fold_in(self._key, index)
        for redraw in range(self.settings.max_redraws + 1):
          arch = jax.tree.map(np.asarray, _draw(jax.random.fold_in(key, redraw),
                                                space=self.space))
          if arch.key() not in self._seen and all(arch.key() != a.key() for a in batch):
            break
        batch.append(arch)
      self._pending = search_space.stack(batch)
    return jax.tree.map(np.copy, self._pending)

  def tell(self, archs: Arch, rewards: np.ndarray) -> None:
    """Records a batch it proposed (also one a killed run had pending) with its rewards."""
    search_space.check_rewards(rewards, self.batch_size)
    for arch, value in zip(search_space.unstack(archs), np.asarray(rewards, np.float64)):
      self._history.append({"arch": search_space.to_dict(arch), "reward": float(value)})
      self._seen.add(arch.key())
    self._pending = None

  def state_dict(self) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(self.settings), "history": list(self._history)}

  @classmethod
  def from_state_dict(cls, space: SearchSpace, state: dict[str, Any]) -> RandomSearch:
    controller = cls(space, RandomSettings(**state["settings"]))
    history = state["history"]
    for start in range(0, len(history), controller.batch_size):
      chunk = history[start:start + controller.batch_size]
      controller.tell(search_space.stack([search_space.from_json(r["arch"]) for r in chunk]),
                      [r["reward"] for r in chunk])
    return controller


CONTROLLERS = {"bo": bayesopt.BayesOpt, "evolution": evolution.Evolution,
               "llm": llm.LLMSearch, "optuna": tpe.TPESearch, "random": RandomSearch}
NAMES = tuple(CONTROLLERS)
Settings = (bayesopt.BOSettings | evolution.EvolutionSettings | llm.LLMSettings
            | tpe.TPESettings | RandomSettings)


def settings(name: str, *, population_size: int, tournament_size: int, batch_size: int,
             seed: int, bo: dict[str, Any] | None = None,
             optuna: dict[str, Any] | None = None,
             llm_options: dict[str, Any] | None = None) -> Settings:
  """The checked settings of controller `name` (one of `NAMES`); builds nothing else, so a
  config can be validated before anything compiles.

  `bo`, `optuna`, `llm_options`: the `bayesopt.BOSettings` / `tpe.TPESettings` /
  `llm.LLMSettings` fields other than batch_size and seed (their defaults when None), e.g.
  the budgets; only that controller reads them.
  An extra that is not installed raises ImportError (naming the pip command).
  """
  if name == "evolution":
    return evolution.EvolutionSettings(population_size=population_size,
                                       tournament_size=tournament_size,
                                       batch_size=batch_size, seed=seed)
  if name == "random":
    return RandomSettings(batch_size=batch_size, seed=seed)
  if name == "bo":
    return bayesopt.BOSettings(batch_size=batch_size, seed=seed, **(bo or {}))
  if name == "optuna":
    return tpe.TPESettings(batch_size=batch_size, seed=seed, **(optuna or {}))
  if name == "llm":
    return llm.LLMSettings(batch_size=batch_size, seed=seed, **(llm_options or {}))
  raise ValueError(f"unknown controller {name!r}; use one of {', '.join(NAMES)}")


def make(name: str, space: SearchSpace, **options: Any) -> Controller:
  """The controller `name` with the search's settings (the keywords of `settings`)."""
  chosen = settings(name, **options)
  return CONTROLLERS[name](space, chosen)


class ScoreCache:
  """Rewards by architecture (`Arch.key()`): the first reward scored is kept for the run."""

  def __init__(self, records: Sequence[dict[str, Any]] = ()):
    self._rewards: dict[tuple, float] = {}
    for record in records:
      self._rewards.setdefault(search_space.from_json(record["arch"]).key(), record["reward"])

  def __len__(self) -> int:
    return len(self._rewards)

  def get(self, arch: Arch) -> float | None:
    return self._rewards.get(arch.key())

  def best(self) -> float:
    """The highest reward cached (NaN while empty)."""
    return max(self._rewards.values(), default=float("nan"))

  def to_score(self, archs: Arch) -> np.ndarray:
    """Indices into a batch [P, L]: the first occurrence of each architecture not cached."""
    seen, indices = set(self._rewards), []
    for index, arch in enumerate(search_space.unstack(archs)):
      if arch.key() not in seen:
        seen.add(arch.key())
        indices.append(index)
    return np.asarray(indices, np.int64)

  def fill(self, archs: Arch, rewards: Sequence[float]) -> np.ndarray:
    """Rewards [P] of a batch: those given at `to_score(archs)` (must be finite), the cached
    ones elsewhere; the new ones enter the cache."""
    rewards = np.asarray(rewards, np.float64)
    candidates = search_space.unstack(archs)
    for index in self.to_score(archs):
      if not np.isfinite(rewards[index]):
        raise ValueError(f"rewards[{index}] = {rewards[index]} must be finite (a new "
                         f"architecture); give infeasible candidates a finite penalty")
      self._rewards[candidates[index].key()] = float(rewards[index])
    return np.asarray([self._rewards[arch.key()] for arch in candidates])


# score(archs [P, L], todo indices, cycle) -> a record per index of todo: {"metrics", "reward"}.
Score = Callable[[Arch, np.ndarray, int], list[dict[str, Any]]]


def run(controller: Controller, space: SearchSpace, score: Score, *, cycles: int,
        checkpoint_dir: Path, log_path: Path,
        progress: Callable[[int, str], None] | None = None,
        log: Callable[[str], None] | None = None) -> list[dict]:
  """Drives `controller` for `cycles` batches (resuming from `checkpoint_dir`); returns every
  scored candidate record (arch, metrics, reward, cycle) as written to `log_path`.

  `progress(cycles done, text)` is called after each batch.
  """
  with checkpoint.Checkpointer(checkpoint_dir) as checkpoints:
    cycle, logged, pending = 0, 0, None
    if checkpoints.latest_step():
      _, meta = checkpoints.restore()
      controller = type(controller).from_state_dict(space, meta["state"])
      cycle, logged = meta["cycle"], meta["logged"]
      pending = meta["pending"] and search_space.from_json(meta["pending"])
      if log is not None:
        log(f"[search] resumed at cycle {cycle}/{cycles}"
            f"{' with its proposals pending' if pending else ''}")
    with candidate_log.CandidateLog(log_path, expected=logged) as log_file:
      cache = ScoreCache(log_file.records)
      while cycle < cycles:
        archs = pending
        if archs is None:  # a fresh proposal: saved before it is scored
          archs = controller.ask()
          checkpoints.save(2 * cycle + 1, None, {"state": controller.state_dict(),
                                                 "cycle": cycle, "logged": logged,
                                                 "pending": search_space.to_dict(archs)})
        todo = cache.to_score(archs)
        records = [{"arch": search_space.to_dict(search_space.unstack(archs)[i]), **record,
                    "cycle": cycle} for i, record in zip(todo, score(archs, todo, cycle))]
        rewards = np.full(search_space.population_size(archs), np.nan)
        rewards[todo] = [record["reward"] for record in records]
        if hasattr(controller, "observe"):
          controller.observe(records)
        controller.tell(archs, cache.fill(archs, rewards))
        log_file.append(records)
        logged, cycle, pending = logged + len(records), cycle + 1, None
        checkpoints.save(2 * cycle, None, {"state": controller.state_dict(), "cycle": cycle,
                                           "logged": logged, "pending": None})
        if progress is not None:
          note = f"; {controller.summary()}" if hasattr(controller, "summary") else ""
          progress(cycle, f"{logged} scored, best reward {cache.best():.4f}{note}")
  return log_file.records
