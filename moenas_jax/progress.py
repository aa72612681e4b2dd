"""Progress lines with rate and ETA, for every stage's loop."""

from __future__ import annotations

import time
from collections.abc import Callable


class Progress:
  """`progress(done, extra)` logs `[stage] done/total (pct%), ETA s · extra`."""

  def __init__(self, stage: str, total: int, log: Callable[[str], None],
               start: int | None = 0):
    """`start`: where this invocation began (None: one before the first call's `done`)."""
    self.stage, self.total, self.log, self.start = stage, total, log, start
    self.began = time.perf_counter()

  def __call__(self, done: int, extra: str = "") -> None:
    if self.start is None:
      self.start = done - 1
    seconds = time.perf_counter() - self.began
    rate = (done - self.start) / seconds if seconds > 0 and done > self.start else 0.0
    eta = f", ETA {(self.total - done) / rate:.0f} s" if rate else ""
    self.log(f"[{self.stage}] {done}/{self.total} ({100 * done / self.total:.0f}%)"
             f"{eta}{' · ' + extra if extra else ''}")
