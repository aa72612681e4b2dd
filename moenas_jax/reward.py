"""The fairness-aware reward, the hard size budget, and the Pareto archive of the search.

Reward of a candidate (every metric lies in [0, 1]; the gap in [−1, 1]):

    reward = accuracy − λ_disp · disparity + λ_rob · robustness − λ_gap · max(gap, 0)
             + λ_cell · worst_cell_accuracy

with the metric names `accuracy`, `disparity`, `robustness`, `generalization_gap` and
`worst_cell_accuracy` (see `metrics.py`). A term whose weight is 0 needs no metric.

Hard budget: a candidate is feasible when params ≤ param_budget and MACs ≤ mac_budget (a
budget of None is no budget). A feasible reward is at least −(λ_disp + λ_gap) (accuracy 0,
disparity 1, robustness 0, gap 1, worst cell 0), so an infeasible candidate gets

    reward = −(1 + λ_disp + λ_gap) − excess,   excess = Σ_budgets max(value / budget − 1, 0)

which ranks it below every feasible one, and among infeasible ones the smaller relative
excess ranks higher.

`ParetoArchive` keeps the non-dominated candidates over `OBJECTIVES`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moenas_jax import metrics as metrics_lib
from moenas_jax.search_space import SearchSpace


@dataclasses.dataclass(frozen=True)
class RewardWeights:
  """Weights of the reward terms (all ≥ 0).

  disparity 1.0: a point of disparity between groups costs as much as a point of accuracy,
  the trade the search is built to make. robustness 0.5: lighting accuracy largely moves with
  clean accuracy, so a full weight would count accuracy about twice. gap 0.5: only overfitting
  (a positive gap) is penalised, at half weight because gaps measured with shared supernet
  weights are noisy. worst_cell 0.0: off by default because a small (class, group) cell is
  noisy (one example can move it by 10 points); turn it on for symmetric skews such as
  CIFAR-10S, where group accuracies stay equal while minority cells collapse.
  """

  disparity: float = 1.0
  robustness: float = 0.5
  gap: float = 0.5
  worst_cell: float = 0.0

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"reward weight {field.name}={value!r} must be a finite number >= 0 "
                         f"(the infeasible floor assumes non-negative weights)")

  @classmethod
  def from_config(cls, config: Any) -> RewardWeights:
    """From a mapping or a ConfigDict with some of the fields; unknown names are refused."""
    values = dict(config.items())
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"unknown reward weights {unknown}; the weights are {names}")
    return cls(**values)


def _xp(*values: Any):
  """jax.numpy if any value is a JAX array (or tracer), else NumPy."""
  return jnp if any(isinstance(v, jax.Array) for v in values) else np


def scalar_reward(metrics: Mapping[str, Any], weights: RewardWeights = RewardWeights()) -> Any:
  """The reward without the budget, elementwise over arrays [P] (NumPy or JAX)."""
  xp = _xp(*metrics.values())

  def metric(name, weight):
    if name not in metrics:
      raise ValueError(f"the reward needs metrics[{name!r}] (its weight is {weight}); "
                       f"compute it or set its weight to 0")
    return xp.asarray(metrics[name])

  value = metric("accuracy", 1.0)
  if weights.disparity:
    value = value - weights.disparity * metric("disparity", weights.disparity)
  if weights.robustness:
    value = value + weights.robustness * metric("robustness", weights.robustness)
  if weights.gap:
    value = value - weights.gap * xp.maximum(metric("generalization_gap", weights.gap), 0.0)
  if weights.worst_cell:
    value = value + weights.worst_cell * metric("worst_cell_accuracy", weights.worst_cell)
  return value


def infeasible_floor(weights: RewardWeights) -> float:
  """1 below the smallest feasible reward, −(λ_disp + λ_gap): where infeasible rewards start."""
  return -(1.0 + weights.disparity + weights.gap)


def _budgets(params: Any, macs: Any, param_budget: float | None,
             mac_budget: float | None) -> list[tuple[np.ndarray, float]]:
  """(values, budget) pairs of the budgets that are set; host int64 values, so MACs fit."""
  if mac_budget is not None and macs is None:
    raise ValueError(f"mac_budget={mac_budget} is set but no MACs were given; pass macs "
                     f"(SearchSpace.macs) or set mac_budget=None")
  pairs = [(params, param_budget), (macs, mac_budget)]
  return [(np.asarray(values, np.int64), budget) for values, budget in pairs
          if budget is not None]


def budget_excess(params: Any, macs: Any = None, *, param_budget: float | None = None,
                  mac_budget: float | None = None) -> np.ndarray:
  """Σ over the set budgets of max(value / budget − 1, 0) per candidate; 0 when within."""
  excess = np.zeros(np.shape(params))
  for values, budget in _budgets(params, macs, param_budget, mac_budget):
    excess = excess + np.maximum(values / budget - 1.0, 0.0)
  return excess


def within_budget(params: Any, macs: Any = None, *, param_budget: float | None = None,
                  mac_budget: float | None = None) -> np.ndarray:
  """params ≤ param_budget and macs ≤ mac_budget per candidate (exact integer comparison)."""
  feasible = np.ones(np.shape(params), bool)
  for values, budget in _budgets(params, macs, param_budget, mac_budget):
    feasible = feasible & (values <= budget)
  return feasible


def reward(metrics: Mapping[str, Any], params: Any, macs: Any = None, *,
           weights: RewardWeights = RewardWeights(), param_budget: float | None = None,
           mac_budget: float | None = None) -> Any:
  """The reward of the module docstring, budget included, per candidate.

  metrics: arrays [P] (or scalars), NumPy or JAX; the result has the same kind. params and
  macs: host integers [P] (`SearchSpace.params` / `SearchSpace.macs`), never traced.
  """
  feasible = within_budget(params, macs, param_budget=param_budget, mac_budget=mac_budget)
  penalty = infeasible_floor(weights) - budget_excess(params, macs, param_budget=param_budget,
                                                      mac_budget=mac_budget)
  xp = _xp(*metrics.values())
  return xp.where(feasible, scalar_reward(metrics, weights), penalty)


def check_budget(space: SearchSpace, param_budget: float | None,
                 mac_budget: float | None = None) -> None:
  """Refuses, before anything compiles, budgets that no candidate of the space can meet.

  The smallest candidate is `space.dense()` (one expert, top-1 in every layer): parameters
  grow with every expert count and MACs with every expert count and top-k (see
  `SearchSpace.params` and `SearchSpace.macs`).
  """
  dense = space.dense()
  for name, budget, minimum, unit in (
      ("param_budget", param_budget, int(space.params(dense)), "parameters"),
      ("mac_budget", mac_budget, int(space.macs(dense)), "MACs per image")):
    if budget is None:
      continue
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
      raise ValueError(f"{name}={budget!r} must be a positive number, or None for no budget")
    if budget < minimum:
      raise ValueError(f"{name}={budget:,} is below the {minimum:,} {unit} of the smallest "
                       f"candidate (the dense model: one expert, top-1 in every layer), so no "
                       f"candidate fits; raise {name} to at least {minimum:,} or search a "
                       f"smaller supernet")


# The Pareto objectives: metric name and whether larger ("max") or smaller ("min") is better.
OBJECTIVES: tuple[tuple[str, str], ...] = (
    ("accuracy", "max"),
    ("disparity", "min"),
    ("robustness", "max"),
    ("generalization_gap", "min"),
    ("params", "min"),
)


def _oriented(metrics: Mapping[str, Any], objectives: Sequence[tuple[str, str]]
              ) -> tuple[float, ...]:
  """The objective values with "min" ones negated, so larger is better everywhere."""
  missing = [name for name, _ in objectives if name not in metrics]
  if missing:
    raise ValueError(f"metrics lack the Pareto objectives {missing}; give them or build the "
                     f"archive with other objectives")
  values = []
  for name, direction in objectives:
    value = float(np.asarray(metrics[name]))
    if not math.isfinite(value):
      raise ValueError(f"objective {name}={value} is not a finite number; fix its evaluation")
    values.append(value if direction == "max" else -value)
  return tuple(values)


def dominates(a: Mapping[str, Any], b: Mapping[str, Any],
              objectives: Sequence[tuple[str, str]] = OBJECTIVES) -> bool:
  """Whether metrics a are at least as good as b in every objective and better in one."""
  x, y = _oriented(a, objectives), _oriented(b, objectives)
  return all(p >= q for p, q in zip(x, y)) and any(p > q for p, q in zip(x, y))


class ParetoArchive:
  """The non-dominated candidates seen so far, over `objectives` (default `OBJECTIVES`).

  Entries are dicts with a JSON-able `arch` (e.g. `search_space.to_dict(arch)`) and a
  `metrics` dict holding the objectives; other JSON-able keys are kept. An architecture is
  kept once (its first evaluation); different architectures with equal objectives are all
  kept. `front` is ordered best first by the objectives in table order, then by the arch's
  JSON, so it does not depend on the order of `add` calls.
  """

  def __init__(self, objectives: Sequence[tuple[str, str]] = OBJECTIVES):
    objectives = tuple((str(name), str(direction)) for name, direction in objectives)
    names = [name for name, _ in objectives]
    bad = [direction for _, direction in objectives if direction not in ("max", "min")]
    if not objectives or bad or len(set(names)) != len(names):
      raise ValueError(f"objectives {objectives} must be distinct (name, 'max' | 'min') pairs, "
                       f"at least one")
    self.objectives = objectives
    self._front: list[dict] = []

  @staticmethod
  def _arch_key(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry["arch"], sort_keys=True)

  def _sort_key(self, entry: Mapping[str, Any]) -> tuple:
    return tuple(-v for v in _oriented(entry["metrics"], self.objectives)), self._arch_key(entry)

  def add(self, entry: Mapping[str, Any]) -> bool:
    """Adds entry if no kept one dominates it (dropping those it dominates); True if added."""
    if not isinstance(entry, Mapping) or "arch" not in entry or "metrics" not in entry:
      raise ValueError(f"an archive entry is a dict with 'arch' and 'metrics', got {entry!r}")
    _oriented(entry["metrics"], self.objectives)  # names a missing or NaN objective first
    try:
      entry = json.loads(json.dumps({**entry, "metrics": metrics_lib.to_python(entry["metrics"])},
                                    allow_nan=False))
    except (TypeError, ValueError) as error:
      raise ValueError(f"archive entries must be JSON-able (give the arch as "
                       f"search_space.to_dict(arch)): {error}") from None
    arch = self._arch_key(entry)
    if any(self._arch_key(kept) == arch for kept in self._front):
      return False
    if any(dominates(kept["metrics"], entry["metrics"], self.objectives)
           for kept in self._front):
      return False
    self._front = [kept for kept in self._front
                   if not dominates(entry["metrics"], kept["metrics"], self.objectives)]
    self._front.append(entry)
    self._front.sort(key=self._sort_key)
    return True

  @property
  def front(self) -> list[dict]:
    return list(self._front)

  def __len__(self) -> int:
    return len(self._front)

  def state(self) -> dict:
    """JSON-able state: the objectives and the front."""
    return {"objectives": [list(o) for o in self.objectives], "front": self.front}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> ParetoArchive:
    """Inverse of `state` (also after a JSON round trip)."""
    if set(state) != {"objectives", "front"}:
      raise ValueError(f"a Pareto archive state has the keys ['front', 'objectives'], got "
                       f"{sorted(state)}")
    archive = cls([tuple(o) for o in state["objectives"]])
    for entry in state["front"]:
      archive.add(entry)
    return archive
