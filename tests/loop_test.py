"""Tests of the one training loop: resume anywhere equals an uninterrupted run, checks, history."""

import numpy as np
import pytest

from moenas_jax import loop
from moenas_jax.checkpoint import Checkpointer

# 7 steps, epochs of 3 batches (the last epoch holds 1), checkpoints every 2 steps. Batch b of
# epoch e is the number 10·e + b; a step adds it to the carry and logs it as its loss.
STEPS, PER_EPOCH = 7, 3


def _batches(epoch):
  return [np.float32(10 * epoch + b) for b in range(PER_EPOCH)]


def _step(carry, batch, t):
  return carry + batch, {"loss": np.float32(0.1) * batch, "grad_norm": np.float32(1.0)}


def _fit(directory, log=None, run=None, step=_step):
  with Checkpointer(directory) as checkpointer:
    return loop.fit(step, np.zeros(2, np.float32), batches=_batches, steps_per_epoch=PER_EPOCH,
                    total_steps=STEPS, checkpointer=checkpointer, checkpoint_every=2,
                    run=run or {"seed": 0}, name="toy", log=log, log_every=1), \
        checkpointer.steps()


class Stop(Exception):
  pass


def test_an_uninterrupted_run_gives_the_hand_derived_carry_and_history(tmp_path):
  lines = []
  fitted, steps = _fit(tmp_path, lines.append)
  # Batches 0, 1, 2 | 10, 11, 12 | 20: the carry is their sum, 56, in both entries.
  np.testing.assert_array_equal(fitted.carry, [56.0, 56.0])
  assert [h["epoch"] for h in fitted.history] == [1, 2, 3]
  np.testing.assert_allclose([h["loss"] for h in fitted.history], [0.1, 1.1, 2.0], rtol=1e-6)
  assert steps == [6, 7]  # every 2 steps and the last, the two newest kept
  assert [line.split(":")[0] for line in lines if "epoch" in line] == [
      "[toy] epoch 1/3", "[toy] epoch 2/3", "[toy] epoch 3/3"]
  assert len(fitted.step_logs) == STEPS


@pytest.mark.parametrize("stop_at", [2, 4, 5])  # steps with a progress line (not epoch ends)
def test_a_run_stopped_anywhere_resumes_to_the_same_carry_and_history(tmp_path, stop_at):
  expected, _ = _fit(tmp_path / "straight")

  def stop(line):
    if line.startswith(f"[toy] {stop_at}/"):  # a progress line: before that step's checkpoint
      raise Stop

  with pytest.raises(Stop):
    _fit(tmp_path / "resumed", stop)
  lines = []
  resumed, _ = _fit(tmp_path / "resumed", lines.append)
  done = 2 * ((stop_at - 1) // 2)  # the last checkpoint before the stop
  assert lines[0].startswith(f"[toy] resumed at step {done}/7") == (done > 0)
  np.testing.assert_array_equal(resumed.carry, expected.carry)
  assert resumed.history == expected.history  # exactly, mid-epoch resumes included
  assert len(resumed.step_logs) == STEPS - done


def test_a_finished_run_returns_its_result_and_another_run_is_refused(tmp_path):
  expected, _ = _fit(tmp_path)
  again, _ = _fit(tmp_path)
  np.testing.assert_array_equal(again.carry, expected.carry)
  assert again.history == expected.history and again.step_logs == []
  with pytest.raises(ValueError, match="seed: 0 -> 1"):
    _fit(tmp_path, run={"seed": 1})


def test_a_non_finite_loss_stops_before_its_checkpoint_naming_the_step(tmp_path):
  def poisoned(carry, batch, t):
    carry, logs = _step(carry, batch, t)
    return carry, {**logs, "loss": np.float32("nan") if t == 4 else logs["loss"]}

  with pytest.raises(FloatingPointError, match=r"loss is nan at step 4\b"):
    _fit(tmp_path, step=poisoned)
  with Checkpointer(tmp_path) as checkpointer:
    assert checkpointer.steps() == [2, 4]  # step index 4 is the fifth step: never saved


def test_another_length_or_epochs_of_other_sizes_are_refused(tmp_path):
  _fit(tmp_path / "a")
  with Checkpointer(tmp_path / "a") as checkpointer, pytest.raises(
      ValueError, match="total_steps: 7 -> 9"):
    loop.fit(_step, np.zeros(2, np.float32), batches=_batches, steps_per_epoch=PER_EPOCH,
             total_steps=9, checkpointer=checkpointer, run={"seed": 0})
  with pytest.raises(ValueError, match=r"batches\(0\) gave 2 batches, not steps_per_epoch=3"):
    loop.fit(_step, np.zeros(2, np.float32), batches=lambda epoch: _batches(epoch)[:2],
             steps_per_epoch=PER_EPOCH, total_steps=STEPS)
