"""The demo config end to end through launch.py: teacher warm-up, train, resume, evaluate.

Shrunk by flags: one teacher shared by the three capabilities (so it is warmed once), 3 warm-up
steps, 2 + 1 distillation steps, 3 held-out questions of 4 tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from drivekd_jax.train import metrics as metrics_lib

REPO = Path(__file__).resolve().parents[1]
SMALL = [
  "--config.data.synthetic.num_train_frames=4",
  "--config.data.synthetic.num_test_frames=3",
  "--config.log_every=1",
  "--config.checkpoint.every_steps=2",
  "--config.eval.max_examples=3",
  "--config.eval.max_new_tokens=4",
  "--config.progress_bar=False",
  # Batch 4 over data x fsdp = 4 of the suite's 8 fake devices; weights also on tensor.
  "--config.mesh.data=2",
  "--config.mesh.fsdp=2",
  "--config.mesh.tensor=2",
]


# Launch-only flags (`_demo_config` below cannot parse the tuple).
ONE_TEACHER = [
  "--config.teacher_names=reasoning",
  "--config.distill.teacher_for=(0,0,0)",
  "--config.teacher_warmup.steps=3",
  "--config.teacher_warmup.batch_size=4",
  "--config.teacher_warmup.log_every=1",
]


def _launch(workdir, *flags, config="configs/drivekd/demo.py"):
  cmd = [
    sys.executable,
    "launch.py",
    f"--config={config}",
    f"--workdir={workdir}",
    *SMALL,
    *ONE_TEACHER,
    *flags,
  ]
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
  return out.stdout + out.stderr


@pytest.mark.slow
def test_demo_trains_resumes_and_evaluates(tmp_path):
  workdir = tmp_path / "demo"
  log = _launch(workdir, "--config.num_steps=2", "--config.eval.after_training=False")
  assert "warm-up reasoning step 3: loss=" in log
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [2]
  assert not (workdir / "eval_summary.json").exists()
  teacher_dir = workdir / "teachers" / "reasoning"
  assert sorted(p.name for p in (workdir / "teachers").iterdir()) == ["reasoning"]
  warmup = json.loads((teacher_dir / "warmup.json").read_text())
  assert [step for step, _ in warmup["loss"]] == [1, 2, 3]
  assert warmup["loss"][-1][1] < warmup["loss"][0][1]  # CE falls during the warm-up
  saved = {p: p.stat().st_mtime_ns for p in (teacher_dir / "checkpoints").rglob("*") if p.is_file()}
  assert saved

  log = _launch(workdir, "--config.num_steps=3", f"--config.export_dir={workdir / 'hf'}")
  assert "train: resuming from checkpoint step 2" in log
  assert "teacher reasoning: reusing its warm-up (3 steps" in log
  assert "warm-up reasoning step" not in log
  assert {p: p.stat().st_mtime_ns for p in saved} == saved  # reused, not rewritten
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 3
  scalars = metrics_lib.read_scalars(str(workdir / "tensorboard"))
  for tag in (
    "loss",
    "loss/sup",
    "loss/perception",
    "loss/reasoning",
    "loss/planning",
    "agp/stage1_conflicts",
    "agp/cos_sup_planning",
    "nonfinite_total",
    "learning_rate",
    "perf/tokens_per_second",
    "perf/tflops_per_second",
  ):
    assert tag in scalars, sorted(scalars)
  assert [step for step, _ in scalars["loss"]] == [1, 2, 3]
  summary = json.loads((workdir / "eval_summary.json").read_text())
  assert summary["checkpoint_step"] == 3
  assert summary["by_capability"]["overall"]["questions"] == 3
  assert summary["teachers"]["reasoning"]["questions"] == 3
  teacher_summary = json.loads((teacher_dir / "eval_summary.json").read_text())
  assert teacher_summary["teacher"] == "reasoning" and teacher_summary["warmed_up"]
  assert len((workdir / "eval" / "answers.jsonl").read_text().splitlines()) == 3

  # The exported student: HF layout with the run's tokenizer, loadable back.
  from drivekd_jax.models import from_pretrained
  from drivekd_jax.models.internvl import InternVL

  assert (workdir / "hf" / "config.json").is_file() and (
    workdir / "hf" / "tokenizer.json"
  ).is_file()
  assert list((workdir / "hf").glob("*.safetensors"))
  assert isinstance(from_pretrained(str(workdir / "hf")), InternVL)

  # The "drivekd.heldout" task on the same workdir, in process (the suite's 8 fake devices).
  from drivekd_jax.tasks import evaluate

  config = _demo_config()
  (workdir / "eval_summary.json").unlink()
  summary = evaluate.run(config, str(workdir))
  assert summary["checkpoint_step"] == 3
  assert json.loads((workdir / "eval_summary.json").read_text())["num_questions"] == 3


def _demo_config():
  import importlib.util

  spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs/drivekd/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for flag in SMALL:
    key, value = flag.removeprefix("--config.").split("=")
    target = config
    *parents, leaf = key.split(".")
    for parent in parents:
      target = target[parent]
    target[leaf] = (
      type(target[leaf])(value) if not isinstance(target[leaf], bool) else (value == "True")
    )
  return config
