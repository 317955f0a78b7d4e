r"""Will a configured Drive-KD run fit, and how fast would it go? Compile its train step and see.

    python -m drivekd_jax.bench.plan --config=configs/drivekd/paper_8b_to_1b.py \
      --topology=v5e:4x4 [--config.mesh.data=4 --config.mesh.fsdp=4] [--json]

Ahead-of-time compiles the configured train step (`train.experiment.assemble_distillation`, the
step the trainer runs) for a slice of `--topology` (`v5e:4x4`, `v5p:2x2x1`, `v4:2x2x1`, ... via
`jax.experimental.topologies`, which needs the TPU runtime library: `pip install -e ".[tpu]"`;
or `cpu`: this machine's devices) with the configured mesh, from abstract shapes only: the
models are built with `jax.eval_shape`, their parameters are `ShapeDtypeStruct`s with the
shardings of the logical rules, so no weights are read or allocated. The batch is
`data.batch_size` samples at the largest bucket length with `data.max_images` images
(`--length`, `--images` override). With micro-batch 1 the data axis runs that many samples at
once (`--parallel_samples`, default: the data axis size when it divides the window);
`--remat` picks what the student's backward keeps (`train.step.REMAT_POLICIES`).

Printed per device: argument, output and temporary memory against the chip's HBM (XLA's
`memory_analysis`), FLOPs of one optimizer step, collective bytes and an estimated step time,
all from the optimized HLO (`hlo_stats`: loop bodies counted once per iteration). The estimate
is a roofline per top-level HLO instruction, max(FLOPs / peak, bytes / HBM bandwidth) summed,
plus the collective bytes over the chip's interconnect bandwidth with no overlap: a bound that
real kernels fall short of and overlap improves on; MFU = FLOPs / (time x peak), with the HLO's
FLOPs (recomputation included). Beside it, `analytic_flops`: the step's matmul FLOPs counted
by hand from the model shapes (teacher forward passes, student forward, each loss row's
backward through what it reaches), and the HLO's ratio to it (recomputation under remat and
work the hand count omits push it above 1). `--json` prints one object instead.

The models' memory switches are decoder fields, set per model through `text_overrides`
(`--config.student.text_overrides`, `--config.teachers.<name>.text_overrides`):
`attention_query_block`, `fused_attention`, `scan_layers`, `layer_remat` (`DecoderConfig`).

A step that does not fit is reported, not raised: XLA:TPU refuses to compile a program larger
than HBM, and its error's figures (what one device needs, what it has) become the report, with
`fits` false and no FLOPs or estimates (None).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import config_flags

from drivekd_jax.bench import hlo_stats
from drivekd_jax.data.batch import BATCH_KEYS
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train import step as step_lib
from drivekd_jax.train.experiment import assemble_distillation, model_config
from drivekd_jax.train.optimizer import build_distill_optimizer
from drivekd_jax.train.settings import RunSettings

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: dense bf16 peak, HBM, HBM and interconnect bandwidth (bytes/s)."""

  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  interconnect_bandwidth: float
  source: str


# Per chip, vendor figures. A TPU chip with two TensorCores shows as one JAX device (megacore)
# or two; `plan` divides by the devices per chip.
CHIPS = {
  "TPU v4": Chip(275e12, 32 * GIB, 1228e9, 6 * 50e9, "cloud.google.com/tpu/docs/v4"),
  "TPU v5 lite": Chip(197e12, 16 * GIB, 819e9, 1600e9 / 8, "cloud.google.com/tpu/docs/v5e"),
  "TPU v5": Chip(459e12, 95 * GIB, 2765e9, 4800e9 / 8, "cloud.google.com/tpu/docs/v5p"),
  "TPU v6 lite": Chip(918e12, 32 * GIB, 1640e9, 3584e9 / 8, "cloud.google.com/tpu/docs/v6e"),
  "NVIDIA H100 80GB HBM3": Chip(
    989e12, 80e9, 3.35e12, 450e9, "nvidia.com/en-us/data-center/h100 (SXM, dense bf16)"
  ),
  "NVIDIA H200": Chip(989e12, 141e9, 4.8e12, 450e9, "nvidia.com/en-us/data-center/h200"),
  # A nominal CPU device (no vendor figure applies): for the plan's shape, not a prediction.
  "cpu": Chip(5e10, 0.0, 2e10, 1e10, "nominal: 50 GFLOP/s, 20 GB/s per device; host memory"),
}

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when run as a program, so that importing the
  library next to another absl program (e.g. `launch.py`, which also has `--config`) is safe."""
  config_flags.DEFINE_config_file("config", None, "Drive-KD config file.")
  flags.DEFINE_string("topology", "cpu", "cpu, or a TPU topology such as v5e:4x4, v5p:2x2x1.")
  flags.DEFINE_integer("length", 0, "Sequence length (0: the largest of data.buckets).")
  flags.DEFINE_integer("images", -1, "Images per sample (-1: data.max_images).")
  flags.DEFINE_integer("batch", 0, "Samples per step (0: data.batch_size).")
  flags.DEFINE_integer("parallel_samples", 0, "Samples at once over the data axis (0: auto).")
  flags.DEFINE_enum(
    "remat", "none", tuple(step_lib.REMAT_POLICIES), "What the student's backward keeps."
  )
  flags.DEFINE_bool("json", False, "Print one JSON object.")
  flags.DEFINE_string("hlo_out", "", "Also write the compiled step's optimized HLO text here.")
  flags.mark_flag_as_required("config")


def topology_devices(topology: str) -> list:
  """The devices of a slice: this machine's for "cpu", else compile-only TPU devices."""
  if topology == "cpu":
    return jax.devices("cpu")
  from jax.experimental import topologies

  # Compiling only: several planners (and a test run) may load the TPU library at once.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as error:  # the TPU runtime library is an optional extra
    raise SystemExit(
      f"--topology={topology}: no TPU compiler ({type(error).__name__}: {error}); "
      'install the extra: pip install -e ".[tpu]"'
    ) from error


def chip_of(devices) -> tuple[Chip, int]:
  """(the chip of these devices, devices per chip)."""
  kind = devices[0].device_kind if devices[0].platform != "cpu" else "cpu"
  if kind not in CHIPS:
    raise SystemExit(f"no chip figures for device kind {kind!r}; known: {sorted(CHIPS)}")
  if kind == "cpu":
    # The host's memory shared by its devices stands in for HBM.
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dataclasses.replace(CHIPS[kind], hbm_bytes=host / len(devices)), 1
  coords = [tuple(getattr(d, "coords", (d.id,))) for d in devices]
  return CHIPS[kind], max(1, len(coords) // len(set(coords)))


def _abstract_model(cfg, mesh, rules, seed: int) -> InternVL:
  """An InternVL whose parameters are ShapeDtypeStructs sharded by the rules."""
  graphdef, abstract = sharding_lib.abstract_module(lambda: InternVL(cfg, rngs=nnx.Rngs(seed)))
  shardings = sharding_lib.state_shardings(abstract, mesh, rules)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )
  return nnx.merge(graphdef, state)


def abstract_batch(settings: RunSettings, student_cfg, mesh, rules, batch, length, images):
  """ShapeDtypeStructs of one global batch, split over the batch rule's axes that divide it."""
  if images * student_cfg.tokens_per_image >= length:
    raise ValueError(
      f"{images} images of {student_cfg.tokens_per_image} tokens do not fit length {length}"
    )
  size = student_cfg.vision.image_size
  shapes = {
    "input_ids": ((batch, length), jnp.int32),
    "labels": ((batch, length), jnp.int32),
    "attention_mask": ((batch, length), jnp.bool_),
    "image_mask": ((batch, length), jnp.bool_),
    "positions": ((batch, length), jnp.int32),
    "pixel_values": ((batch, images, size, size, 3), jnp.float32),
    "capability": ((batch,), jnp.int32),
    "example_mask": ((batch,), jnp.bool_),
  }
  assert set(shapes) == set(BATCH_KEYS)
  out = {}
  for key, (shape, dtype) in shapes.items():
    names = ("batch",) + (None,) * (len(shape) - 1)
    spec = sharding_lib.logical_to_spec(names, shape, mesh, rules)
    out[key] = jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
  return out


def _auto_parallel(distill, mesh, batch: int, requested: int) -> int:
  if requested:
    return requested
  data = mesh.shape["data"]
  window = math.gcd(batch // distill.microbatch_size, distill.grad_accum_steps)
  return data if distill.microbatch_size == 1 and window % data == 0 else 1


def plan(
  settings: RunSettings,
  topology: str,
  *,
  length=0,
  images=-1,
  batch=0,
  parallel=0,
  remat="none",
  hlo_path="",
):
  """Compiles the step for the topology; returns the report dict (see the module docstring).
  `hlo_path`: also write the optimized HLO text there (for `hlo_stats` offline)."""
  devices = topology_devices(topology)
  chip, per_chip = chip_of(devices)
  mesh = sharding_lib.make_mesh(settings.mesh, devices=devices)
  rules = sharding_lib.rules_from_config(settings.sharding_rules)
  distill = settings.distill
  batch = batch or settings.data.batch_size
  length = length or max(settings.data.buckets)
  images = settings.data.max_images if images < 0 else images
  parallel = _auto_parallel(distill, mesh, batch, parallel)

  student_cfg = model_config(settings.student)
  student = _abstract_model(student_cfg, mesh, rules, settings.seed)
  teachers = [
    _abstract_model(model_config(settings.teachers[name]), mesh, rules, settings.seed + 1 + i)
    for i, name in enumerate(settings.teacher_order)
  ]
  optimizer = dataclasses.replace(settings.optimizer, accumulation_steps=distill.grad_accum_steps)
  micro_steps = settings.num_steps * batch // distill.microbatch_size
  tx, _ = build_distill_optimizer(optimizer, micro_steps, step_lib.gradient_combiner(distill))
  d = assemble_distillation(
    distill, student, teachers, tx, jax.random.key(settings.seed), mesh, parallel, remat, rules
  )
  batch_sds = abstract_batch(settings, student_cfg, mesh, rules, batch, length, images)
  jitted = step_lib.jit_train_step(
    d.step_fn,
    state_shardings=d.state_shardings,
    batch_shardings={k: v.sharding for k, v in batch_sds.items()},
    teacher_shardings=d.teacher_shardings,
  )
  rng = jax.eval_shape(lambda: jax.random.key(0))
  lowered = jitted.lower(d.state, batch_sds, rng, d.teacher_states)
  teacher_cfgs = [model_config(settings.teachers[name]) for name in settings.teacher_order]
  analytic = analytic_flops(d.step_fn.plan, student_cfg, teacher_cfgs, length, images, batch)
  setup = {
    "topology": topology,
    "device_kind": devices[0].device_kind,
    "devices": len(devices),
    "mesh": dict(mesh.shape),
    "parallel_samples": parallel,
    "remat": remat,
    "batch": batch,
    "length": length,
    "images": images,
    "chip": dataclasses.asdict(chip),
    "analytic_flops": analytic,
  }
  start = time.perf_counter()
  try:
    compiled = compile_lowered(lowered)
  except jax.errors.JaxRuntimeError as error:
    shortfall = parse_out_of_memory(str(error))
    if shortfall is None:
      raise
    return _does_not_fit_report(setup, time.perf_counter() - start, shortfall, str(error))
  compile_seconds = time.perf_counter() - start

  memory = compiled.memory_analysis()
  hlo_text = compiled.as_text()
  if hlo_path:
    with open(hlo_path, "w") as f:
      f.write(hlo_text)
  stats = hlo_stats.analyze(hlo_text)
  hbm = chip.hbm_bytes / per_chip
  peak = chip.peak_flops / per_chip
  bandwidth = chip.hbm_bandwidth / per_chip
  compute_seconds = stats.roofline_seconds(peak, bandwidth)
  collective_seconds = stats.collective_bytes / (chip.interconnect_bandwidth / per_chip)
  step_seconds = compute_seconds + collective_seconds
  argument = float(memory.argument_size_in_bytes)
  output = float(memory.output_size_in_bytes)
  alias = float(memory.alias_size_in_bytes)
  temp = float(memory.temp_size_in_bytes)
  # Donated state: the outputs aliased to arguments take no room of their own.
  total = argument + output - alias + temp
  fits = bool(total <= hbm)
  return {
    **setup,
    "fits": fits,
    "compile_seconds": compile_seconds,
    "flops_per_step": stats.flops * len(devices),
    "collective_bytes": stats.collective_bytes * len(devices),
    "collective_bytes_by_kind": {
      k: v * len(devices) for k, v in stats.collective_bytes_by_kind.items()
    },
    "est_step_seconds": step_seconds,
    "est_compute_seconds": compute_seconds,
    "est_collective_seconds": collective_seconds,
    "est_mfu": stats.flops / (step_seconds * peak) if step_seconds else 0.0,
    "est_samples_per_second": batch / step_seconds if step_seconds else 0.0,
    "hlo_over_analytic_flops": stats.flops * len(devices) / analytic["total"],
    "xla_cost_analysis_flops": float((compiled.cost_analysis() or {}).get("flops", 0.0)),
    "unknown_trip_counts": stats.unknown_trip_counts,
    "per_device": {
      "argument_bytes": argument,
      "output_bytes": output,
      "alias_bytes": alias,
      "temp_bytes": temp,
      "total_bytes": total,
      "required_bytes": total,
      "hbm_bytes": hbm,
      "fits": fits,
      "flops": stats.flops,
      "traffic_bytes": stats.traffic_bytes,
      "collective_bytes": stats.collective_bytes,
    },
  }


def _vision_flops(cfg, images: int) -> float:
  """Matmul FLOPs of `images` images through the ViT and the projector."""
  vision, width = cfg.vision, cfg.text.hidden_size
  patches = (vision.image_size // vision.patch_size) ** 2
  tokens, d, f = patches + 1, vision.hidden_size, vision.intermediate_size
  per_layer = 2 * tokens * (4 * d * d + 2 * d * f) + 4 * tokens * tokens * d
  embed = 2 * patches * vision.patch_size**2 * vision.num_channels * d
  shuffled = patches * cfg.downsample_ratio**2
  projector = 2 * shuffled * (d / cfg.downsample_ratio**2 * width + width * width)
  return images * (embed + vision.num_layers * per_layer + projector)


def _layer_flops(text, length: int, map_only: bool = False) -> float:
  """Matmul FLOPs of one decoder block over `length` tokens (every score of the `[T, T]` map:
  the causal half is computed too); `map_only`: up to its attention map (queries, keys and
  scores: what a map read at the block needs)."""
  d, dh, f = text.hidden_size, text.resolved_head_dim, text.intermediate_size
  heads, kv_heads = text.num_heads, text.num_kv_heads
  if map_only:
    return 2 * length * d * dh * (heads + kv_heads) + 2 * length * length * heads * dh
  projections = d * dh * (2 * heads + 2 * kv_heads) + 3 * d * f
  return 2 * length * projections + 4 * length * length * heads * dh


def analytic_flops(step_plan, student_cfg, teacher_cfgs, length, images, samples) -> dict:
  """The step's matmul FLOPs counted by hand: per sample the teachers' forward passes up to
  what their signals read (the head only for logit KD; a block read for its map only up to its
  scores), the student's forward, and each loss row's backward (twice the forward FLOPs of what
  it crosses: the vision tower and projector when trained, the blocks up to the one it reads,
  the head for CE and logit KD). Recomputation under remat is not counted: it is the HLO's
  surplus."""
  text = student_cfg.text
  head = lambda cfg: 2 * length * cfg.text.hidden_size * cfg.text.vocab_size
  teachers = 0.0
  for cfg, request, logits in zip(
    teacher_cfgs, step_plan.teacher_requests, step_plan.teacher_logits
  ):
    resolved = request.resolve(cfg.text.num_layers)
    read = resolved.full_layers + resolved.text_to_image_layers + resolved.hidden_layers
    if logits:
      teachers += cfg.text.num_layers * _layer_flops(cfg.text, length) + head(cfg)
    elif read:
      deepest = max(read)
      teachers += deepest * _layer_flops(cfg.text, length)
      teachers += _layer_flops(cfg.text, length, deepest not in resolved.hidden_layers)
    teachers += _vision_flops(cfg, images) if logits or read else 0.0
  vision = _vision_flops(student_cfg, images)
  layer = _layer_flops(text, length)
  forward = vision + text.num_layers * layer + head(student_cfg)
  trained_vision = vision if step_plan.config.trainable == "all" else 0.0
  backward = 0.0
  kinds = ("logit_kl",) + tuple(r.signal.kind for r in step_plan.resolved)  # CE reads logits
  for top, kind in zip(step_plan.row_reach, kinds):
    if top == len(step_plan.segments):  # the head: every block
      backward += 2 * (trained_vision + text.num_layers * layer + head(student_cfg))
    else:
      deepest = step_plan.segments[top][1] - 1
      reached = deepest * layer + _layer_flops(text, length, kind == "attention")
      backward += 2 * (trained_vision + reached)
  per_sample = {"teachers": teachers, "student_forward": forward, "student_backward": backward}
  return {k: v * samples for k, v in per_sample.items()} | {
    "total": samples * sum(per_sample.values())
  }


def compile_lowered(lowered):
  """`lowered.compile()` (a seam: tests plant the compiler's errors here)."""
  return lowered.compile()


# XLA prints sizes with binary prefixes ("15.75G" is 15.75 GiB: tsl's HumanReadableNumBytes).
_SIZE = r"([0-9.]+)\s*([KMGTP]i?)?B?"
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
# The two forms of XLA:TPU's out-of-memory compile error: temporaries alone exceeding HBM, and
# the whole program (arguments, outputs, temporaries) against it.
_OUT_OF_MEMORY = (
  (
    "temp_bytes",
    re.compile(
      r"memory required for (?:HLO )?temporaries \("
      + _SIZE
      + r"\) exceeds available HBM \("
      + _SIZE
      + r"\)"
    ),
  ),
  ("total_bytes", re.compile(r"Used " + _SIZE + " of " + _SIZE + " hbm")),
)


def _bytes(number: str, unit: str | None) -> float:
  return float(number) * _UNITS[(unit or "").rstrip("i")]


def parse_out_of_memory(message: str) -> dict | None:
  """XLA's out-of-memory compile error -> what it says one device needs and has, or None.

  Returns:
    {"required_bytes", "hbm_bytes" (what XLA counts as available), and "temp_bytes" or
    "total_bytes" (what the required figure covers)}, or None for any other error.
  """
  if "RESOURCE_EXHAUSTED" not in message and "Ran out of memory" not in message:
    return None
  for covers, pattern in _OUT_OF_MEMORY:
    found = pattern.search(message)
    if found:
      required = _bytes(found.group(1), found.group(2))
      return {
        "required_bytes": required,
        "hbm_bytes": _bytes(found.group(3), found.group(4)),
        covers: required,
      }
  return None


def _does_not_fit_report(setup: dict, compile_seconds: float, shortfall: dict, message: str):
  """The report of a step XLA refused to compile for want of memory: no program, so no FLOPs
  or step-time estimate (None); per device, the figures the error states."""
  return {
    **setup,
    "fits": False,
    "compile_seconds": compile_seconds,
    "flops_per_step": None,
    "collective_bytes": None,
    "collective_bytes_by_kind": {},
    "est_step_seconds": None,
    "est_compute_seconds": None,
    "est_collective_seconds": None,
    "est_mfu": None,
    "est_samples_per_second": None,
    "hlo_over_analytic_flops": None,
    "xla_cost_analysis_flops": None,
    "unknown_trip_counts": None,
    "xla_error": message.strip().splitlines()[0][:500],
    "per_device": {**shortfall, "fits": False, "flops": None},
  }


def format_table(report: dict) -> str:
  g = lambda b: f"{b / GIB:.2f} GiB"
  d = report["per_device"]
  rows = [
    ("topology", f"{report['topology']} ({report['devices']} x {report['device_kind']})"),
    (
      "mesh",
      f"{report['mesh']}, {report['parallel_samples']} samples at once, remat {report['remat']}",
    ),
    ("batch", f"{report['batch']} x {report['length']} tokens, {report['images']} images"),
    ("compile", f"{report['compile_seconds']:.1f} s"),
  ]
  if d["flops"] is None:  # XLA refused: out of memory
    covers = "temporaries" if "temp_bytes" in d else "program"
    rows += [
      (
        f"per device: {covers} / HBM",
        f"{g(d['required_bytes'])} / {g(d['hbm_bytes'])}  DOES NOT FIT",
      ),
      ("XLA", report["xla_error"]),
    ]
    return _table(rows)
  rows += [
    ("per device: arguments", g(d["argument_bytes"])),
    ("per device: outputs", f"{g(d['output_bytes'])} ({g(d['alias_bytes'])} donated)"),
    ("per device: temporaries", g(d["temp_bytes"])),
    (
      "per device: total / HBM",
      f"{g(d['total_bytes'])} / {g(d['hbm_bytes'])}" + ("" if d["fits"] else "  DOES NOT FIT"),
    ),
    ("per device: FLOPs / step", f"{d['flops']:.3e}"),
    (
      "slice: FLOPs / step",
      f"{report['flops_per_step']:.3e} ({report['hlo_over_analytic_flops']:.2f}x the analytic"
      f" {report['analytic_flops']['total']:.3e})",
    ),
    ("slice: collective bytes", f"{report['collective_bytes']:.3e}"),
    (
      "est. step time",
      f"{report['est_step_seconds']:.4g} s (compute/memory {report['est_compute_seconds']:.4g}"
      f" + collectives {report['est_collective_seconds']:.4g})",
    ),
    ("est. MFU", f"{100 * report['est_mfu']:.1f} %"),
    ("est. samples / s", f"{report['est_samples_per_second']:.4g}"),
  ]
  return _table(rows)


def _table(rows) -> str:
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv):
  del argv
  settings = RunSettings.from_config(FLAGS.config)
  report = plan(
    settings,
    FLAGS.topology,
    length=FLAGS.length,
    images=FLAGS.images,
    batch=FLAGS.batch,
    parallel=FLAGS.parallel_samples,
    remat=FLAGS.remat,
    hlo_path=FLAGS.hlo_out,
  )
  if FLAGS.json:
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
  else:
    print(format_table(report))


if __name__ == "__main__":
  define_flags()
  app.run(main)
