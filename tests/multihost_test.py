"""End to end: a reduced smoke search as two CPU processes equals one process on two devices
that was killed twice (SIGKILL) and resumed.

Both runs have two devices in all (the same meshes, the same programs): (a) two processes of
one device each (`jax.distributed.initialize` with a local coordinator, gloo collectives)
in one workdir, uninterrupted; (b) one process with two simulated devices in another, killed
once during supernet training (after its first checkpoint) and once mid-search, and resumed.
Every process records what it writes under its workdir (an audit hook on open, rename,
remove, mkdir, ...): only process 0 may write, except for the parts of orbax checkpoints
orbax gives each process. The suite's other end-to-end run is the shared smoke search
(tests/conftest.py), from an empty workdir, uninterrupted.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moenas_jax import candidate_log

ROOT = Path(__file__).resolve().parents[1]

# argv: workdir, output file, process id (-1: a single process), coordinator port.
_RUN = """
import json, os, sys
workdir, out, process_id, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
writes, root = [], os.path.realpath(workdir) + os.sep
_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_EVENTS = ("os.rename", "os.remove", "os.rmdir", "os.truncate", "os.mkdir", "shutil.rmtree")

def audit(event, args):
  if event == "open":
    path, mode, flags = args
    if not (any(c in mode for c in "wax+") if isinstance(mode, str) else flags & _FLAGS):
      return
  elif event not in _EVENTS:
    return
  for path in args[:2 if event == "os.rename" else 1]:  # a rename: its source and target
    if isinstance(path, (str, bytes, os.PathLike)):
      path = os.path.realpath(os.fsdecode(path))
      if path.startswith(root):
        writes.append([event, path[len(root):]])

sys.addaudithook(audit)
import jax
if process_id >= 0:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id)
from configs import smoke
from moenas_jax import search
config = smoke.get_config()
config.data.update(train_size=256, held_train_size=64, eval_size=100, eval_batch_size=100)
config.supernet.update(steps=10, checkpoint_every=5)
config.search.update(candidates=8, population_size=5, robustness_size=50)
config.evaluation.update(bootstrap_resamples=50)
config.baselines = ()
config.train.objective.name = "erm"  # no ERM reference baseline either
summary = search.run_search(config, workdir, log=lambda line: print(line, flush=True))
with open(out, "w") as file:
  json.dump({"writes": writes, "summary": summary, "devices": jax.device_count(),
             "processes": jax.process_count()}, file)
"""


def _start(workdir, out, process_id=-1, port=0, flags=""):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip())
  return subprocess.Popen([sys.executable, "-c", _RUN, str(workdir), str(out), str(process_id),
                           str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process, out):
  output, _ = process.communicate(timeout=900)
  assert process.returncode == 0, output[-4000:]
  return json.loads(out.read_text())


def _kill_when(process, ready, timeout=600):
  """SIGKILLs the process as soon as `ready()` holds (the process must still be running)."""
  deadline = time.monotonic() + timeout
  while not ready():
    assert process.poll() is None, process.communicate()[0][-4000:]
    assert time.monotonic() < deadline, "the run never reached the kill point"
    time.sleep(0.05)
  os.kill(process.pid, signal.SIGKILL)
  process.wait()


def _killed_twice_and_resumed(workdir, out, flags):
  """Run (b): killed after the supernet's first checkpoint and once the search has logged a
  candidate, then run to the end; returns the last run's output."""
  first = _start(workdir, out, flags=flags)
  _kill_when(first, lambda: (workdir / "checkpoints" / "supernet" / "5").exists())
  second = _start(workdir, out, flags=flags)
  log = workdir / "results" / "candidates.jsonl"
  _kill_when(second, lambda: log.exists() and log.stat().st_size > 0)
  last = _start(workdir, out, flags=flags)
  output, _ = last.communicate(timeout=900)
  assert last.returncode == 0, output[-4000:]
  assert "[supernet] resumed at step" in output and "[search] resumed at cycle" in output, \
      output[-4000:]
  return json.loads(out.read_text())


def _free_port():
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _without_run_facts(summary):
  return {key: value for key, value in summary.items() if key not in ("timing", "compilations")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(two-process workdir, [process 0, process 1] outputs, one-process workdir, its last
  run's output)."""
  base = tmp_path_factory.mktemp("multihost")
  port = _free_port()
  outs = [base / f"process{i}.json" for i in range(2)] + [base / "single.json"]
  started = [_start(base / "two", outs[i], i, port) for i in range(2)]
  single = _killed_twice_and_resumed(base / "one", outs[2],
                                     "--xla_force_host_platform_device_count=2")
  results = [_finish(process, out) for process, out in zip(started, outs)]
  return base / "two", results, base / "one", single


def test_two_processes_equal_one_killed_and_resumed_process_on_as_many_devices(runs):
  two, (first, second), one, single = runs
  assert [first["processes"], second["processes"], single["processes"]] == [2, 2, 1]
  assert first["devices"] == second["devices"] == single["devices"] == 2
  saved = json.loads((two / "results" / "summary.json").read_text())
  assert _without_run_facts(saved) == _without_run_facts(first["summary"])
  assert _without_run_facts(first["summary"]) == _without_run_facts(single["summary"])
  assert _without_run_facts(second["summary"]) == _without_run_facts(first["summary"])
  assert (candidate_log.read(two / "results" / "candidates.jsonl")
          == candidate_log.read(one / "results" / "candidates.jsonl"))
  assert (two / "results" / "candidates.jsonl").read_bytes() == (
      one / "results" / "candidates.jsonl").read_bytes()


def _result_files(workdir):
  """Every file outside the orbax checkpoints (whose layout follows the processes)."""
  return sorted(str(path.relative_to(workdir)) for path in workdir.rglob("*") if path.is_file()
                and "checkpoints" not in path.parts and "weights" not in path.parts)


def test_only_process_zero_writes(runs):
  two, (first, second), one, _ = runs
  written = {path for _, path in first["writes"]}
  assert {"config.json", "results/candidates.jsonl", "results/summary.json",
          "results/report.md", "final"} <= written, sorted(written)
  # Orbax saves checkpoints with every process: process 1 writes its part (e.g.
  # array_metadatas/process_1) inside the step's temporary folder, and nothing else.
  assert not [write for write in second["writes"]
              if ".orbax-checkpoint-tmp" not in write[1]], second["writes"]
  # The same files as the single process's workdir: nothing extra, nothing partial.
  assert _result_files(two) == _result_files(one)
