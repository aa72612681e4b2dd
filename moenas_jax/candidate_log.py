"""The candidate log, `workdir/results/candidates.jsonl`: one scored candidate per line.

`CandidateLog` appends to it during the search and survives kill -9; a resumed run cuts it
back to what its restored controller knows. `read` gives the records back. Every record has
`RECORD_KEYS`, and its `metrics` have `METRIC_KEYS` (None where not measured; NaN is stored
as None).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moenas_jax import hosts
from moenas_jax import metrics as metrics_lib

if TYPE_CHECKING:
  from typing import Self  # Python >= 3.11; annotations are not evaluated at run time

RECORD_KEYS = ("arch", "metrics", "reward", "cycle")
METRIC_KEYS = ("accuracy", "group_accuracy", "disparity", "worst_group_accuracy",
               "worst_cell_accuracy", "robustness", "generalization_gap", "params", "macs")


class CandidateLog:
  """Append-only `candidates.jsonl` that survives kill -9 and resumes.

  Each `append` writes whole lines, then flushes and fsyncs. Opening drops a torn last line
  (a write cut by a kill); with `expected`, the number of candidates the restored controller
  state knows, later lines (scored after that checkpoint, to be scored again) are cut off too.
  `records` holds the log's records as `read` gives them. In a multi-process run only process
  0 writes (`hosts.is_writer`); the others read the file when opening it and then keep their
  records in memory.
  """

  def __init__(self, path: str | os.PathLike, *, expected: int | None = None):
    if expected is not None and expected < 0:
      raise ValueError(f"expected must be a count of candidates (>= 0), got {expected}")
    self.path = Path(path)
    self._file = None
    if hosts.is_writer():
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.path.touch()
    records, ends = _scan(self.path) if self.path.exists() else ([], [])
    if expected is not None and expected > len(records):
      raise ValueError(
          f"{self.path} holds {len(records)} candidates but the restored search state knows "
          f"{expected}: the log was edited or lost. Restore the file, or start the search "
          "again in a new workdir.")
    self.records = records[:expected]
    if hosts.is_writer():
      end = ends[len(self.records) - 1] if self.records else 0
      if end != self.path.stat().st_size:
        os.truncate(self.path, end)
      self._file = open(self.path, "ab")  # noqa: SIM115 (kept open for appends; see close())
      os.fsync(self._file.fileno())

  def append(self, records: Iterable[Mapping[str, Any]]) -> None:
    """Appends scored candidates (see `RECORD_KEYS`, `METRIC_KEYS`) and makes them durable."""
    lines = []
    for record in records:
      _check_record(record)
      lines.append(json.dumps(metrics_lib.to_python(record), allow_nan=False) + "\n")
    if self._file is not None:
      self._file.write("".join(lines).encode())
      self._file.flush()
      os.fsync(self._file.fileno())
    self.records += [json.loads(line) for line in lines]

  def __len__(self) -> int:
    return len(self.records)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()

  def __enter__(self) -> Self:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read(path: str | os.PathLike) -> list[dict]:
  """The complete records of a candidate log (a torn last line is left out, the file kept)."""
  return _scan(Path(path))[0]


def _scan(path: Path) -> tuple[list[dict], list[int]]:
  """Complete records and the byte offset where each one's line ends.

  The last line is torn if it lacks its newline or does not parse; a bad line before it means
  the file was edited or damaged, which is an error.
  """
  data = path.read_bytes()
  records, ends, start = [], [], 0
  while (newline := data.find(b"\n", start)) != -1:
    line = data[start:newline]
    start = newline + 1
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as err:
      if data[start:].strip():
        number = data.count(b"\n", 0, newline) + 1
        raise ValueError(f"{path}, line {number}: not a JSON record ({err}); repair or delete "
                         "that line") from err
      break
    ends.append(start)
  return records, ends


def _check_record(record: Mapping[str, Any]) -> None:
  missing = [key for key in RECORD_KEYS if key not in record]
  missing += [f"metrics.{key}" for key in METRIC_KEYS
              if key not in (record.get("metrics") or {})]
  if missing:
    raise ValueError(f"candidate record lacks {missing}; every record needs {RECORD_KEYS} "
                     f"and metrics {METRIC_KEYS} (None where not measured): {dict(record)}")
