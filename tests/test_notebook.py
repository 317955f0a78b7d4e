"""notebooks/reproduce.ipynb executed by nbclient at its SMALL setting, inside this checkout.

The parameter cell is replaced (no install, SMALL, a temporary workdir); then every cell runs
and the Drive-KD and IMUG outputs it shows are checked on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "reproduce.ipynb"


def _parameters(workdir: Path) -> str:
  return "\n".join(
    [
      'REPO_URL = ""',
      "SMALL = True",
      'IMUG_SMALL = {"data.num_samples": 2, "data.train_samples": 4, "model.train.steps": 2,'
      ' "tts.n": 2, "tts.rounds": 1, "rollout.progress": False}',
      "INSTALL = False",
      f"WORKDIR = {str(workdir)!r}",
    ]
  )


def test_the_notebook_is_colab_ready():
  nbformat = pytest.importorskip("nbformat")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
  assert "SMALL = False" in cell.source and 'REPO_URL = ""' in cell.source
  assert notebook.cells.index(cell) <= 1  # the user sets it first
  source = "\n".join(c.source for c in notebook.cells)
  assert "pip install -q -e {CHECKOUT}" in source and "git clone -q {REPO_URL}" in source
  assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_at_its_small_setting(tmp_path):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  for cell in notebook.cells:
    if "parameters" in cell.metadata.get("tags", []):
      cell.source = _parameters(tmp_path)
  # The kernel sees the real devices, not the suite's eight fake ones (the demo's batch of 4 is
  # split over the "data" axis of all devices).
  env = dict(os.environ)
  kept = [f for f in env.pop("XLA_FLAGS", "").split() if "force_host_platform_device" not in f]
  if kept:  # XLA reads a non-flag value (even " ") as a file name and aborts the kernel
    env["XLA_FLAGS"] = " ".join(kept)
  client = nbclient.NotebookClient(
    notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}
  )
  client.execute(env=env)

  demo = json.loads((tmp_path / "drivekd_demo" / "results.json").read_text())
  # SMALL runs the comparison's small setting: one teacher, "vision".
  assert [r["model"] for r in demo["rows"]] == ["teacher/vision", "student/before", "student/after"]
  reproduce = json.loads((tmp_path / "drivekd_reproduce" / "results.json").read_text())
  models = [r["model"] for r in reproduce["summary"]]
  assert models[-2:] == ["student/sft", "student/multi/agp"]
  assert set(reproduce["plots"]) == {"accuracy", "agp"}
  assert reproduce["agp_totals"]["multi/agp"]
  shown = [o for c in notebook.cells for o in c.get("outputs", [])]
  images = [o for o in shown if "image/png" in o.get("data", {})]
  assert len(images) >= 2  # the comparison's two plots, then the IMUG report's
  assert any("Held-out accuracy" in o.get("data", {}).get("text/markdown", "") for o in shown)
  assert list((tmp_path / "imug_demo").rglob("*.md"))
