r"""The paper's recipe: InternVL3-8B teacher(s) -> InternVL3-1B student on Drive-KD QA.

    python launch.py --config=configs/drivekd/paper_8b_to_1b.py --workdir=/ckpt/drivekd_8b_1b \
      --config.student.checkpoint=/models/InternVL3-1B \
      --config.teachers.shared.checkpoint=/models/InternVL3-8B \
      --config.data.train.dir=/data/Drive-KD --config.data.test.dir=/data/DriveBench \
      --config.num_steps=<ceil(train records / 4)>

    # Single-teacher variants (Table 1 "Single", Table 3): one capability, its split only.
    python launch.py --config=configs/drivekd/paper_8b_to_1b.py:planning ...

Inputs (local files only; nothing is downloaded):
  student / teacher checkpoints: HuggingFace InternVL3 folders (config.json, *.safetensors,
    tokenizer.json). The student's tokenizer is used; the teacher's is checked to be identical,
    since attention maps are compared position by position.
  data.train.dir: the Drive-KD QA release (train.json + images; `drivekd_qa` builder; pass
    `--config.data.train.builder_kwargs.image_root=...` when images live elsewhere).
  data.test.dir: the DriveBench release (`drivebench` builder, config "clean", split "test").
  Both are converted once into TFDS array_record files under data.tfds_dir (default
  <workdir>/data/tfds).

Recipe (official code defaults, docs/drivekd_method.md §3; the paper's values are unknown):
one shared InternVL3-8B teacher (the code's default when no per-capability path is given),
mixing rows 0.8/0.1/0.1, dynamic loss weights, AGP per sample, micro-batch 1, 4 accumulated
samples per AdamW update (lr 5e-5, betas 0.9/0.999, no weight decay), cosine decay to 1% over
the run, full fine-tuning (`--config.distill.trainable=llm` freezes vision tower and projector as
in the paper's figure), one epoch. Per-capability teachers: set `teacher_names` and
`distill.teacher_for`, e.g. `teacher_names="perception,reasoning,planning"`,
`teacher_for=(0,1,2)` with one `teachers.<name>` entry each.

Hardware and cost: the 8B teacher in bf16 (~16 GB), the 1B student in fp32 with AdamW (~16 GB)
and the attention maps (27 full L x L maps per sample at L ~ 2k: ~0.5 GB) fit one 80 GB GPU;
the default mesh shards parameters over all devices (FSDP); a sample cannot be split at
micro-batch 1, so its tokens are (sequence sharding: the `activation_length` and `vit_tokens`
rules). Both models run their layers as scans with attention (and its head-averaged maps) over
blocks of 512 queries; the student's layers are rematerialised keeping their weight products
(attention is recomputed), the frozen teacher's run forward only (`MEMORY_OPTIONS`,
`STUDENT_OPTIONS`; exact, they change memory, FLOPs and compile time only):
`python -m drivekd_jax.bench.plan --config=<this file> --topology=v5e:4x4` compiles the step for
a TPU slice and says whether it fits (docs/benchmarks.md §7).
At 3072 tokens and 6 images a sample is ~1.1e14 matmul FLOPs by the plan tool's hand count
(teacher forward 4.5e13, student forward 8e12, the four loss rows' backward 5.4e13; the
student's remat adds the attention's recomputation: 1.10x that on a v5p-8), i.e. roughly
0.3-0.4 s per sample on one H100 at 30-40% MFU; an epoch of ~20k samples is ~2 GPU-hours.
Multi-host: add `--config.jax_distributed=True` (SLURM/TPU auto-detected).
"""

import ml_collections

from drivekd_jax.train.settings import default_config, teacher_config

CAPABILITIES = ("perception", "reasoning", "planning")
# Decoder fields that change how the models compute, not what (`models.config.EXECUTION_FIELDS`).
MEMORY_OPTIONS = dict(attention_query_block=512, scan_layers=True, layer_remat="full")
# The student's backward keeps each layer's weight products and recomputes its attention: on a
# v5p-8 the step then does 1.10x the hand-counted FLOPs, in 21.4 of 95 GiB per chip (§7.2).
STUDENT_OPTIONS = dict(MEMORY_OPTIONS, layer_remat="dots")


def get_config(arg: str = "multi") -> ml_collections.ConfigDict:
  mode = (arg or "multi").strip()
  if mode not in ("multi",) + CAPABILITIES:
    raise ValueError(f"paper_8b_to_1b.py:{arg}: expected 'multi' or one of {CAPABILITIES}")
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
  c.data.max_tiles = 1  # Drive-KD: one 448x448 resize per image, 256 tokens each.
  c.data.overlong = "error"
  c.data.num_threads = 8

  c.student = ml_collections.ConfigDict(
    dict(
      preset="1B",
      checkpoint="models/InternVL3-1B",
      dtype="bfloat16",
      param_dtype="float32",
      text_overrides=dict(STUDENT_OPTIONS),
    )
  )
  c.data.tokenizer = c.student.get_ref("checkpoint")
  c.teacher_names = "shared"
  c.teachers = ml_collections.ConfigDict()
  c.teachers.shared = teacher_config(
    "8B",
    checkpoint="models/InternVL3-8B",
    dtype="bfloat16",
    param_dtype="bfloat16",
    **MEMORY_OPTIONS,
  )
  c.teachers.shared.tokenizer = c.teachers.shared.get_ref("checkpoint")

  c.distill.capabilities = CAPABILITIES if mode == "multi" else (mode,)
  c.distill.teacher_for = (0, 0, 0)
  c.distill.agp_mode = "agp"
  c.distill.agp_seed = 42
  c.distill.microbatch_size = 1
  c.distill.grad_accum_steps = 4
  c.distill.dynamic_weights = True
  c.distill.trainable = "all"
  if mode != "multi":
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
  return c
