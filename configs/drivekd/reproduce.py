r"""Drive-KD's comparison at toy scale: SFT, single-teacher per capability, multi-teacher sum, AGP.

    python launch.py --config=configs/drivekd/reproduce.py --workdir=/tmp/drivekd_reproduce

Task drivekd.reproduce (`drivekd_jax.tasks.reproduce`): the demo's run (`configs/drivekd/demo.py`:
synthetic "grounded" driving questions, tiny student, two CE-warmed teachers) is trained once
per arm and seed, the arms differing only in the distillation losses:

  sft                  CE only
  single/perception    CE + the perception attention loss
  single/reasoning     CE + the reasoning attention loss
  single/planning      CE + the planning attention loss
  multi/sum            CE + all three, gradients summed (official --no-agp)
  multi/agp            CE + all three, combined by AGP (official mode)

with the same data (the demo's: 1200 train, 200 test frames), steps (800 of batch 4) and seeds (0,
1, 2) for every arm. To fit a CPU, one teacher (the demo's "vision": hidden 128, 3 layers, 1200 CE
warm-up steps) serves all three capabilities, as in the official default `teacher_for=(0, 0, 0)`; so
"multi" means the three capabilities' signals, not three teachers. Within a seed the teacher is
warmed once and shared by its arms; the seed sets the student's and the teacher's initialisation and
the data order.

Writes `results.json`, `results.md` (per-capability accuracy, mean of the seeds, 95% bootstrap
intervals over questions; AGP conflict counts and cosines) and `accuracy.png`, `agp.png` into
the workdir. A relaunch skips the finished arms; the seeds can also run as separate launches
(`--config.seeds='(1,)'`) on one workdir, and a last launch with all seeds only summarises.

`:small` is the notebook's CI setting (one seed, two arms, a few steps; minutes).

Cost on 2 CPU cores: see README "Reproducing the papers at toy scale".
"""

import importlib.util
from pathlib import Path

import ml_collections

from drivekd_jax.eval.comparison import ARMS


def _demo_config() -> ml_collections.ConfigDict:
  path = Path(__file__).with_name("demo.py")
  spec = importlib.util.spec_from_file_location("drivekd_demo_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "small"):
    raise ValueError(f"configs/drivekd/reproduce.py:{arg}: expected no argument or 'small'")
  run = _demo_config()
  run.progress_bar = False
  # One teacher serves the three capabilities (the official default, teacher_for (0, 0, 0)),
  # so a seed warms one teacher (most of a seed's time; a student arm is about a minute).
  run.teacher_names = "vision"
  run.distill.teacher_for = (0, 0, 0)
  # The demo's data (1200 train, 200 test frames) and student steps (800 of batch 4).
  run.checkpoint.every_steps = run.num_steps  # one save per arm: the final student
  c = ml_collections.ConfigDict()
  c.task = "drivekd.reproduce"
  c.seeds = (0, 1, 2)
  c.arms = ARMS
  c.run = run
  if arg == "small":
    c.seeds = (0,)
    c.arms = ("sft", "multi/agp")
    run.num_steps = 4
    run.log_every = 2
    run.checkpoint.every_steps = 4
    run.teacher_warmup.steps = 4
    run.teacher_warmup.batch_size = 4  # 8 frames give about 14 training questions
    run.teacher_warmup.log_every = 2
    run.data.synthetic.num_train_frames = 8
    run.data.synthetic.num_test_frames = 2
  return c
