"""launch.py: bad configurations end in one clear line; a preempted run exits 143."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags

REPO = Path(__file__).resolve().parents[1]


def _launch(*args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, "PYTHONPATH": str(REPO)}
  return subprocess.run(
    [sys.executable, "launch.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
@pytest.mark.parametrize(
  "config_flags, expected",
  [
    (["--config.data.batch_sise=3"], "no config key 'batch_sise' Did you mean \"batch_size\""),
    (["--config.data.batch_size=abc"], "--config.data.batch_size=abc"),
    (["--config.data.source=web"], "config.data: source='web': expected 'synthetic' or 'files'"),
    (["--config.optimizer.schedule=linear"], "config.optimizer: schedule='linear'"),
  ],
)
def test_bad_config_is_one_line(tmp_path, config_flags, expected):
  out = _launch("--config=configs/drivekd/demo.py", f"--workdir={tmp_path}", *config_flags)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert lines[-1].startswith("launch.py: bad configuration: "), out.stderr[-2000:]
  assert expected in lines[-1]
  assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_missing_config_file_and_bad_argument(tmp_path):
  out = _launch("--config=configs/drivekd/nope.py", f"--workdir={tmp_path}")
  assert out.returncode == 2 and "configs/drivekd/nope.py" in out.stderr.splitlines()[-1]
  out = _launch("--config=configs/drivekd/demo.py:fast", f"--workdir={tmp_path}")
  assert out.returncode == 2
  assert "demo.py:fast: expected no argument or 'eval'" in out.stderr.splitlines()[-1]
  assert "Traceback" not in out.stderr


def _preempted_task(config, workdir):
  del config, workdir
  return {"preempted": True}


def _finished_task(config, workdir):
  del config, workdir
  return {"preempted": False}


@pytest.mark.parametrize("task, code", [(_preempted_task, 143), (_finished_task, None)])
def test_a_preempted_task_exits_143(monkeypatch, tmp_path, task, code):
  import launch

  monkeypatch.setitem(launch.TASKS, "drivekd.train", f"{__name__}:{task.__name__}")
  flags.FLAGS.unparse_flags()
  flags.FLAGS(
    ["launch.py", f"--config={REPO / 'configs/drivekd/demo.py'}", f"--workdir={tmp_path}"]
  )
  try:
    if code is None:
      assert launch.main(["launch.py"]) is None
    else:
      with pytest.raises(SystemExit) as stopped:
        launch.main(["launch.py"])
      assert stopped.value.code == code
  finally:
    flags.FLAGS.unparse_flags()
