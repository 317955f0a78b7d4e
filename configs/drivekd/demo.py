r"""Drive-KD demo: CE-warmed teachers, multi-teacher attention distillation, AGP, synthetic data.

    python launch.py --config=configs/drivekd/demo.py --workdir=/tmp/drivekd_demo

What it does: writes a synthetic driving dataset with the "grounded" questions
(`drivekd_jax.data.synthetic`; DriveBench/DriveLM/Drive-KD formats; 1200 train frames = ~3000 QA
pairs, 200 test frames = ~500 questions; each question tags one object and comes with that object's
56-pixel camera view): perception, one vehicle's colour per scene (4 options); reasoning, does the
traffic light or the vehicle in the ego lane oblige the ego vehicle to stop (Yes/No); planning, the
action ("Stop.", "Slow down.", "Keep going.", an open answer). It trains a byte-level BPE on the
text, builds a tiny InternVL student (text hidden 64, 2 layers) and two teachers that are wider and
deeper (hidden 128, 3 and 4 layers; the 3-layer one serves perception and planning, the 4-layer one
reasoning, so grouped layer matching and a shared teacher are exercised). Each teacher is first
warmed up: 1200 steps of plain CE (batch 16, AdamW 1e-3 after 100 warm-up steps), saved once to
`<workdir>/teachers/<name>/` and reused by any later launch in that workdir, then frozen. The
untrained student answers the test questions (`student_before/`); then it is trained for 800 steps
of batch 4 with CE plus the three official attention losses, combined by AGP, accumulated over 4
micro-steps, AdamW with warmup and a cosine schedule. Finally every teacher and the student answer
the same held-out questions greedily; the run prints the accuracy per capability of the teachers,
the student before and after (multiple choice by letter, open answers by exact match;
`drivekd_jax.eval.results`) and writes it to `results.json` and `results.md`.

Cost: the measured wall time is in README "Reproducing the papers at toy scale". A relaunch
reuses the data, tokenizer and teachers; a larger `--config.num_steps` resumes from the last
checkpoint and trains on. `:eval` evaluates the student of the workdir's latest checkpoint on
the held-out questions (task drivekd.heldout) without training:

    python launch.py --config=configs/drivekd/demo.py:eval --workdir=/tmp/drivekd_demo

What it shows: whether CE-warmed teachers answer the grounded questions well above chance on
held-out scenes, and where the student stands before and after distillation from them (the
README shows a measured table; `configs/drivekd/reproduce.py` runs the paper's comparison).

Leaves in the workdir: checkpoints/ (Orbax, student state only), teachers/<name>/ (warmed
parameters, warmup.json with settings and CE curve, eval_summary.json), tensorboard/,
eval_summary.json, eval/answers.jsonl, student_before/, results.json, results.md, config.json,
data/.
"""

import ml_collections

from drivekd_jax.train.settings import default_config, teacher_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "eval"):
    raise ValueError(f"configs/drivekd/demo.py:{arg}: expected no argument or 'eval'")
  c = default_config()
  c.task = "drivekd.heldout" if arg == "eval" else "drivekd.train"
  c.num_steps = 800
  c.log_every = 50
  c.seed = 0

  c.data.source = "synthetic"
  c.data.synthetic.num_train_frames = 1200
  c.data.synthetic.num_test_frames = 200
  c.data.synthetic.image_size = 56  # the tiny vision tower's input: no resampling
  c.data.synthetic.questions = "grounded"
  c.data.vocab_size = 512
  c.data.batch_size = 4
  c.data.buckets = (96,)  # one bucket: one compilation (examples here are 60-80 tokens)
  c.data.max_images = 6
  c.data.overlong = "truncate"

  c.student.preset = "tiny"
  c.student.dtype = "float32"
  # Two teachers, both wider and deeper than the student (hidden 64, 2 layers) and of different
  # depths (grouped layer matching); perception and planning share one, so it is warmed once.
  c.teacher_names = "vision,reasoning"
  c.teachers = ml_collections.ConfigDict()
  c.teachers.vision = teacher_config(hidden_size=128, num_layers=3, intermediate_size=256)
  c.teachers.reasoning = teacher_config(hidden_size=128, num_layers=4, intermediate_size=256)
  c.teacher_warmup.steps = 1200
  # 3e-3 with 10 warm-up steps left some teachers answering by the question's prior alone.
  c.teacher_warmup.learning_rate = 1e-3
  c.teacher_warmup.warmup_steps = 100
  c.teacher_warmup.batch_size = 16
  c.teacher_warmup.log_every = 200

  c.distill.capabilities = ("perception", "reasoning", "planning")
  c.distill.teacher_for = (0, 1, 0)
  c.distill.agp_mode = "agp"
  c.distill.microbatch_size = 1
  c.distill.grad_accum_steps = 4

  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.optimizer.grad_clip_norm = 1.0

  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 2

  c.eval.batch_size = 32
  c.eval.max_new_tokens = 10
  c.eval.max_examples = 0
  c.eval.teachers = True
  return c
