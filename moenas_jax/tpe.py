"""Optuna's TPE (multivariate) behind the controller seam: the library baseline users know.

Each gene of `SearchSpace.genes` at each position is a categorical distribution
(`<gene>_<position>` in 1..maximum, e.g. `num_experts_0`, `top_k_0`); a value above its cap
(a top-k above its layer's expert count) is clipped to it (`SearchSpace.clip`), as
`SearchSpace.mutate` does. The hard budgets are Optuna
constraints (`trial.set_constraint`, feasible when ≤ 0: count / budget − 1; TPE ranks
infeasible trials below feasible ones): an over-budget proposal is never scored, it is told
at once with its constraint and another is asked. So is a repeat of an architecture scored
before (told its first reward again). After `max_redraws` redraws for one slot, the last
proposal stays in the batch (the loop's cache scores a repeat for free; an over-budget one
gets the reward's infeasible value).

Resume without a database: the state is the settings and every told trial (params, value,
constraints) in order. Each `ask` rebuilds an in-memory study from them and draws with a new
`TPESampler(seed=<seed, cycle>)`, so a proposal is a function of the seed and the history
alone, and a resumed search asks exactly what an uninterrupted one would. The first
`startup_trials` trials are TPE's random start-up. Needs the optional `optuna` package
(`pip install "moenas_jax[optuna]"`).
"""

from __future__ import annotations

import dataclasses
import importlib
import warnings
from typing import Any

import jax
import numpy as np

from moenas_jax import search_space
from moenas_jax.search_space import Arch, SearchSpace

INSTALL = 'pip install "moenas_jax[optuna]"'
# An over-budget trial's value: constraints rank it below every feasible trial whatever it is.
_INFEASIBLE_VALUE = 0.0


def _optuna():
  try:
    optuna = importlib.import_module("optuna")
  except ImportError:
    raise ImportError(f"the optuna controller needs the optuna package, which is not "
                      f"installed; {INSTALL}") from None
  optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial
  return optuna


@dataclasses.dataclass(frozen=True)
class TPESettings:
  """P candidates per batch, the seed, TPE's random start-up trials, redraws per slot of an
  over-budget or already scored proposal, and the hard budgets (None: none)."""

  batch_size: int
  seed: int
  startup_trials: int = 16
  max_redraws: int = 10
  param_budget: float | None = None
  mac_budget: float | None = None

  def __post_init__(self):
    if self.batch_size < 1 or self.startup_trials < 1 or self.max_redraws < 0:
      raise ValueError(f"optuna needs batch_size >= 1, startup_trials >= 1 and max_redraws "
                       f">= 0, got {self.batch_size}, {self.startup_trials} and "
                       f"{self.max_redraws}")
    search_space.check_budgets("optuna", self.param_budget, self.mac_budget)
    _optuna()


class TPESearch:
  """The `optuna` controller (module docstring): `ask()` P candidates, `tell()` rewards."""

  def __init__(self, space: SearchSpace, settings: TPESettings):
    self.space, self.settings = space, settings
    self.batch_size = settings.batch_size
    self._optuna = _optuna()
    categorical = self._optuna.distributions.CategoricalDistribution
    self._distributions = {f"{gene.name}_{position}": categorical(list(range(1, maximum + 1)))
                           for gene in space.genes
                           for position, maximum in enumerate(gene.maxima)}
    self._trials: list[dict[str, Any]] = []  # every told trial, in order
    self._scored: dict[tuple, float] = {}  # first reward per architecture
    self._cycle = 0
    self._pending: tuple[Arch, list[dict[str, Any]], list[dict[str, Any]]] | None = None

  @property
  def cycle(self) -> int:
    return self._cycle

  def ask(self) -> Arch:
    """The batch [P, L] (NumPy int32); the same until `tell()`."""
    if self._pending is None:
      self._pending = self._propose()
    return jax.tree.map(np.copy, self._pending[0])

  def tell(self, archs: Arch, rewards: Any) -> None:
    """Records the finite rewards [P] of the batch `ask` returned (also after a resume)."""
    rewards = search_space.check_rewards(rewards, self.batch_size)
    if self._pending is None or (search_space.to_dict(self._pending[0])
                                 != search_space.to_dict(archs)):
      raise ValueError("tell() takes the batch the last ask() returned")
    _, redrawn, proposed = self._pending
    self._trials.extend(redrawn)
    for trial, arch, value in zip(proposed, search_space.unstack(archs), rewards.tolist()):
      self._trials.append({**trial, "value": value})
      self._scored.setdefault(arch.key(), value)
    self._cycle += 1
    self._pending = None

  def state_dict(self) -> dict[str, Any]:
    pending = None if self._pending is None else {
        "arch": search_space.to_dict(self._pending[0]), "redrawn": self._pending[1],
        "proposed": self._pending[2]}
    return {"settings": dataclasses.asdict(self.settings), "trials": list(self._trials),
            "cycle": self._cycle, "pending": pending}

  @classmethod
  def from_state_dict(cls, space: SearchSpace, state: dict[str, Any]) -> TPESearch:
    controller = cls(space, TPESettings(**state["settings"]))
    controller._trials = [dict(trial) for trial in state["trials"]]
    for trial in controller._trials:
      if "arch" in trial and trial.get("scored"):
        controller._scored.setdefault(search_space.from_json(trial["arch"]).key(),
                                      trial["value"])
    controller._cycle = state["cycle"]
    if state["pending"] is not None:
      pending = state["pending"]
      controller._pending = (search_space.from_json(pending["arch"]), pending["redrawn"],
                             pending["proposed"])
    return controller

  def _arch(self, params: dict[str, int]) -> Arch:
    return self.space.validate(self.space.clip(Arch(**{
        gene.name: np.asarray([params[f"{gene.name}_{position}"]
                               for position in range(len(gene.maxima))], np.int32)
        for gene in self.space.genes})))

  def _violations(self, arch: Arch) -> dict[str, float]:
    """count / budget − 1 per budget (≤ 0: within it)."""
    archs = search_space.stack([arch])
    return {name: float(count(archs)[0] / budget - 1)
            for name, budget, count in (("params", self.settings.param_budget, self.space.params),
                                        ("macs", self.settings.mac_budget, self.space.macs))
            if budget is not None}

  def _study(self) -> Any:
    """An in-memory study of every told trial, sampling with this cycle's seed."""
    optuna = self._optuna
    seed = int(np.random.SeedSequence((self.settings.seed, self._cycle)).generate_state(1)[0])
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
      sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                           n_startup_trials=self.settings.startup_trials)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    for trial in self._trials:
      study.add_trial(optuna.trial.create_trial(
          params=trial["params"], distributions=self._distributions, value=trial["value"],
          constraints=trial["constraints"]))
    return study

  def _propose(self) -> tuple[Arch, list[dict[str, Any]], list[dict[str, Any]]]:
    """(batch, trials told while drawing it, the batch's trials without their values)."""
    study, batch, redrawn, proposed = self._study(), [], [], []
    while len(batch) < self.batch_size:
      for redraw in range(self.settings.max_redraws + 1):
        trial = study.ask(self._distributions)
        arch = self._arch(trial.params)
        violations = self._violations(arch)
        for name, value in violations.items():
          trial.set_constraint(name, value)
        entry = {"params": dict(trial.params), "constraints": violations,
                 "arch": search_space.to_dict(arch)}
        over = any(value > 0 for value in violations.values())
        known = self._scored.get(arch.key())
        if redraw == self.settings.max_redraws or not (over or known is not None):
          break
        value = _INFEASIBLE_VALUE if over else known
        study.tell(trial, value)
        redrawn.append({**entry, "value": value})
      batch.append(arch)
      proposed.append({**entry, "scored": True})  # running until the batch is told
    return search_space.stack(batch), redrawn, proposed
