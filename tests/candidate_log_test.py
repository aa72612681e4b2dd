"""Tests of the candidate log: appends, reading back, resume, torn and damaged lines."""

import json

import numpy as np
import pytest

from moenas_jax import candidate_log
from moenas_jax.candidate_log import METRIC_KEYS, CandidateLog


def _record(i):
  """Candidate i: reward i / 100, every metric present."""
  metrics = {**dict.fromkeys(METRIC_KEYS, 0.5 + i / 100), "group_accuracy": [0.5, 0.4]}
  return {"arch": {"num_experts": [8, 4, 1 + i % 2], "top_k": [1, 2, 1]}, "metrics": metrics,
          "reward": i / 100, "cycle": i // 4}


def test_appends_and_reads_back(tmp_path):
  path = tmp_path / "results" / "candidates.jsonl"
  with CandidateLog(path) as log:
    log.append([_record(0), _record(1)])
    log.append([{**_record(2), "reward": np.float32(0.5),
                 "metrics": {**_record(2)["metrics"], "robustness": float("nan")}}])
    assert len(log) == 3
  records = candidate_log.read(path)
  assert records[:2] == [_record(0), _record(1)]
  assert records[2]["reward"] == 0.5 and records[2]["metrics"]["robustness"] is None
  assert len(path.read_text().splitlines()) == 3


def test_resume_cuts_the_log_back_to_the_restored_count(tmp_path):
  path = tmp_path / "candidates.jsonl"
  with CandidateLog(path) as log:
    log.append([_record(i) for i in range(5)])
  with CandidateLog(path, expected=3) as log:  # the checkpoint knew 3: 3 and 4 are redone
    assert len(log) == 3
    log.append([_record(7)])
  assert [r["reward"] for r in candidate_log.read(path)] == [0.0, 0.01, 0.02, 0.07]
  with pytest.raises(ValueError, match="holds 4 candidates but the restored search state knows 6"):
    CandidateLog(path, expected=6)
  with CandidateLog(path, expected=0) as log:
    assert len(log) == 0
  assert path.read_text() == ""


def test_a_torn_last_line_is_dropped(tmp_path):
  path = tmp_path / "candidates.jsonl"
  with CandidateLog(path) as log:
    log.append([_record(0), _record(1)])
  line = json.dumps(_record(2)) + "\n"
  with open(path, "a") as file:  # a kill -9 in the middle of an append
    file.write(line[: len(line) // 2])
  assert len(candidate_log.read(path)) == 2
  with CandidateLog(path) as log:
    assert len(log) == 2
    log.append([_record(3)])
  assert [r["reward"] for r in candidate_log.read(path)] == [0.0, 0.01, 0.03]
  with open(path, "a") as file:  # cut just before the newline: complete JSON, still torn
    file.write(line[:-1])
  with CandidateLog(path, expected=3) as log:
    assert len(log) == 3
  assert path.read_text().endswith("}\n") and len(path.read_text().splitlines()) == 3


def test_a_damaged_line_inside_the_log_is_an_error(tmp_path):
  path = tmp_path / "candidates.jsonl"
  lines = [json.dumps(_record(0)), "{not json", json.dumps(_record(1))]
  path.write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=r"candidates.jsonl, line 2: not a JSON record"):
    candidate_log.read(path)


def test_records_must_follow_the_schema(tmp_path):
  record = _record(0)
  del record["metrics"]["worst_cell_accuracy"]
  with CandidateLog(tmp_path / "c.jsonl") as log, pytest.raises(
      ValueError, match=r"lacks \['metrics.worst_cell_accuracy'\]"):
    log.append([record])
