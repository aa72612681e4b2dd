"""Tests of the training objectives with hand-derived values (no model)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moenas_jax.objectives import Objective, ObjectiveSettings


def _objective(name, counts=(3, 1), units="group", step=0.5, num_classes=1):
  return Objective(ObjectiveSettings(name=name, units=units, dro_step_size=step), num_classes,
                   2, counts, ["light", "dark"] if units == "group" else None)


def _batch(groups, labels=None):
  groups = jnp.asarray(groups)
  return {"group": groups, "label": jnp.zeros_like(groups) if labels is None
          else jnp.asarray(labels)}


def test_erm_is_the_mean_cross_entropy():
  objective = Objective.erm()
  loss, state = objective.loss(jnp.array([1.0, 2.0, 3.0, 6.0]), {}, objective.init())
  np.testing.assert_allclose(loss, 3.0)
  np.testing.assert_array_equal(state, objective.init())


def test_group_balanced_weights_each_group_as_a_balanced_split_would():
  # Counts 3 and 1: w = 4 / (2 · 3) = 2/3 and 4 / (2 · 1) = 2.
  objective = _objective("group_balanced")
  np.testing.assert_allclose(objective.weights, [2 / 3, 2.0], rtol=1e-6)
  # (2/3 · (1 + 2 + 3) + 2 · 4) / 4 = 3.
  loss, _ = objective.loss(jnp.array([1.0, 2.0, 3.0, 4.0]), _batch([0, 0, 0, 1]),
                           objective.init())
  np.testing.assert_allclose(loss, 3.0, rtol=1e-6)


def test_group_balanced_over_cells_names_an_empty_cell():
  counts = {"label": np.array([0, 0, 1, 1, 1]), "group": np.array([0, 1, 0, 0, 0])}
  with pytest.raises(ValueError, match=r"cell\(s\) \['\(coat, dark\)'\] have no training"):
    Objective.from_examples(ObjectiveSettings("group_balanced", units="cell"), counts, 2,
                            ["light", "dark"], ["shirt", "coat"])
  with pytest.raises(ValueError, match=r"group\(s\) \['dark'\] have no training example"):
    Objective.from_examples(ObjectiveSettings("group_balanced"),
                            {"label": np.zeros(3, int), "group": np.zeros(3, int)}, 2,
                            ["light", "dark"])
  # Cells (label · 2 + group): counts [1, 1, 3, 0] are refused above; [1, 1, 2, 1] give
  # w = 5 / (4 · n).
  counts["group"] = np.array([0, 1, 0, 0, 1])
  balanced = Objective.from_examples(ObjectiveSettings("group_balanced", units="cell"), counts,
                                     2, ["light", "dark"])
  np.testing.assert_allclose(balanced.weights, [1.25, 1.25, 0.625, 1.25], rtol=1e-6)


def test_group_dro_moves_weight_to_the_worse_group():
  objective = _objective("group_dro")
  np.testing.assert_allclose(objective.init(), [0.5, 0.5])
  # Group losses 1 and 3, η = 0.5: q ∝ (e^0.5, e^1.5) = (1, e) / (1 + e); loss = q · (1, 3).
  loss, q = objective.loss(jnp.array([1.0, 3.0]), _batch([0, 1]), objective.init())
  e = math.e
  np.testing.assert_allclose(q, [1 / (1 + e), e / (1 + e)], rtol=1e-6)
  np.testing.assert_allclose(loss, (1 + 3 * e) / (1 + e), rtol=1e-6)
  # A group absent from the batch keeps its weight: q ∝ (0.5 e^{0.5 · 2}, 0.5).
  loss, q = objective.loss(jnp.array([1.0, 3.0]), _batch([0, 0]), objective.init())
  np.testing.assert_allclose(q, [e / (1 + e), 1 / (1 + e)], rtol=1e-6)
  np.testing.assert_allclose(loss, 2 * e / (1 + e), rtol=1e-6)
  # Leading axes (K candidates) share one update from their mean group losses (2, 2).
  loss, q = objective.loss(jnp.array([[1.0, 3.0], [3.0, 1.0]]), _batch([0, 1]),
                           objective.init())
  np.testing.assert_allclose(q, [0.5, 0.5], rtol=1e-6)
  np.testing.assert_allclose(loss, 2.0, rtol=1e-6)


def test_group_dro_gradient_flows_through_the_losses_not_the_weights():
  objective = _objective("group_dro")

  def loss(ce):
    return objective.loss(ce, _batch([0, 1, 1]), objective.init())[0]

  e = math.e
  q = np.array([1, e ** 1.5 / e ** 0.5]) / (1 + e)  # group losses 1 and (2 + 4) / 2 = 3
  gradient = jax.grad(loss)(jnp.array([1.0, 2.0, 4.0]))
  np.testing.assert_allclose(gradient, [q[0], q[1] / 2, q[1] / 2], rtol=1e-6)


def test_group_dro_starts_without_the_groups_absent_from_training():
  objective = _objective("group_dro", counts=(4, 0))
  np.testing.assert_allclose(objective.init(), [1.0, 0.0])


@pytest.mark.parametrize("settings, message", [
    (dict(name="focal"), "unknown objective 'focal'; use one of erm, group_balanced, group_dro"),
    (dict(name="group_dro", dro_step_size=0.0), r"dro_step_size=0.0 must be a positive number"),
    (dict(units="class"), r"objective units 'class': use 'group'"),
])
def test_bad_settings_are_named(settings, message):
  with pytest.raises(ValueError, match=message):
    ObjectiveSettings(**settings)
  with pytest.raises(ValueError, match=r"unknown objective settings \['step'\]"):
    ObjectiveSettings.from_config({"step": 1})
