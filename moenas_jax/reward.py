"""The search's objectives in one table: the scalar reward, the hard budgets, the Pareto archive.

A `RewardSpec` is a table of `Term(metric, weight, direction, budget)`, one entry per metric
(`METRICS` lists the known ones, with which way is better and their range); everything
derives from it:

- **reward** of a feasible candidate: Σ over the terms of + weight · value ("max" terms) or
  − weight · value ("min" terms). A metric with a hinge counts max(value, hinge): the
  generalization gap counts as max(gap, 0), so only overfitting is penalised. A cost (params,
  MACs: unbounded) counts as value / budget, so a weighted cost needs a budget. A term of
  weight 0 needs no metric for the reward.
- **budgets**: a term with a budget is a hard constraint, feasible when value ≤ budget (only
  metrics to minimise take one; costs compare as exact integers). Each term's value lies in
  the bounds of `METRICS` (a cost within budget: value / budget ≤ 1), so a feasible reward is
  at least the sum of the terms' worst values, and an infeasible candidate gets

      reward = floor − excess,  floor = that least feasible reward − 1,
      excess = Σ_budgets max(value / budget − 1, 0)

  which ranks it below every feasible one; among infeasible ones the smaller excess ranks higher.
- **Pareto objectives**: every term of the table, in table order (a term of weight 0 with no
  budget is an objective only), so a budgeted term is a constraint and an objective.
  `ParetoArchive(spec)` keeps the non-dominated *feasible* candidates: `add` refuses an entry
  over any budget of its spec. That is the one place where infeasible candidates are filtered.

`spec_from_config(config.reward)` is the search's table, from the config section's fields
disparity, robustness, gap, worst_cell, param_budget, mac_budget, latency_budget (and optional
`terms`):

    reward = accuracy − λ_disp · disparity + λ_rob · robustness − λ_gap · max(gap, 0)
             + λ_cell · worst_cell_accuracy

over the objectives accuracy ↑, disparity ↓, robustness ↑, generalization_gap ↓, worst cell
accuracy ↑ (only when λ_cell > 0), params ↓ (budget param_budget), MACs ↓ (only when mac_budget
is set), latency_ms ↓ (budget latency_budget; when it is set or `latency_objective`: a search
with a latency table). Its floor is −(1 + λ_disp + λ_gap).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from moenas_jax import metrics as metrics_lib
from moenas_jax.search_space import SearchSpace

if TYPE_CHECKING:
  from moenas_jax.latency import LatencyTable

DIRECTIONS = ("max", "min")


@dataclasses.dataclass(frozen=True)
class Metric:
  """What the table knows of a metric: which way is better, its range, its hinge.

  bounds: (least, greatest) value; None for a cost (≥ 0, unbounded: params, MACs). hinge: the
  reward counts max(value, hinge) (None: the value itself).
  """

  direction: str
  bounds: tuple[float, float] | None = (0.0, 1.0)
  hinge: float | None = None


# The metrics a table may hold (names of metrics.py, evaluate.py, SearchSpace costs and the
# latency table's `latency_ms`, moenas_jax/latency.py). A new metric is one entry here.
METRICS: dict[str, Metric] = {
    "accuracy": Metric("max"),
    "worst_group_accuracy": Metric("max"),
    "worst_cell_accuracy": Metric("max"),
    "robustness": Metric("max"),
    "adversarial_accuracy": Metric("max"),
    "disparity": Metric("min"),
    "equalized_odds_difference": Metric("min"),
    "generalization_gap": Metric("min", (-1.0, 1.0), hinge=0.0),
    "params": Metric("min", None),
    "macs": Metric("min", None),
    "latency_ms": Metric("min", None),
}


def _is_number(value: Any) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))


@dataclasses.dataclass(frozen=True)
class Term:
  """One entry of the table: a metric, its reward weight (≥ 0), its direction, its budget.

  direction None takes the metric's own (`METRICS`); a budget (> 0, or None) makes the term a
  hard constraint value ≤ budget.
  """

  metric: str
  weight: float = 0.0
  direction: str | None = None
  budget: float | None = None

  def __post_init__(self):
    if self.metric not in METRICS:
      raise ValueError(f"unknown metric {self.metric!r} in the reward table; known: "
                       f"{', '.join(METRICS)} (add a new one to reward.METRICS)")
    known = METRICS[self.metric]
    if not (_is_number(self.weight) and self.weight >= 0):
      raise ValueError(f"{self.metric}: weight={self.weight!r} must be a finite number >= 0 "
                       f"(the infeasible floor assumes non-negative weights); use 0 to keep it "
                       f"as a Pareto objective only")
    object.__setattr__(self, "weight", float(self.weight))
    if self.direction is None:
      object.__setattr__(self, "direction", known.direction)
    if self.direction not in DIRECTIONS:
      raise ValueError(f"{self.metric}: direction={self.direction!r} must be 'max' (larger is "
                       f"better) or 'min'; leave it out to use {known.direction!r}")
    if self.direction != known.direction:
      better = "larger" if known.direction == "max" else "smaller"
      raise ValueError(f"{self.metric}: direction={self.direction!r}, but a {better} "
                       f"{self.metric} is better; use {known.direction!r} or leave it out")
    if self.budget is not None:
      if not (_is_number(self.budget) and self.budget > 0):
        raise ValueError(f"{self.metric}: budget={self.budget!r} must be a positive number, "
                         f"or None for no budget")
      if self.direction == "max":
        raise ValueError(f"{self.metric}: budget={self.budget!r}, but a budget caps a metric "
                         f"to minimise and {self.metric} is maximised; remove the budget")
    if known.bounds is None and self.weight > 0 and self.budget is None:
      raise ValueError(f"{self.metric}: weight={self.weight} needs a budget: a cost enters the "
                       f"reward as weight · value / budget; set a budget or weight 0")

  @property
  def least(self) -> float:
    """The least this term adds to the reward of a feasible candidate."""
    known = METRICS[self.metric]
    if known.bounds is None:  # a cost: value / budget ≤ 1 when feasible
      return -self.weight
    low, high = known.bounds
    if known.hinge is not None:
      low, high = max(low, known.hinge), max(high, known.hinge)
    return self.weight * low if self.direction == "max" else -self.weight * high


_ENTRY_KEYS = ("weight", "direction", "budget")


def _terms(table: Mapping[str, Any]) -> tuple[Term, ...]:
  """The terms of {metric: {weight, direction, budget}}, in the mapping's order."""
  terms = []
  for metric, entry in table.items():
    if not hasattr(entry, "items"):
      raise ValueError(f"reward table entry {metric!r} must be a mapping with some of "
                       f"{', '.join(_ENTRY_KEYS)}, got {entry!r}")
    entry = dict(entry.items())
    unknown = sorted(set(entry) - set(_ENTRY_KEYS))
    if unknown:
      raise ValueError(f"reward table entry {metric!r} has unknown keys {unknown}; an entry "
                       f"has {', '.join(_ENTRY_KEYS)}")
    terms.append(Term(metric, **entry))
  return tuple(terms)


def _xp(*values: Any):
  """jax.numpy if any value is a JAX array (or tracer), else NumPy."""
  return jnp if any(isinstance(v, jax.Array) for v in values) else np


def _host_or_jax(value: Any) -> Any:
  """A JAX array as is; anything else as a NumPy array (integers as int64: MACs fit)."""
  if isinstance(value, jax.Array):
    return value
  value = np.asarray(value)
  return value.astype(np.int64) if value.dtype.kind in "biu" else value


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """The table of objectives and budgets (see the module docstring); terms in table order."""

  terms: tuple[Term, ...]

  def __post_init__(self):
    terms = tuple(self.terms)
    object.__setattr__(self, "terms", terms)
    bad = [term for term in terms if not isinstance(term, Term)]
    if bad:
      raise ValueError(f"RewardSpec takes Term entries, got {bad!r}; build it with "
                       f"RewardSpec.from_mapping({{metric: {{weight, direction, budget}}}})")
    names = [term.metric for term in terms]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
      raise ValueError(f"the reward table lists {repeated} more than once; give one entry per "
                       f"metric")
    if not any(term.weight > 0 for term in terms):
      raise ValueError(f"no term of the reward table {names} has a weight > 0; give at least "
                       f"one (e.g. accuracy: weight 1)")

  @classmethod
  def from_mapping(cls, table: Mapping[str, Any]) -> RewardSpec:
    """From {metric: {weight, direction, budget}} (each key optional; a ConfigDict works)."""
    return cls(_terms(table))

  def to_dict(self) -> dict[str, dict[str, Any]]:
    """The table as {metric: {weight, direction, budget}}, JSON-able; `from_mapping` inverts."""
    return {term.metric: {"weight": term.weight, "direction": term.direction,
                          "budget": term.budget} for term in self.terms}

  @property
  def objectives(self) -> tuple[tuple[str, str], ...]:
    """The Pareto objectives: (metric, direction) of every term, in table order."""
    return tuple((term.metric, term.direction) for term in self.terms)

  @property
  def budgets(self) -> tuple[Term, ...]:
    """The terms with a budget: the hard constraints."""
    return tuple(term for term in self.terms if term.budget is not None)

  @property
  def infeasible_floor(self) -> float:
    """1 below the least feasible reward: where infeasible rewards start."""
    return sum(term.least for term in self.terms) - 1.0

  @staticmethod
  def _value(metrics: Mapping[str, Any], term: Term, role: str, fix: str) -> Any:
    if term.metric not in metrics:
      raise ValueError(f"the {role} needs metrics[{term.metric!r}]; compute it or {fix}")
    return _host_or_jax(metrics[term.metric])

  def _shape(self, metrics: Mapping[str, Any]) -> tuple[int, ...]:
    return np.broadcast_shapes(*(np.shape(metrics[term.metric]) for term in self.terms
                                 if term.metric in metrics))

  def scalar_reward(self, metrics: Mapping[str, Any]) -> Any:
    """The reward without the budgets, elementwise over arrays [P] (NumPy or JAX)."""
    weighted = [term for term in self.terms if term.weight]
    values = [self._value(metrics, term, f"reward (its weight is {term.weight:g})",
                          "set its weight to 0") for term in weighted]
    xp = _xp(*values)
    total = xp.zeros(self._shape(metrics))
    for term, value in zip(weighted, values):
      known = METRICS[term.metric]
      value = xp.asarray(value)
      if known.hinge is not None:
        value = xp.maximum(value, known.hinge)
      if known.bounds is None:
        value = value / term.budget
      total = total + (term.weight if term.direction == "max" else -term.weight) * value
    return total

  def _budget_values(self, metrics: Mapping[str, Any]) -> list[tuple[Term, Any]]:
    return [(term, self._value(metrics, term, f"budget {term.metric} <= {term.budget:,}",
                               "remove the budget")) for term in self.budgets]

  def budget_excess(self, metrics: Mapping[str, Any]) -> Any:
    """Σ over the budgets of max(value / budget − 1, 0) per candidate; 0 when within."""
    pairs = self._budget_values(metrics)
    xp = _xp(*(value for _, value in pairs))
    excess = xp.zeros(self._shape(metrics))
    for term, value in pairs:
      excess = excess + xp.maximum(value / term.budget - 1.0, 0.0)
    return excess

  def within_budget(self, metrics: Mapping[str, Any]) -> Any:
    """value ≤ budget for every budget, per candidate (exact for integer costs)."""
    pairs = self._budget_values(metrics)
    xp = _xp(*(value for _, value in pairs))
    feasible = xp.ones(self._shape(metrics), bool)
    for term, value in pairs:
      feasible = feasible & (value <= term.budget)
    return feasible

  def reward(self, metrics: Mapping[str, Any]) -> Any:
    """The reward of the module docstring, budgets included, per candidate.

    metrics: arrays [P] (or scalars), NumPy or JAX, with every weighted or budgeted metric
    (costs such as `SearchSpace.params` / `.macs` as host integers); the result is JAX if any
    input is.
    """
    value = self.scalar_reward(metrics)
    if not self.budgets:
      return value
    feasible, excess = self.within_budget(metrics), self.budget_excess(metrics)
    return _xp(value, feasible, excess).where(feasible, value, self.infeasible_floor - excess)

  def check_budget(self, space: SearchSpace, latency_table: LatencyTable | None = None) -> None:
    """Refuses, before anything compiles, a params, MACs or latency budget no candidate can
    meet (`BudgetError`), and a latency term without a `latency_table`.

    The smallest candidate is `space.smallest()` (every gene at 1: one expert, top-1, and
    the narrowest width and depth 1 where searched): parameters grow with every expert
    count, width and depth and MACs also with every top-k (see
    `SearchSpace.params` and `SearchSpace.macs`). The fastest latency is the table's sum of
    per-block minima plus its constant (`LatencyTable.minimum_ms`).
    """
    if latency_table is None and "latency_ms" in {term.metric for term in self.terms}:
      raise BudgetError("latency_ms", "a latency_ms term needs a latency table; build one "
                        "with python -m benchmarks.latency --output=<file> on the target "
                        "device and give it (config.search.latency_table)")
    counts = {"params": (lambda: int(space.params(space.smallest())), "parameters", ","),
              "macs": (lambda: int(space.macs(space.smallest())), "MACs per image", ","),
              "latency_ms": (lambda: latency_table.minimum_ms(), "ms", ".4g")}
    for term in self.budgets:
      if term.metric not in counts:
        continue
      count, unit, spec = counts[term.metric]
      minimum = count()
      if term.budget < minimum:
        field = _CONFIG_FIELD_OF.get(term.metric)
        where = f" (config.reward.{field})" if field else ""
        smallest = ("fastest candidate (per block its fastest choice, plus the table's "
                    "constant)" if term.metric == "latency_ms" else "smallest candidate (every "
                    "gene at 1: one expert, top-1 in every layer)")
        raise BudgetError(term.metric, f"the {term.metric} budget {term.budget:{spec}} is "
                          f"below the {minimum:{spec}} {unit} of the {smallest}, so no "
                          f"candidate fits; raise it{where} to at least {minimum:{spec}} or "
                          f"search a smaller supernet")


class BudgetError(ValueError):
  """A budget no candidate meets, or one that cannot be checked; `metric` names its term."""

  def __init__(self, metric: str, message: str):
    super().__init__(message)
    self.metric = metric


# The config section `config.reward`: its fields, their defaults and the metric of each.
#
# disparity 1.0: a point of disparity between groups costs as much as a point of accuracy, the
# trade the search is built to make. robustness 0.5: lighting accuracy largely moves with clean
# accuracy, so a full weight would count accuracy about twice. gap 0.5: only overfitting (a
# positive gap) is penalised, at half weight because gaps measured with shared supernet weights
# are noisy. worst_cell 0.0: off by default because a small (class, group) cell is noisy (one
# example can move it by 10 points); turn it on for symmetric skews such as CIFAR-10S, where
# group accuracies stay equal while minority cells collapse. terms: further entries
# {metric: {weight, direction, budget}} for metrics the named fields do not cover (e.g.
# {"adversarial_accuracy": {"weight": 0.3}}).
CONFIG_DEFAULTS: dict[str, Any] = {"disparity": 1.0, "robustness": 0.5, "gap": 0.5,
                                   "worst_cell": 0.0, "param_budget": None, "mac_budget": None,
                                   "latency_budget": None, "terms": {}}
_CONFIG_METRIC = {"disparity": "disparity", "robustness": "robustness",
                  "gap": "generalization_gap", "worst_cell": "worst_cell_accuracy",
                  "param_budget": "params", "mac_budget": "macs",
                  "latency_budget": "latency_ms"}
_CONFIG_FIELD_OF = {metric: field for field, metric in _CONFIG_METRIC.items()}


def spec_from_config(config: Any = None, *, latency_objective: bool = False) -> RewardSpec:
  """The search's table from `config.reward` (a ConfigDict or mapping with some of the fields
  of `CONFIG_DEFAULTS`; unknown names are refused): the module docstring's reward.

  Accuracy has weight 1. Disparity, robustness, the gap and params are always objectives (a
  weight of 0 keeps them as objectives only); worst cell accuracy joins when its weight is
  > 0, MACs when mac_budget is set, latency_ms when latency_budget is set or
  `latency_objective` (the search has a latency table).
  """
  given = {} if config is None else dict(config.items())
  unknown = sorted(set(given) - set(CONFIG_DEFAULTS))
  if unknown:
    raise ValueError(f"unknown config.reward fields {unknown}; the fields are "
                     f"{list(CONFIG_DEFAULTS)}")
  values = {**CONFIG_DEFAULTS, **given}

  def term(field: str, **entry: Any) -> Term:
    try:
      return Term(_CONFIG_METRIC[field], **entry)
    except ValueError as error:
      raise ValueError(f"config.reward.{field}={values[field]!r}: {error}") from None

  terms = [Term("accuracy", 1.0),
           term("disparity", weight=values["disparity"]),
           term("robustness", weight=values["robustness"]),
           term("gap", weight=values["gap"])]
  worst_cell = term("worst_cell", weight=values["worst_cell"])
  if worst_cell.weight > 0:
    terms.append(worst_cell)
  terms.append(term("param_budget", budget=values["param_budget"]))
  if values["mac_budget"] is not None:
    terms.append(term("mac_budget", budget=values["mac_budget"]))
  if values["latency_budget"] is not None or latency_objective:
    terms.append(term("latency_budget", budget=values["latency_budget"]))
  try:
    extra = _terms(values["terms"])
  except ValueError as error:
    raise ValueError(f"config.reward.terms: {error}") from None
  clash = sorted({term.metric for term in extra} & {"accuracy", *_CONFIG_METRIC.values()})
  if clash:
    raise ValueError(f"config.reward.terms lists {clash}, which the named fields of "
                     f"config.reward set ({', '.join(_CONFIG_METRIC)}; accuracy has weight 1); "
                     f"set those fields instead")
  return RewardSpec(tuple(terms) + extra)


# The search's default table: the defaults of `CONFIG_DEFAULTS`, no budget.
DEFAULT_SPEC = spec_from_config()


def _oriented(metrics: Mapping[str, Any], objectives: Sequence[tuple[str, str]]
              ) -> tuple[float, ...]:
  """The objective values with "min" ones negated, so larger is better everywhere."""
  missing = [name for name, _ in objectives if name not in metrics]
  if missing:
    raise ValueError(f"metrics lack the Pareto objectives {missing}; give them or build the "
                     f"archive with another RewardSpec")
  values = []
  for name, direction in objectives:
    value = float(np.asarray(metrics[name]))
    if not math.isfinite(value):
      raise ValueError(f"objective {name}={value} is not a finite number; fix its evaluation")
    values.append(value if direction == "max" else -value)
  return tuple(values)


def dominates(a: Mapping[str, Any], b: Mapping[str, Any],
              objectives: Sequence[tuple[str, str]] = DEFAULT_SPEC.objectives) -> bool:
  """Whether metrics a are at least as good as b in every objective and better in one."""
  x, y = _oriented(a, objectives), _oriented(b, objectives)
  return all(p >= q for p, q in zip(x, y)) and any(p > q for p, q in zip(x, y))


class ParetoArchive:
  """The non-dominated feasible candidates seen so far, over the objectives of `spec`.

  Entries are dicts with a JSON-able `arch` (e.g. `search_space.to_dict(arch)`) and a
  `metrics` dict holding the objectives; other JSON-able keys are kept. An entry over any
  budget of the spec is refused. An architecture is kept once (its first evaluation);
  different architectures with equal objectives are all kept. `front` is ordered best first by
  the objectives in table order, then by the arch's JSON, so it does not depend on the order
  of `add` calls.
  """

  def __init__(self, spec: RewardSpec = DEFAULT_SPEC):
    if not isinstance(spec, RewardSpec):
      raise ValueError(f"ParetoArchive takes a RewardSpec (reward.spec_from_config(config."
                       f"reward) or RewardSpec.from_mapping(...)), got {spec!r}")
    self.spec = spec
    self.objectives = spec.objectives
    self._front: list[dict] = []

  @staticmethod
  def _arch_key(entry: Mapping[str, Any]) -> str:
    return json.dumps(entry["arch"], sort_keys=True)

  def _sort_key(self, entry: Mapping[str, Any]) -> tuple:
    return tuple(-v for v in _oriented(entry["metrics"], self.objectives)), self._arch_key(entry)

  def add(self, entry: Mapping[str, Any]) -> bool:
    """Adds a feasible entry if no kept one dominates it (dropping those it dominates); True
    if added. An infeasible entry (over a budget) is refused: False."""
    if not isinstance(entry, Mapping) or "arch" not in entry or "metrics" not in entry:
      raise ValueError(f"an archive entry is a dict with 'arch' and 'metrics', got {entry!r}")
    _oriented(entry["metrics"], self.objectives)  # names a missing or NaN objective first
    try:
      entry = json.loads(json.dumps({**entry, "metrics": metrics_lib.to_python(entry["metrics"])},
                                    allow_nan=False))
    except (TypeError, ValueError) as error:
      raise ValueError(f"archive entries must be JSON-able (give the arch as "
                       f"search_space.to_dict(arch)): {error}") from None
    if not bool(self.spec.within_budget(entry["metrics"])):
      return False
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
    """JSON-able state: the table (`RewardSpec.to_dict`) and the front."""
    return {"spec": self.spec.to_dict(), "front": self.front}

  @classmethod
  def from_state(cls, state: Mapping[str, Any]) -> ParetoArchive:
    """Inverse of `state` (also after a JSON round trip)."""
    if set(state) != {"spec", "front"}:
      raise ValueError(f"a Pareto archive state has the keys ['front', 'spec'], got "
                       f"{sorted(state)}")
    archive = cls(RewardSpec.from_mapping(state["spec"]))
    for entry in state["front"]:
      archive.add(entry)
    return archive


def hypervolume(points: Any, reference: Any) -> float:
  """The volume dominated by `points` [n, 3] (every objective minimised) up to `reference`
  [3], exactly: slices along the first objective, each the 2D staircase of the points at or
  below it. Points not below the reference in every objective add nothing."""
  points, reference = np.asarray(points, np.float64), np.asarray(reference, np.float64)
  if points.ndim != 2 or points.shape[1:] != (3,) or reference.shape != (3,):
    raise ValueError(f"hypervolume takes points [n, 3] and a reference [3], got "
                     f"{points.shape} and {reference.shape}")
  points = points[(points < reference).all(1)]
  points = points[np.argsort(points[:, 0], kind="stable")]
  volume = 0.0
  for i in range(len(points)):
    right = points[i + 1, 0] if i + 1 < len(points) else reference[0]
    below = points[:i + 1, 1:][np.argsort(points[:i + 1, 1], kind="stable")]
    area, lowest = 0.0, reference[2]
    for j, (y, z) in enumerate(below):
      lowest = min(lowest, z)
      area += ((below[j + 1, 0] if j + 1 < len(below) else reference[1]) - y) * (
          reference[2] - lowest)
    volume += (right - points[i, 0]) * area
  return float(volume)
