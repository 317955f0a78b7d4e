r"""Drive-KD single-teacher distillation of one capability, on synthetic driving data.

    python launch.py --config=configs/drivekd/single_teacher.py:planning --workdir=/tmp/kd_pl
    python launch.py --config=configs/drivekd/single_teacher.py:perception,signal=hidden ...

The single-capability protocol (docs/drivekd_method.md §3.1, Table 3 in §6): CE plus the one
attention loss of the chosen capability, trained and evaluated on that capability's questions only:
  perception: layer-1 text->image attention (A_tv),
  reasoning:  grouped intermediate-layer full attention (layers 0..-2),
  planning:   penultimate-layer text->image attention.
No AGP is needed with a single loss besides CE, but the anchor projection still applies (the
official code runs AGP whenever a capability is active).

Arguments: the capability first, then optional `key=value`: signal=attention|hidden|logit_kl
(Table 3 rows), metric=mse|cosine, steps=N.

Teacher: one "tiny"-preset InternVL, wider and deeper than the student, random unless
`--config.teachers.shared.checkpoint=...` is given (see multi_teacher.py).

Cost: ~0.5 s per step on 2 CPU cores; the default 400 steps take ~5 minutes.
"""

import ml_collections

from drivekd_jax.train.settings import default_config, teacher_config

CAPABILITIES = ("perception", "reasoning", "planning")
OFFICIAL = {
  "perception": dict(kind="attention", map="text_to_image", start=0, end=0),
  "reasoning": dict(kind="attention", map="full", start=0, end=-2),
  "planning": dict(kind="attention", map="text_to_image", start=-2, end=-2),
}


def get_config(arg: str = "planning") -> ml_collections.ConfigDict:
  parts = [p.strip() for p in (arg or "planning").split(",") if p.strip()]
  capability = parts[0]
  if capability not in CAPABILITIES:
    raise ValueError(f"single_teacher.py:{arg}: the first argument must be one of {CAPABILITIES}")
  args = dict(p.partition("=")[::2] for p in parts[1:])

  c = default_config()
  c.num_steps = int(args.get("steps", 400))
  c.log_every = 20
  c.seed = 0

  c.data.source = "synthetic"
  c.data.synthetic.num_train_frames = 200
  c.data.synthetic.num_test_frames = 20
  c.data.capabilities = (capability,)
  c.data.batch_size = 4
  c.data.buckets = (192, 320)
  c.data.overlong = "truncate"

  c.student.preset = "tiny"
  c.teacher_names = "shared"
  c.teachers = ml_collections.ConfigDict()
  c.teachers.shared = teacher_config(hidden_size=128, num_layers=4, intermediate_size=256)

  signal = dict(OFFICIAL[capability])
  kind = args.get("signal", "attention")
  if kind != "attention":
    signal = dict(
      kind=kind,
      start=signal["start"] if kind == "hidden" else 0,
      end=signal["start"] if kind == "hidden" else 0,
    )
  if "metric" in args:
    signal["metric"] = args["metric"]
  c.distill.capabilities = (capability,)
  c.distill.signals = {capability: signal}
  c.distill.teacher_for = (0, 0, 0)
  c.distill.microbatch_size = 1
  c.distill.grad_accum_steps = 4

  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.grad_clip_norm = 1.0
  c.checkpoint.every_steps = 100
  c.eval.max_new_tokens = 48
  return c
