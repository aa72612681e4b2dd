"""Bayesian optimisation over `Arch` candidates (MoENAS-style): a surrogate of the reward.

Each cycle the controller fits a surrogate on every distinct architecture scored so far (its
first reward, as the search loop's cache keeps it), then proposes the P candidates of highest
upper confidence bound, mean + κ · spread, among a pool of `pool_size` random samples
(`SearchSpace.sample`) and `pool_size` single mutations (`SearchSpace.mutate`) of the P best
scored. Candidates over the params or MACs budget (`SearchSpace.params` / `.macs`, the
reward's hard budgets) are dropped from the pool before anything is scored, as are repeats
and architectures scored before. Should fewer than P remain, scored ones fill the batch (the
loop's cache tells them their reward again), then the dense model (within every budget
`settings.check` accepts).

Warm-up: until `warmup` (≥ 2, `MIN_POINTS`) distinct architectures are scored, the surrogate
is not fitted and a cycle proposes the first P feasible unscored samples of its pool, in draw
order: random search.

Surrogates (`SURROGATES`), both giving a mean and a spread per candidate:

- `xgboost`: gradient-boosted trees (`xgb.train`, objective `reg:quantileerror`) predicting
  the 16%, 50% and 84% quantiles from one model, on the ordinal features
  (`search_space.features`); mean = the median, spread = half the 16-84% band. Needs the
  optional `xgboost-cpu` package: `pip install "moenas_jax[bo]"`.
- `ridge`: NumPy only; an ensemble of `members` ridge regressions, each on a bootstrap
  resample, on the one-hot genes plus the pairwise products of the ordinal ones;
  mean and spread = the mean and standard deviation of the members' predictions.

Randomness: cycle c's pool comes from `fold_in(key(seed), c)`, its surrogate's from
`default_rng((seed, c))`, so `ask()` is a function of the settings and the history alone;
`from_state_dict` replays the history and the next `ask()` refits the same surrogate.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import numpy as np

from moenas_jax import search_space
from moenas_jax.search_space import Arch, SearchSpace

MIN_POINTS = 2  # distinct scored architectures a surrogate needs (a spread needs two)
INSTALL = 'pip install "moenas_jax[bo]"'


def _xgboost():
  try:
    return importlib.import_module("xgboost")
  except ImportError:
    raise ImportError(f"the xgboost surrogate needs the xgboost-cpu package, which is not "
                      f"installed; {INSTALL}, or use the surrogate 'ridge'") from None


def _check_points(x: np.ndarray, y: np.ndarray) -> None:
  if len(x) < MIN_POINTS or len(x) != len(y):
    raise ValueError(f"a surrogate fits on at least {MIN_POINTS} scored architectures with "
                     f"one reward each, got {len(x)} rows and {len(y)} rewards; propose "
                     f"random samples until there are enough (the controller's warm-up)")


class XGBoostQuantiles:
  """Quantile regression trees (16%, 50%, 84%) from one `xgb.train` model; 1 thread."""

  QUANTILES = (0.16, 0.5, 0.84)

  def __init__(self, rounds: int = 100, max_depth: int = 4, learning_rate: float = 0.1):
    self.rounds, self.max_depth, self.learning_rate = rounds, max_depth, learning_rate
    self._booster = None

  @staticmethod
  def design(space: SearchSpace, archs: Arch) -> np.ndarray:
    return search_space.features(space, archs)

  def fit(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
    _check_points(x, y)
    xgb = _xgboost()
    params = {"objective": "reg:quantileerror", "quantile_alpha": np.asarray(self.QUANTILES),
              "tree_method": "hist", "max_depth": self.max_depth, "eta": self.learning_rate,
              "nthread": 1, "seed": int(rng.integers(2**31))}
    self._booster = xgb.train(params, xgb.DMatrix(x, label=y), num_boost_round=self.rounds)

  def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [n], spread [n]): the median and half the 16-84% band (0 where they cross)."""
    low, median, high = self._booster.predict(_xgboost().DMatrix(x)).astype(np.float64).T
    return median, np.maximum(high - low, 0.0) / 2


class RidgeEnsemble:
  """`members` ridge regressions (penalty `alpha` on standardised rewards), each fitted on a
  bootstrap resample of the points; no penalty on the intercept."""

  def __init__(self, members: int = 16, alpha: float = 0.1):
    self.members, self.alpha = members, alpha
    self._weights = self._intercepts = None

  @staticmethod
  def design(space: SearchSpace, archs: Arch) -> np.ndarray:
    """The one-hot genes and the pairwise products of the ordinal genes."""
    ordinal = search_space.features(space, archs)
    first, second = np.triu_indices(ordinal.shape[1], 1)
    return np.concatenate([search_space.features(space, archs, one_hot=True),
                           ordinal[:, first] * ordinal[:, second]], axis=1)

  def fit(self, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> None:
    _check_points(x, y)
    scale = y.std() or 1.0
    weights, intercepts = [], []
    for _ in range(self.members):
      rows = rng.integers(0, len(x), len(x))
      xs, ys = x[rows], y[rows] / scale
      x_mean, y_mean = xs.mean(0), ys.mean()
      centred = xs - x_mean
      w = np.linalg.solve(centred.T @ centred + self.alpha * np.eye(x.shape[1]),
                          centred.T @ (ys - y_mean))
      weights.append(w * scale)
      intercepts.append((y_mean - x_mean @ w) * scale)
    self._weights, self._intercepts = np.stack(weights), np.asarray(intercepts)

  def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean [n], spread [n]) over the members' predictions (spread: their std)."""
    predictions = x @ self._weights.T + self._intercepts  # [n, members]
    return predictions.mean(1), predictions.std(1)


SURROGATES = {"xgboost": XGBoostQuantiles, "ridge": RidgeEnsemble}


def require(surrogate: str) -> None:
  """Raises ValueError for an unknown surrogate, ImportError (naming the pip command) for
  one whose package is missing."""
  if surrogate not in SURROGATES:
    raise ValueError(f"unknown surrogate {surrogate!r}; use one of {', '.join(SURROGATES)}")
  if surrogate == "xgboost":
    _xgboost()


@dataclasses.dataclass(frozen=True)
class BOSettings:
  """P candidates per cycle, the seed, the surrogate, the UCB weight κ (`kappa`), the pool
  size per kind (samples, mutants), the warm-up, and the hard budgets (None: none)."""

  batch_size: int
  seed: int
  surrogate: str = "xgboost"
  kappa: float = 1.0
  pool_size: int = 256
  warmup: int = 16
  param_budget: float | None = None
  mac_budget: float | None = None

  def __post_init__(self):
    if self.batch_size < 1 or self.pool_size < self.batch_size:
      raise ValueError(f"bo needs batch_size >= 1 and pool_size >= batch_size, got "
                       f"{self.batch_size} and {self.pool_size}")
    if not (np.isfinite(self.kappa) and self.kappa >= 0) or self.warmup < MIN_POINTS:
      raise ValueError(f"bo needs a finite kappa >= 0 and warmup >= {MIN_POINTS}, got "
                       f"{self.kappa} and {self.warmup}")
    search_space.check_budgets("bo", self.param_budget, self.mac_budget)
    require(self.surrogate)

  def feasible(self, space: SearchSpace, archs: Arch) -> np.ndarray:
    """[P] bool: within the params and MACs budgets (exact integer counts)."""
    return search_space.within_budget(space, archs, self.param_budget, self.mac_budget)


@functools.partial(jax.jit, static_argnames=("space", "size"))
def _samples(key: jax.Array, *, space: SearchSpace, size: int) -> Arch:
  return space.sample_population(key, size)


@functools.partial(jax.jit, static_argnames="space")
def _mutants(key: jax.Array, parents: Arch, *, space: SearchSpace) -> Arch:
  keys = jax.random.split(key, search_space.population_size(parents))
  return jax.vmap(space.mutate)(keys, parents)


class BayesOpt:
  """The `bo` controller (module docstring): `ask()` P candidates, `tell()` their rewards."""

  def __init__(self, space: SearchSpace, settings: BOSettings):
    self.space, self.settings = space, settings
    self.batch_size = settings.batch_size
    self._key = jax.random.key(settings.seed)
    self._history: list[dict[str, Any]] = []
    self._scored: dict[tuple, tuple[Arch, float]] = {}  # first reward per architecture
    self._pending: Arch | None = None

  @property
  def cycle(self) -> int:
    return len(self._history) // self.batch_size

  def ask(self) -> Arch:
    """The P candidates of this cycle, [P, L] NumPy int32; the same until `tell()`."""
    if self._pending is None:
      self._pending = search_space.stack(self._propose())
    return jax.tree.map(np.copy, self._pending)

  def tell(self, archs: Arch, rewards: Any) -> None:
    """Records the finite rewards [P] of a batch it proposed (also one a killed run had
    pending)."""
    rewards = search_space.check_rewards(rewards, self.batch_size)
    for arch, value in zip(search_space.unstack(archs), rewards.tolist()):
      self._history.append({"arch": search_space.to_dict(arch), "reward": value})
      self._scored.setdefault(arch.key(), (arch, value))
    self._pending = None

  def state_dict(self) -> dict[str, Any]:
    return {"settings": dataclasses.asdict(self.settings), "history": list(self._history)}

  @classmethod
  def from_state_dict(cls, space: SearchSpace, state: dict[str, Any]) -> BayesOpt:
    """Inverse of `state_dict()`, by replaying its history batch by batch."""
    controller = cls(space, BOSettings(**state["settings"]))
    history, size = state["history"], controller.batch_size
    for start in range(0, len(history), size):
      chunk = history[start:start + size]
      controller.tell(search_space.stack([search_space.from_json(r["arch"]) for r in chunk]),
                      [r["reward"] for r in chunk])
    return controller

  def _propose(self) -> list[Arch]:
    settings, size = self.settings, self.batch_size
    sample_key, mutate_key = jax.random.split(jax.random.fold_in(self._key, self.cycle))
    pool = [_samples(sample_key, space=self.space, size=settings.pool_size)]
    fitted = len(self._scored) >= settings.warmup
    if fitted:
      pool.append(_mutants(mutate_key, self._parents(), space=self.space))
    pool = jax.tree.map(lambda *parts: np.concatenate([np.asarray(p) for p in parts]), *pool)
    candidates = _unique(search_space.unstack(pool), settings.feasible(self.space, pool))
    new = [arch for arch in candidates if arch.key() not in self._scored]
    old = [arch for arch in candidates if arch.key() in self._scored]
    if fitted and new:
      order = np.argsort(-self._upper_bound(search_space.stack(new)), kind="stable")
      new = [new[i] for i in order[:size]]
    return (new + old + [self.space.smallest()] * size)[:size]

  def _parents(self) -> Arch:
    """The P best scored architectures (ties: the earliest), repeated to `pool_size` rows."""
    scored = list(self._scored.values())
    best = np.argsort([-reward for _, reward in scored], kind="stable")[:self.batch_size]
    return search_space.stack([scored[i][0] for i in np.resize(best, self.settings.pool_size)])

  def _upper_bound(self, archs: Arch) -> np.ndarray:
    """mean + κ · spread of the surrogate fitted on every scored architecture."""
    surrogate = SURROGATES[self.settings.surrogate]()
    scored = search_space.stack([arch for arch, _ in self._scored.values()])
    rewards = np.asarray([reward for _, reward in self._scored.values()])
    surrogate.fit(surrogate.design(self.space, scored), rewards,
                  np.random.default_rng((self.settings.seed, self.cycle)))
    mean, spread = surrogate.predict(surrogate.design(self.space, archs))
    return mean + self.settings.kappa * spread


def _unique(archs: list[Arch], feasible: np.ndarray) -> list[Arch]:
  """The feasible architectures, each once (its first occurrence), in order."""
  seen, kept = set(), []
  for arch, ok in zip(archs, feasible):
    if ok and arch.key() not in seen:
      seen.add(arch.key())
      kept.append(arch)
  return kept
