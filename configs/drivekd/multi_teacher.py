r"""Drive-KD multi-teacher distillation (official recipe) on synthetic driving data.

    python launch.py --config=configs/drivekd/multi_teacher.py --workdir=/tmp/drivekd_multi
    python launch.py --config=configs/drivekd/multi_teacher.py:agp_mode=sum --workdir=...

The official multi-teacher objective (docs/drivekd_method.md §3.2-3.4): CE plus the perception
(layer-1 text->image attention), reasoning (grouped intermediate full attention) and planning
(penultimate text->image attention) losses, mixed by the capability rows (0.8/0.1/0.1), weighted
dynamically, combined per sample by AGP and accumulated over 4 samples; AdamW lr 5e-5 in the
official code, higher here for the small models.

Models: a "tiny"-preset InternVL student and one shared teacher (the official default: the same
teacher serves all three capabilities), wider and deeper than the student. The teacher is random
unless `--config.teachers.shared.checkpoint=/path/to/hf_checkpoint` points at a trained one (e.g.
a run of this trainer with no distillation, exported, or any InternVL3 checkpoint with the same
tokenizer).

Arguments (`:key=value,...`): agp_mode=agp|sum|pcgrad|stage1|stage2 (Table 3 ablations),
steps=N, frames=N (synthetic training frames).

Cost: ~1 s per step on 2 CPU cores; the default 600 steps take ~10-15 minutes.
"""

import ml_collections

from drivekd_jax.train.settings import default_config, teacher_config


def _args(arg: str) -> dict:
  out = {}
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    out[key.strip()] = value.strip()
  return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  args = _args(arg)
  c = default_config()
  c.num_steps = int(args.get("steps", 600))
  c.log_every = 20
  c.seed = 0

  c.data.source = "synthetic"
  c.data.synthetic.num_train_frames = int(args.get("frames", 200))
  c.data.synthetic.num_test_frames = 20
  c.data.vocab_size = 512
  c.data.batch_size = 4
  c.data.buckets = (192, 320)
  c.data.max_images = 6
  c.data.overlong = "truncate"

  c.student.preset = "tiny"
  c.teacher_names = "shared"
  c.teachers = ml_collections.ConfigDict()
  c.teachers.shared = teacher_config(hidden_size=128, num_layers=4, intermediate_size=256)

  c.distill.capabilities = ("perception", "reasoning", "planning")
  c.distill.teacher_for = (0, 0, 0)
  c.distill.agp_mode = args.get("agp_mode", "agp")
  c.distill.microbatch_size = 1
  c.distill.grad_accum_steps = 4
  c.distill.dynamic_weights = True

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.grad_clip_norm = 1.0

  c.checkpoint.every_steps = 100
  c.eval.max_new_tokens = 48
  return c
