"""The one training loop: supernet training, final training, fine-tuning and proxy tuning.

`fit(step, carry, batches=..., total_steps=...)` runs `carry, logs = step(carry, batch, t)`
for t = done..total_steps − 1 over `batches(epoch)` (each epoch `steps_per_epoch` batches, an
order fixed by the epoch), and keeps one resume scheme: with a `Checkpointer`, the carry is
saved every `checkpoint_every` steps and at the end (step number = steps done, meta =
{"step", "history", **run}); a later call continues from the latest one, skipping the
batches of the interrupted epoch it had done, so it ends bit for bit where an uninterrupted
run does. A checkpoint of another run (its `run` identity, with `total_steps` and
`steps_per_epoch`, differs) is refused, and so is an epoch of other than `steps_per_epoch`
batches.

Logs stay on the device until an epoch ends or a checkpoint is due; then every step's logs
are checked (`check`, default `check_finite`: a non-finite loss or gradient stops the run,
naming the step, before anything is saved) and each finished epoch adds the means of its
logs to the history. `log` gets `[name] t/T (pct), ETA · loss …` every `log_every` steps and
one line per epoch.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from moenas_jax import hosts
from moenas_jax.checkpoint import Checkpointer
from moenas_jax.progress import Progress


def check_finite(logs: dict[str, Any], step: int) -> None:
  """Stops training, naming the step, at a non-finite loss or gradient norm.

  Both poison the weights from this step on. The gradient matters on its own: a NaN input can
  leave the loss finite (XLA:CPU's max-based activations map NaN to 0 in the forward pass)
  while its gradient is NaN.
  """
  loss = float(logs["loss"])
  if not np.isfinite(loss):
    raise FloatingPointError(
        f"loss is {loss} at step {step}; lower the learning rate or raise the warmup "
        f"(the last good checkpoint is kept in the workdir)")
  if "grad_norm" in logs and not np.isfinite(float(logs["grad_norm"])):
    raise FloatingPointError(
        f"gradient norm is {float(logs['grad_norm'])} at step {step} (loss {loss}); check that "
        f"step's batch for NaN or infinite inputs, or lower the learning rate (the last good "
        f"checkpoint is kept in the workdir)")


@dataclasses.dataclass
class Fitted:
  """What `fit` returns: the final carry, the per-epoch history (of the whole run, resumed
  epochs included) and the host logs of the steps this call ran."""

  carry: Any
  history: list[dict[str, float]]
  step_logs: list[dict[str, np.ndarray]]


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype, sharding=getattr(
      v, "sharding", None)), tree)


def _means(logs: list[dict[str, Any]]) -> dict[str, float]:
  """Means in float64, so restored (JSON) and fresh (float32) logs give the same history."""
  return {name: float(np.mean(np.asarray([entry[name] for entry in logs], np.float64)))
          for name in logs[0]}


def _same_run(checkpointer: Checkpointer, run: dict[str, Any]) -> None:
  _, saved = checkpointer.restore()
  if not {"step", "history", "epoch_logs"} <= set(saved):
    raise ValueError(f"the checkpoint in {checkpointer.directory} was made by an older "
                     f"moenas_jax (its meta has {sorted(saved)}); use a new workdir")
  differences = [f"{name}: {saved.get(name)} -> {value}" for name, value in run.items()
                 if saved.get(name) != value]
  if differences:
    raise ValueError(f"the checkpoint in {checkpointer.directory} is of another training run "
                     f"({'; '.join(differences)}); use a new checkpoint directory, or the "
                     f"settings it was made with")


def fit(step: Callable[[Any, Any, int], tuple[Any, dict[str, Any]]], carry: Any, *,
        batches: Callable[[int], Iterable[Any]], steps_per_epoch: int, total_steps: int,
        checkpointer: Checkpointer | None = None, checkpoint_every: int | None = None,
        run: dict[str, Any] | None = None, name: str = "train",
        log: Callable[[str], Any] | None = None, log_every: int = 0,
        check: Callable[[dict[str, Any], int], None] | None = check_finite) -> Fitted:
  """Trains from the latest checkpoint (or `carry`) to `total_steps`; see the module doc.

  `checkpoint_every` defaults to once per epoch; `run` (JSON-able) identifies the run in
  the checkpoint's meta; `check=None` leaves the logs unchecked (the caller checks them).
  """
  if steps_per_epoch < 1 or total_steps < 0:
    raise ValueError(f"need steps_per_epoch >= 1 and total_steps >= 0, got {steps_per_epoch}, "
                     f"{total_steps}")
  run = {**(run or {}), "total_steps": total_steps, "steps_per_epoch": steps_per_epoch}
  log = log or (lambda line: None)
  every = checkpoint_every or steps_per_epoch
  done, history, epoch_host = 0, [], []
  if checkpointer is not None and checkpointer.latest_step() is not None:
    _same_run(checkpointer, run)
    carry, meta = checkpointer.restore(like=_abstract(carry))
    done, history, epoch_host = meta["step"], meta["history"], meta["epoch_logs"]
    log(f"[{name}] resumed at step {done}/{total_steps} (epoch {done / steps_per_epoch:g}) "
        f"from {checkpointer.directory}")
  progress = Progress(name, total_steps, log, start=done)
  epochs = -(-total_steps // steps_per_epoch)
  pending, fetched, ran, began = [], [], 0, time.perf_counter()
  epoch, skip = divmod(done, steps_per_epoch)
  t = done
  while t < total_steps:
    seen = 0
    for batch in batches(epoch):
      seen += 1
      if skip:
        skip -= 1
        continue
      carry, logs = step(carry, batch, t)
      pending.append(logs)
      t, ran = t + 1, ran + 1
      epoch_done = t % steps_per_epoch == 0 or t == total_steps
      save = checkpointer is not None and (t % every == 0 or t == total_steps)
      show = log_every and t % log_every == 0 and not epoch_done
      if epoch_done or save or show:
        host = hosts.to_host(pending)
        for i, entry in enumerate(host):
          if check is not None:
            check(entry, t - len(host) + i)  # the step index, as in its key
        pending, epoch_host, fetched = [], epoch_host + host, fetched + host
      if show:
        progress(t, ", ".join(f"{key} {float(np.mean(value)):.3f}"
                              for key, value in epoch_host[-1].items() if key != "grad_norm"))
      if epoch_done:
        history.append({"epoch": epoch + 1, **_means(epoch_host)})
      if save:  # before the epoch's line, so a run stopped by what reads it has the epoch
        checkpointer.save(t, carry, {**run, "step": t, "history": history, "epoch_logs": [
            {key: np.asarray(value).tolist() for key, value in entry.items()}
            for entry in ([] if epoch_done else epoch_host)]})
      if epoch_done:
        log(f"[{name}] epoch {epoch + 1}/{epochs}: "
            + ", ".join(f"{key} {value:.4f}" for key, value in history[-1].items()
                        if key not in ("epoch", "grad_norm"))
            + f", {ran / (time.perf_counter() - began):.1f} steps/s")
        epoch_host, ran, began = [], 0, time.perf_counter()
      if t == total_steps:
        break
    if t < total_steps and seen != steps_per_epoch:
      raise ValueError(f"batches({epoch}) gave {seen} batches, not steps_per_epoch="
                       f"{steps_per_epoch}; give every epoch the same number of batches")
    epoch += 1
  return Fitted(carry, history, fetched)
