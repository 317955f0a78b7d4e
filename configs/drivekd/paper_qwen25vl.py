r"""Drive-KD on Qwen2.5-VL (Table 1's "Drive-KD Qwen2.5-VL-3B" rows): a Qwen2.5-VL-7B teacher
-> a Qwen2.5-VL-3B-Instruct student.

    python launch.py --config=configs/drivekd/paper_qwen25vl.py --workdir=/ckpt/drivekd_qwen3b \
      --config.student.checkpoint=/models/Qwen2.5-VL-3B-Instruct \
      --config.teachers.shared.checkpoint=/models/Qwen2.5-VL-7B-Instruct \
      --config.data.train.dir=/data/Drive-KD --config.data.test.dir=/data/DriveBench

    # Single-teacher variants, as paper_8b_to_1b.py: `:perception`, `:reasoning`, `:planning`.
    # Another teacher size: `:multi-32B`, `:planning-72B`, ... (mode-size).
    # A tiny variant for CPU (synthetic data, random tiny Qwen2.5-VL teacher and student): `:tiny`.

The paper names the student (Qwen2.5-VL-3B-Instruct) but not its teacher; the default here is
Qwen2.5-VL-7B-Instruct, the same-family counterpart of the InternVL3-8B teacher of the InternVL3
rows (an assumption). Teacher and student must cut images alike (every Qwen2.5-VL size shares
patch 14, merge 2): distillation compares attention maps position by position over one token
sequence, so their image-token counts must be equal, and one processor setting is used for both
(`models.qwen25_vl.check_same_image_tokens` rejects anything else; maps are never re-aligned).

The recipe is the official code's (docs/drivekd_method.md §3), as for the InternVL3 rows: mixing
rows 0.8/0.1/0.1, dynamic loss weights, AGP per sample, micro-batch 1, 4 accumulated samples per
AdamW update (lr 5e-5, betas 0.9/0.999, no weight decay), cosine decay to 1%, full fine-tuning.
Layer windows: the 3B student has 36 decoder blocks (penultimate 34), the 7B teacher 28 (26); the
signals resolve their negative indices per model.

Presets are named "qwen2.5-vl-<size>" (`models.presets.model_config`). Images: with one 448 px
square per camera view (as the InternVL3 rows) each becomes (448/28)^2 = 256 image tokens.
"""

import ml_collections

from drivekd_jax.train.settings import default_config, teacher_config

CAPABILITIES = ("perception", "reasoning", "planning")
TEACHER_SIZES = ("7B", "32B", "72B")


def _parse(arg: str) -> tuple[str, str]:
  mode, _, size = (arg or "multi").strip().partition("-")
  size = size or "7B"
  if mode not in ("multi", "tiny") + CAPABILITIES or size not in TEACHER_SIZES:
    raise ValueError(
      f"paper_qwen25vl.py:{arg}: expected 'tiny', or 'multi' or one of {CAPABILITIES}, "
      f"optionally '-<teacher size>' with a size in {TEACHER_SIZES}"
    )
  return mode, size


def _tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A CPU-sized run on synthetic data: tiny Qwen2.5-VL student and a wider, deeper teacher,
  the teacher warmed with plain CE first; the student and the teacher answer the held-out
  questions after training. The trained BPE gets Qwen2.5-VL's image tokens appended
  (`data.processor.tokenizer_for`)."""
  c.num_steps = 20
  c.data.source = "synthetic"
  c.data.synthetic.num_train_frames = 8
  c.data.synthetic.num_test_frames = 2
  c.data.synthetic.image_size = 56  # views stay 56 px (smart_resize): 2x2 image tokens each
  c.data.synthetic.questions = "grounded"
  c.data.train = ml_collections.ConfigDict(
    dict(kind="drivekd_qa", dir="", config="", split="train", builder_kwargs={})
  )
  c.data.test = ml_collections.ConfigDict(
    dict(kind="drivekd_qa", dir="", config="", split="test", builder_kwargs={})
  )
  c.data.vocab_size = 512
  c.data.batch_size = 2
  c.data.buckets = (96,)  # the grounded examples are 60-80 tokens: one compilation
  c.data.overlong = "truncate"
  c.student.preset = "qwen2.5-vl-tiny"
  c.student.checkpoint = ""
  c.student.dtype = "float32"
  c.student.param_dtype = ""
  c.data.tokenizer = ""
  c.teachers.shared = teacher_config(
    "qwen2.5-vl-tiny", num_layers=3, hidden_size=96, num_heads=6, intermediate_size=192
  )
  c.distill.grad_accum_steps = 2
  c.teacher_warmup.steps = 20
  c.teacher_warmup.log_every = 10
  c.eval.batch_size = 2
  c.eval.teachers = True
  c.eval.max_new_tokens = 8
  c.checkpoint.every_steps = 20
  return c


def get_config(arg: str = "multi") -> ml_collections.ConfigDict:
  mode, size = _parse(arg)
  c = default_config()
  c.seed = 42
  c.num_steps = 5000  # one epoch = ceil(train records / data.batch_size)
  c.log_every = 10
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))

  c.data.source = "files"
  c.data.train = ml_collections.ConfigDict(
    dict(kind="drivekd_qa", dir="data/Drive-KD", config="", split="train", builder_kwargs={})
  )
  c.data.test = ml_collections.ConfigDict(
    dict(kind="drivebench", dir="data/DriveBench", config="clean", split="test", builder_kwargs={})
  )
  c.data.batch_size = 4
  c.data.buckets = (1024, 1536, 2048, 2560, 3072)
  c.data.max_images = 6
  c.data.max_tiles = 1
  c.data.overlong = "error"

  c.student = ml_collections.ConfigDict(
    dict(
      preset="qwen2.5-vl-3B",
      checkpoint="models/Qwen2.5-VL-3B-Instruct",
      dtype="bfloat16",
      param_dtype="float32",
      tokenizer="",
      text_overrides={},
    )
  )
  c.data.tokenizer = c.student.get_ref("checkpoint")
  c.teacher_names = "shared"
  c.teachers = ml_collections.ConfigDict()
  c.teachers.shared = teacher_config(
    f"qwen2.5-vl-{size}",
    checkpoint=f"models/Qwen2.5-VL-{size}-Instruct",
    dtype="bfloat16",
    param_dtype="bfloat16",
  )
  c.teachers.shared.tokenizer = c.teachers.shared.get_ref("checkpoint")

  c.distill.capabilities = CAPABILITIES if mode in ("multi", "tiny") else (mode,)
  c.distill.teacher_for = (0, 0, 0)
  c.distill.agp_mode = "agp"
  c.distill.agp_seed = 42
  c.distill.microbatch_size = 1
  c.distill.grad_accum_steps = 4
  c.distill.dynamic_weights = True
  c.distill.trainable = "all"
  if mode in CAPABILITIES:
    c.data.capabilities = (mode,)

  c.optimizer.learning_rate = 5e-5
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 0
  c.optimizer.lr_floor_ratio = 0.01
  c.optimizer.grad_clip_norm = 0.0

  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.eval.batch_size = 8
  c.eval.max_new_tokens = 512
  c.eval.max_examples = 0
  return _tiny(c) if mode == "tiny" else c
