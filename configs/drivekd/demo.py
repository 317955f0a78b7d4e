r"""Drive-KD demo: CE-warmed teachers, multi-teacher attention distillation, AGP, synthetic data.

    python launch.py --config=configs/drivekd/demo.py --workdir=/tmp/drivekd_demo

What it does: writes a small synthetic driving dataset (DriveBench/DriveLM/Drive-KD formats, six
rendered camera views per frame; 64 train frames = ~460 QA pairs, 4 test frames) into
`<workdir>/data`, trains a byte-level BPE on its text, builds a tiny InternVL student (text
hidden 64, 2 layers) and two teachers that are wider and deeper (hidden 128, 3 and 4 layers; the
3-layer one serves perception and planning, the 4-layer one reasoning, so grouped layer matching
and a shared teacher are exercised). Each teacher is first warmed up: 150 steps of plain CE
(batch 8, AdamW 3e-3, same pipeline and processor), saved once to `<workdir>/teachers/<name>/`
and reused by any later launch in that workdir, then frozen. The student is trained for 200
steps with CE plus the three official attention losses, combined by AGP, accumulated over 4
micro-steps, AdamW with warmup and a cosine schedule. Finally every teacher and the student
answer the same held-out questions greedily and the multiple-choice ones are scored
(`eval_summary.json`: student under "by_capability", teachers under "teachers").

Cost: about 4 to 5 minutes on 2 CPU cores (figures in docs/benchmarks.md). A relaunch reuses
the data, tokenizer and teachers; a larger `--config.num_steps` resumes from the last checkpoint
and trains on. `:eval` evaluates the student of the workdir's latest checkpoint on the held-out
questions (task drivekd.heldout) without training:

    python launch.py --config=configs/drivekd/demo.py:eval --workdir=/tmp/drivekd_demo

What it shows: the warm-up makes the teachers' attention carry what CE taught them, and the
distillation losses grow accordingly; at this scale the held-out multiple-choice accuracy of
10 questions says little (see docs/benchmarks.md for the measured losses and scores).

Leaves in the workdir: checkpoints/ (Orbax, student state only), teachers/<name>/ (warmed
parameters, warmup.json with settings and CE curve, eval_summary.json), tensorboard/,
eval_summary.json, eval/answers.jsonl, config.json, data/.
"""

import ml_collections

from drivekd_jax.train.settings import default_config, teacher_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "eval"):
    raise ValueError(f"configs/drivekd/demo.py:{arg}: expected no argument or 'eval'")
  c = default_config()
  c.task = "drivekd.heldout" if arg == "eval" else "drivekd.train"
  c.num_steps = 200
  c.log_every = 10
  c.seed = 0

  c.data.source = "synthetic"
  c.data.synthetic.num_train_frames = 64
  c.data.synthetic.num_test_frames = 4
  c.data.synthetic.image_size = 64
  c.data.vocab_size = 512
  c.data.batch_size = 4
  c.data.buckets = (320,)  # one bucket: one compilation (examples here are 70-290 tokens)
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
  c.teacher_warmup.steps = 150
  c.teacher_warmup.learning_rate = 3e-3
  c.teacher_warmup.warmup_steps = 10
  c.teacher_warmup.batch_size = 8
  c.teacher_warmup.log_every = 25

  c.distill.capabilities = ("perception", "reasoning", "planning")
  c.distill.teacher_for = (0, 1, 0)
  c.distill.agp_mode = "agp"
  c.distill.microbatch_size = 1
  c.distill.grad_accum_steps = 4

  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 5
  c.optimizer.grad_clip_norm = 1.0

  c.checkpoint.every_steps = 50
  c.checkpoint.keep = 2

  c.eval.batch_size = 8
  c.eval.max_new_tokens = 32
  c.eval.max_examples = 32
  c.eval.teachers = True
  return c
