"""notebooks/quickstart.ipynb runs top to bottom: smoke search, report, plots, exported model.

The notebook runs in a fresh kernel of this interpreter (so in whatever venv runs the tests),
with its workdir in a temporary folder; the cell timeout only guards against a hang.
"""

import base64
import json
import re
import shutil
from pathlib import Path

import nbclient
import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from moenas_jax import report
from moenas_jax.data import fashion_tones

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
PLOTS = ("pareto.png", "group_accuracy.png", "search_progress.png")


def _kernel() -> AsyncKernelManager:
  """ipykernel's own "python3" spec (this interpreter), whatever kernelspecs are installed."""
  return AsyncKernelManager(kernel_name="python3",
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


@pytest.fixture(scope="module")
def executed(smoke_workdir, tmp_path_factory):
  """(executed notebook, its workdir).

  The workdir starts as a copy of the session's finished smoke search, so the notebook's
  `run_search` resumes it: it restores every stage's checkpoint and still evaluates, exports
  and writes the report (tests/search_test.py covers a search from scratch).
  """
  workdir = tmp_path_factory.mktemp("notebook") / "run"
  shutil.copytree(smoke_workdir, workdir)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  with pytest.MonkeyPatch.context() as env:
    env.setenv("MOENAS_NOTEBOOK_WORKDIR", str(workdir))
    env.setenv("JAX_PLATFORMS", "cpu")
    nbclient.NotebookClient(nb, km=_kernel(), timeout=1800, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT)}}).execute()
  return nb, workdir


def _outputs(nb, cell_id):
  (cell,) = [cell for cell in nb.cells if cell.get("id") == cell_id]
  return cell.outputs


def _stdout(nb, cell_id):
  return "".join(o.text for o in _outputs(nb, cell_id) if o.output_type == "stream"
                 and o.name == "stdout")


def test_committed_notebook_is_clean_for_colab():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  assert nb.metadata.kernelspec.name == "python3"
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert [(cell.outputs, cell.execution_count) for cell in code] == [([], None)] * len(code)


def test_search_ran_in_the_workdir_from_the_environment(executed):
  nb, workdir = executed
  assert f"workdir: {workdir}" in _stdout(nb, "setup")
  for name in ("summary.json", "candidates.jsonl", "report.md", *PLOTS):
    assert (workdir / "results" / name).is_file(), name
  assert (workdir / "final" / "metadata.json").is_file()


def test_results_table_report_and_plots_are_shown(executed):
  nb, workdir = executed
  summary = json.loads((workdir / "results" / "summary.json").read_text())
  assert _stdout(nb, "table") == report.results_table(summary) + "\n"
  (shown,) = [o.data["text/markdown"] for o in _outputs(nb, "report")]
  assert shown.startswith("# Search report") and "## Found model vs baselines" in shown
  assert "](pareto.png)" not in shown
  images = [base64.b64decode(o.data["image/png"]) for o in _outputs(nb, "plots")
            if o.output_type == "display_data"]
  assert images == [(workdir / "results" / name).read_bytes() for name in PLOTS]


def test_exported_model_predicts_the_test_split(executed):
  nb, workdir = executed
  test = fashion_tones.load("test")
  classes = fashion_tones.CLASS_NAMES
  lines = _stdout(nb, "examples").splitlines()
  assert len(lines) == len(classes)
  # One image of class c from group c % 2: its index, group and true class; the mark says
  # whether the predicted name is the true one.
  for c, line in enumerate(lines):
    i = np.flatnonzero((test["label"] == c) & (test["group"] == c % 2))[0]
    assert line.startswith(f"image {i:4d}  group {fashion_tones.GROUP_NAMES[c % 2]} "), line
    predicted, mark = re.search(r"predicted (.+?) +(right|wrong)$", line).groups()
    assert f" true {classes[c]} " in line and predicted in classes, line
    assert (predicted == classes[c]) == (mark == "right"), line
  assert any("image/png" in o.get("data", {}) for o in _outputs(nb, "examples"))

  printed = _stdout(nb, "accuracy")
  overall, measured = re.match(
      r"test accuracy over 2000 images: ([\d.]+)% \(the search measured ([\d.]+)% over \d+\)",
      printed).groups()
  summary = json.loads((workdir / "results" / "summary.json").read_text())
  assert measured == f"{100 * summary['final']['trained']['accuracy']:.2f}"
  overall, measured = float(overall), float(measured)
  # 1000 test images per group (200 per class, half in each): the overall accuracy is the
  # mean of the group accuracies, all multiples of 0.05% that print exactly.
  light, dark = map(float, re.findall(r"^  \w+: ([\d.]+)%$", printed, re.MULTILINE))
  assert overall == pytest.approx((light + dark) / 2, abs=1e-9)
  # The search scores a subset (config.data.eval_size; 500 of 2000 in the smoke config, a
  # standard error of about 2 points): the same weights agree to a few points, while
  # weights that failed to load would score near chance (10%).
  assert abs(overall - measured) < 6
