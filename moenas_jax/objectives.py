"""Training objectives, one module for every training loop (supernet, proxy, final, baselines).

An objective turns per-example cross-entropies `ce [..., B]` (leading axes: e.g. the K
candidates of a supernet step) into one scalar loss, using each example's *unit*: its group
g, or its (class, group) cell `label · G + g` with `units="cell"`.

- `erm`: the mean cross-entropy (empirical risk minimisation).
- `group_balanced`: importance weights w_u = n / (U · n_u) from the training split's unit
  counts n_u (U non-empty units), so every unit weighs as much as under a balanced split:
  loss = mean(w_u(i) · ce_i). A unit with no training example cannot be balanced: refused,
  naming it.
- `group_dro`: online group DRO (Sagawa et al. 2020, Algorithm 1). Unit weights q (uniform
  over the non-empty units at the start) are updated each step with the batch's mean loss
  per unit, q_u ← q_u · exp(η · ℓ_u) (units absent from the batch keep theirs), renormalised,
  and loss = Σ_u q_u · ℓ_u, averaged over the leading axes. q is the objective's state; the
  trainers carry it next to the optimizer state, so it is checkpointed and resumed with it.

`Objective.loss(ce, batch, state) -> (loss, new_state)` is pure JAX (the batch's "label" and
"group" give the units; ERM reads neither); the routing aux loss is added by the caller.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

NAMES = ("erm", "group_balanced", "group_dro")
UNITS = ("group", "cell")


@dataclasses.dataclass(frozen=True)
class ObjectiveSettings:
  """Which objective, over which units, and the DRO step size η (`group_dro` only)."""

  name: str = "erm"
  units: str = "group"
  dro_step_size: float = 0.01

  def __post_init__(self):
    if self.name not in NAMES:
      raise ValueError(f"unknown objective {self.name!r}; use one of {', '.join(NAMES)}")
    if self.units not in UNITS:
      raise ValueError(f"objective units {self.units!r}: use 'group' (sensitive groups) or "
                       f"'cell' ((class, group) cells)")
    if not (isinstance(self.dro_step_size, (int, float)) and self.dro_step_size > 0):
      raise ValueError(f"dro_step_size={self.dro_step_size!r} must be a positive number (the "
                       f"step of group DRO's weight update; e.g. 0.01)")

  @classmethod
  def from_config(cls, config: Any) -> ObjectiveSettings:
    """From a mapping or ConfigDict with some of the fields; unknown names are refused."""
    values = dict(config.items())
    names = [field.name for field in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
      raise ValueError(f"unknown objective settings {unknown}; the settings are {names}")
    return cls(**values)


class Objective:
  """The loss of `settings` over the units counted in `unit_counts` [U] (training split)."""

  def __init__(self, settings: ObjectiveSettings, num_classes: int, num_groups: int,
               unit_counts: Sequence[int], unit_names: Sequence[str] | None = None):
    self.settings, self.num_classes, self.num_groups = settings, num_classes, num_groups
    counts = np.asarray(unit_counts, np.float64)
    expected = num_groups * (num_classes if settings.units == "cell" else 1)
    if counts.shape != (expected,):
      raise ValueError(f"unit_counts has shape {counts.shape}, expected ({expected},)")
    present = counts > 0
    if settings.name == "group_balanced" and not present.all():
      missing = [unit_names[i] if unit_names else str(i) for i in np.flatnonzero(~present)]
      raise ValueError(f"objective group_balanced: {settings.units}(s) {missing} have no "
                       f"training example, so they cannot be reweighted; use objective "
                       f"group_dro or erm, units 'group' instead of 'cell', or data that "
                       f"holds them")
    self.weights = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)),
                            0.0).astype(np.float32)
    self._initial = (present / present.sum()).astype(np.float32)

  @classmethod
  def erm(cls) -> Objective:
    """Plain cross-entropy, needing no unit counts."""
    return cls(ObjectiveSettings(), 1, 1, [1])

  @classmethod
  def from_examples(cls, settings: ObjectiveSettings, examples: dict[str, np.ndarray],
                    num_classes: int, group_names: Sequence[str],
                    class_names: Sequence[str] | None = None) -> Objective:
    """The objective with the unit counts of a training split (`pipeline.read_split`)."""
    num_groups = len(group_names)
    units = _units(examples["label"], examples["group"], num_groups, settings.units)
    size = num_groups * (num_classes if settings.units == "cell" else 1)
    names = (list(group_names) if settings.units == "group" else
             [f"({(class_names or range(num_classes))[n]}, {group})"
              for n in range(num_classes) for group in group_names])
    return cls(settings, num_classes, num_groups, np.bincount(units, minlength=size), names)

  def init(self) -> jax.Array:
    """The objective's state: the unit weights q [U] (used by `group_dro` only)."""
    return jnp.asarray(self._initial)

  def loss(self, ce: jax.Array, batch: dict[str, jax.Array],
           state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(scalar loss, new state) from cross-entropies [..., B] of the batch's examples."""
    name = self.settings.name
    if name == "erm":
      return ce.mean(), state
    units = _units(batch["label"], batch["group"], self.num_groups, self.settings.units)
    if name == "group_balanced":
      return (ce * jnp.asarray(self.weights)[units]).mean(), state
    one_hot = jax.nn.one_hot(units, state.shape[-1], dtype=ce.dtype)  # [B, U]
    count = one_hot.sum(0)
    unit_loss = (ce @ one_hot) / jnp.maximum(count, 1.0)  # [..., U]
    seen = jax.lax.stop_gradient(unit_loss.reshape(-1, state.shape[-1]).mean(0))
    q = state * jnp.exp(self.settings.dro_step_size * jnp.where(count > 0, seen, 0.0))
    q = q / q.sum()
    return (unit_loss * q).sum(-1).mean(), q


def _units(labels: Any, groups: Any, num_groups: int, units: str) -> Any:
  return labels * num_groups + groups if units == "cell" else groups
