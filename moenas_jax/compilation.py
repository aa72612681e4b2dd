"""Counting XLA compilations, to check the "one compile per stage" promise."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@dataclasses.dataclass
class Compilations:
  """Names of the functions XLA compiled inside `count_compilations()`, in order."""

  names: list[str] = dataclasses.field(default_factory=list)

  @property
  def count(self) -> int:
    return len(self.names)

  def of(self, fun_name: str) -> int:
    """Compilations of the jitted function with this `__name__` (JAX names it jit(name))."""
    return sum(name in (fun_name, f"jit({fun_name})") for name in self.names)


@contextlib.contextmanager
def count_compilations() -> Iterator[Compilations]:
  """Records every XLA backend compilation within the block; cache hits do not count."""
  seen = Compilations()

  def listener(event: str, duration_secs: float, **kwargs) -> None:
    del duration_secs
    if event == _BACKEND_COMPILE_EVENT:
      seen.names.append(str(kwargs.get("fun_name", "?")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
