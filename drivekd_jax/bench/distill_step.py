"""Throughput and peak memory of one Drive-KD optimizer step: ours (JAX) vs PyTorch.

  python -m drivekd_jax.bench.distill_step [--steps 3] [--impl both|jax|torch]
    [--torch_variant both|official|best]

One optimizer step = 4 samples, micro-batch 1, AGP on, all three capability losses, dynamic
loss weights on, one shared teacher (the official defaults, `docs/drivekd_method.md` §3). The
"bench" shapes: 2 images of 224x224 (patch 14, ViT width 128 / 2 layers / 4 heads / MLP 512,
64 tokens per image after the pixel shuffle); 128 text tokens of which the last 32 are the
answer (sequence 256); student LLM width 256, 4 layers, 4 heads, 2 KV heads, FFN 768; teacher
LLM width 512, 8 layers, 8 heads, 2 KV heads, FFN 1536; vocabulary 4096. Both models are random
(weights do not change the cost).

The PyTorch side is the official algorithm on `transformers` InternVL: eager attention with
`output_attentions=True`, one student forward, one teacher forward per capability teacher (the
official loop runs the shared teacher once per capability), one backward pass per loss with
`retain_graph`, the per-sample AGP over all parameters in Python, gradient accumulation and
AdamW every 4 samples, then the reweighting update. `--torch_variant=best` is the strongest
PyTorch step we could write of the same algorithm: the shared teacher runs once per sample and
the loss weights stay static (no gradient norms, no reweighting); by default both variants run
and both ratios are printed (`jax/torch-official`, `jax/torch-best`). Ours is
`drivekd_jax.train.step` (one teacher forward and one student forward per sample; each loss
pulled back from that forward only through the blocks it reaches; AdamW once per 4 samples).

Each implementation runs in its own subprocess, so its memory figures are its own: the peak
resident memory while the timed steps run (the kernel's high-water mark VmHWM, reset through
/proc/self/clear_refs after the warm-up step and a `malloc_trim`, for both implementations)
and the whole-process peak
(`resource.getrusage(RUSAGE_SELF).ru_maxrss`, imports and XLA compilation included).
Timings exclude the first (warm-up / compile) step; the median and the best step are both
reported. For ours it also prints the step's matmul FLOPs (from the compiled HLO, `hlo_stats`),
the rate they run at, and that rate against this machine's fp32 matmul rate through XLA (a
2048x2048 product): how much room is left for any implementation doing the same products.
How to read the figures, and the figures themselves: `docs/benchmarks.md` §1.1, §2.1.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import random
import resource
import subprocess
import sys
import time

import numpy as np

SAMPLES_PER_STEP = 4
TEXT_TOKENS = 128
ANSWER_TOKENS = 32
IMAGES = 2
IMAGE_SIZE = 224
TOKENS_PER_IMAGE = 64
SEQ = TEXT_TOKENS + IMAGES * TOKENS_PER_IMAGE
VOCAB = 4096
IMAGE_TOKEN = VOCAB - 1
VIT = dict(hidden=128, layers=2, heads=4, mlp=512)
STUDENT = dict(hidden=256, layers=4, heads=4, kv_heads=2, ffn=768)
TEACHER = dict(hidden=512, layers=8, heads=8, kv_heads=2, ffn=1536)


def make_samples(seed: int = 0):
  """Token ids [4, SEQ], labels, image mask, capability, pixels [4, 2, 224, 224, 3]."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, VOCAB - 1, size=(SAMPLES_PER_STEP, SEQ)).astype(np.int32)
  # text 8 | image 64 | text 8 | image 64 | text 112 (answer = last 32 tokens)
  ids[:, 8 : 8 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
  ids[:, 80 : 80 + TOKENS_PER_IMAGE] = IMAGE_TOKEN
  labels = np.full_like(ids, -100)
  labels[:, -ANSWER_TOKENS:] = ids[:, -ANSWER_TOKENS:]
  pixels = rng.normal(size=(SAMPLES_PER_STEP, IMAGES, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)
  capability = np.array([0, 1, 2, 0], np.int32)
  return ids, labels, pixels, capability


def _peak_rss_mb() -> float:
  """Peak resident memory of this process since it started or since the last
  `_reset_window_peak` (the kernel resets both high-water marks together)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_window_peak() -> float:
  """Resets the kernel's resident high-water mark (VmHWM) of this process (Linux); returns the
  peak before the reset, the whole process's peak so far."""
  before = _peak_rss_mb()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
  return before


def _release_freed_memory() -> None:
  """Hands memory that is already freed back to the OS (glibc `malloc_trim`), so the window peak
  measures the working set of the steps rather than heap pages kept from earlier phases
  (initialisation, compilation). Applied to both implementations alike."""
  with contextlib.suppress(OSError):
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _window_peak_mb() -> float:
  """VmHWM since the last `_reset_window_peak`: the peak while the timed steps ran."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024.0
  raise RuntimeError("/proc/self/status has no VmHWM line")


# ------------------------------------------------------------------------------------- JAX


def run_jax(steps: int) -> dict:
  import jax
  from flax import nnx

  from drivekd_jax.bench import hlo_stats
  from drivekd_jax.distill.signals import DistillConfig
  from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
  from drivekd_jax.models.internvl import InternVL
  from drivekd_jax.train import sharding as sharding_lib
  from drivekd_jax.train import step as step_lib
  from drivekd_jax.train.experiment import assemble_distillation

  vision = VisionConfig(
    image_size=IMAGE_SIZE,
    patch_size=14,
    hidden_size=VIT["hidden"],
    num_layers=VIT["layers"],
    num_heads=VIT["heads"],
    intermediate_size=VIT["mlp"],
  )

  def text(spec):
    return DecoderConfig(
      vocab_size=VOCAB,
      hidden_size=spec["hidden"],
      num_layers=spec["layers"],
      num_heads=spec["heads"],
      num_kv_heads=spec["kv_heads"],
      intermediate_size=spec["ffn"],
    )

  s_cfg = InternVLConfig(vision=vision, text=text(STUDENT), image_token_id=IMAGE_TOKEN)
  t_cfg = InternVLConfig(vision=vision, text=text(TEACHER), image_token_id=IMAGE_TOKEN)
  # Initialised as the trainer does: each model born on the (one-device) mesh by one jitted
  # program, then the train state from another.
  mesh = sharding_lib.make_mesh()
  rules = sharding_lib.rules_from_config()
  student, _ = sharding_lib.create_sharded(lambda: InternVL(s_cfg, rngs=nnx.Rngs(0)), mesh, rules)
  teacher, _ = sharding_lib.create_sharded(lambda: InternVL(t_cfg, rngs=nnx.Rngs(1)), mesh, rules)
  config = DistillConfig(microbatch_size=1, grad_accum_steps=SAMPLES_PER_STEP)
  tx = step_lib.make_optimizer(config)
  distillation = assemble_distillation(config, student, [teacher], tx, jax.random.key(0), mesh)
  del student, teacher
  state = distillation.state
  jitted = step_lib.jit_train_step(distillation.step_fn)
  ids, labels, pixels, capability = make_samples()
  batch = {
    "input_ids": ids,
    "labels": labels,
    "attention_mask": np.ones_like(ids, bool),
    "image_mask": ids == IMAGE_TOKEN,
    "positions": np.tile(np.arange(SEQ, dtype=np.int32), (SAMPLES_PER_STEP, 1)),
    "pixel_values": pixels,
    "capability": capability,
    "example_mask": np.ones(SAMPLES_PER_STEP, bool),
  }
  batch = jax.device_put(batch)
  teachers = distillation.teacher_states
  t0 = time.perf_counter()
  compiled = jitted.lower(state, batch, jax.random.key(0), teachers).compile()
  state, metrics = compiled(state, batch, jax.random.key(0), teachers)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  flops = hlo_stats.analyze(compiled.as_text()).flops
  times = []
  _release_freed_memory()
  setup_peak = _reset_window_peak()
  for i in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, jax.random.key(i), teachers)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  return {
    "impl": "jax",
    "step_seconds": times,
    "samples_per_second": SAMPLES_PER_STEP / float(np.median(times)),
    "best_samples_per_second": SAMPLES_PER_STEP / float(np.min(times)),
    "first_step_seconds": compile_s,
    "step_peak_rss_mb": _window_peak_mb(),
    "peak_rss_mb": max(setup_peak, _peak_rss_mb()),
    "loss": float(metrics["loss"]),
    "matmul_flops_per_step": flops,
    "matmul_flops_per_second": flops / float(np.median(times)),
    "machine_matmul_flops_per_second": matmul_rate(),
  }


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
  """This machine's fp32 matmul FLOP/s through XLA: the best of `repeats` timed products of two
  `[size, size]` matrices (a ceiling for the step's matmul rate)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((size, size), jnp.float32)
  product = jax.jit(lambda a, b: a @ b)
  product(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    product(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2.0 * size**3 / best


# ----------------------------------------------------------------------------------- PyTorch


TORCH_VARIANTS = ("official", "best")


def run_torch(steps: int, variant: str = "official") -> dict:
  """The PyTorch step: "official" runs the shared teacher once per capability and updates the
  dynamic loss weights; "best" (the strongest we could write of the same algorithm) runs the
  teacher once per sample and keeps the static weights (no gradient norms, no reweighting)."""
  if variant not in TORCH_VARIANTS:
    raise ValueError(f"torch variant {variant!r}: expected one of {TORCH_VARIANTS}")
  best = variant == "best"
  import torch
  from transformers import (
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
  )

  from drivekd_jax.distill.losses import grouped_layer_windows, resolve_layer_range

  torch.manual_seed(0)

  def build(spec):
    vision = InternVLVisionConfig(
      hidden_size=VIT["hidden"],
      num_hidden_layers=VIT["layers"],
      num_attention_heads=VIT["heads"],
      intermediate_size=VIT["mlp"],
      image_size=IMAGE_SIZE,
      patch_size=14,
      attention_bias=True,
    )
    text = Qwen2Config(
      vocab_size=VOCAB,
      hidden_size=spec["hidden"],
      num_hidden_layers=spec["layers"],
      num_attention_heads=spec["heads"],
      num_key_value_heads=spec["kv_heads"],
      intermediate_size=spec["ffn"],
      tie_word_embeddings=False,
    )
    config = InternVLConfig(
      vision_config=vision,
      text_config=text,
      image_token_id=IMAGE_TOKEN,
      image_seq_length=TOKENS_PER_IMAGE,
      tie_word_embeddings=False,
    )
    config._attn_implementation = "eager"
    return InternVLForConditionalGeneration(config)

  student, teacher = build(STUDENT), build(TEACHER)
  teacher.eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  student.train()
  params = [p for p in student.parameters() if p.requires_grad]
  optimizer = torch.optim.AdamW(params, lr=5e-5, betas=(0.9, 0.999), weight_decay=0.0)
  keys = ("ce", "p", "r", "pl")
  mixing = ((0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8))
  static = (1.0, 1.0, 1.0, 1.0)
  dyn = [
    torch.nn.Parameter(torch.log(torch.expm1(torch.tensor(w)).clamp_min(1e-20))) for w in static
  ]
  dyn_opt = torch.optim.AdamW(dyn, lr=3e-4, betas=(0.9, 0.99), weight_decay=0.0)
  loss_init: dict[int, float] = {}
  shuffle = random.Random(42)
  windows = grouped_layer_windows(
    resolve_layer_range(0, -2, STUDENT["layers"]), resolve_layer_range(0, -2, TEACHER["layers"])
  )

  def dyn_weights():
    w = [torch.clamp(torch.nn.functional.softplus(a) + 1e-8, 1e-6, 1e6) for a in dyn]
    w[0] = torch.clamp(w[0], min=0.6)
    return w

  def dot(ga, gb):
    return sum(
      float((a.float() * b.float()).sum())
      for a, b in zip(ga, gb)
      if a is not None and b is not None
    )

  def proj(f, a):
    d = dot(f, a)
    if d >= 0:
      return f
    coef = d / max(dot(a, a), 1e-20)
    return [x if x is None else (x if y is None else x - coef * y) for x, y in zip(f, a)]

  def add(*gs):
    out = []
    for parts in zip(*gs):
      parts = [p for p in parts if p is not None]
      out.append(sum(parts[1:], parts[0]) if parts else None)
    return out

  def atv(s, t, is_img):
    mask = ((~is_img)[:, :, None] & is_img[:, None, :]).float()
    num = ((s - t) ** 2 * mask).sum(dim=(-2, -1))
    return (num / mask.sum(dim=(-2, -1)).clamp_min(1.0)).mean()

  ids_np, labels_np, pixels_np, capability = make_samples()

  def one_sample(i, stats):
    ids = torch.from_numpy(ids_np[i : i + 1].astype(np.int64))
    labels = torch.from_numpy(labels_np[i : i + 1].astype(np.int64))
    pixels = torch.from_numpy(pixels_np[i].transpose(0, 3, 1, 2).copy())
    is_img = ids == IMAGE_TOKEN
    out = student(input_ids=ids, pixel_values=pixels, labels=labels, output_attentions=True)
    s_att = [a.mean(dim=1) for a in out.attentions]
    t_att = []
    with torch.no_grad():
      # the official loop: one forward per capability teacher; "best": the shared one once
      for _ in range(1 if best else 3):
        t_out = teacher(input_ids=ids, pixel_values=pixels, output_attentions=True)
        t_att.append([a.mean(dim=1) for a in t_out.attentions])
    if best:
      t_att = t_att * 3
    reasoning = 0.0
    for s_layer, t_layers in windows:
      target = sum(t_att[1][t] for t in t_layers) / len(t_layers)
      reasoning = reasoning + ((s_att[s_layer] - target) ** 2).mean()
    losses = {
      "ce": out.loss,
      "p": atv(s_att[0], t_att[0][0], is_img),
      "r": reasoning / len(windows),
      "pl": atv(s_att[-2], t_att[2][-2], is_img),
    }
    grads, norms = {}, {}
    for n, k in enumerate(keys):
      for p in params:
        p.grad = None
      (losses[k] / SAMPLES_PER_STEP).backward(retain_graph=n < len(keys) - 1)
      grads[k] = [None if p.grad is None else p.grad.detach().clone() for p in params]
      if not best:
        norms[k] = (
          sum(float((g.float() ** 2).sum()) for g in grads[k] if g is not None) + 1e-20
        ) ** 0.5
    w = [torch.tensor(x) for x in static] if best else [x.detach() for x in dyn_weights()]
    row = mixing[int(capability[i])]
    weighted = {"ce": [None if g is None else g * w[0] for g in grads["ce"]]}
    for c, k in enumerate(keys[1:]):
      weighted[k] = [None if g is None else g * (w[c + 1] * row[c]) for g in grads[k]]
    caps = [k for c, k in enumerate(keys[1:]) if row[c] > 0]
    merged = {k: add(weighted["ce"], proj(weighted[k], weighted["ce"])) for k in caps}
    perm = list(caps)
    shuffle.shuffle(perm)
    tilde = dict(merged)
    for a in perm:
      for b in perm:
        if a != b:
          tilde[a] = proj(tilde[a], merged[b])
    total = add(*[tilde[k] for k in caps])
    stats["acc"] = add(stats["acc"], total)
    for k in keys:
      stats["loss"][k] = stats["loss"].get(k, 0.0) + float(losses[k])
      stats["norm"][k] = stats["norm"].get(k, 0.0) + norms.get(k, 0.0)
    return float(out.loss)

  def reweight(stats):
    c = float(SAMPLES_PER_STEP)
    mean_l = [stats["loss"][k] / c for k in keys]
    mean_n = [stats["norm"][k] / c for k in keys]
    for i, v in enumerate(mean_l):
      loss_init.setdefault(i, v)
    w = dyn_weights()
    g = [w[i] * mean_n[i] for i in range(4)]
    g_sum = torch.stack(g).sum()
    if float(g_sum) <= 0:
      return
    ratios = [s / sum(static) for s in static]
    obj = sum((g[i] - ratios[i] * g_sum).abs() for i in range(4))
    dyn_opt.zero_grad()
    obj.backward()
    dyn_opt.step()
    with torch.no_grad():
      w_new = dyn_weights()
      scale = sum(static) / float(torch.stack(w_new).sum().clamp_min(1e-20))
      for i in range(4):
        v = torch.clamp(w_new[i] * scale, 1e-6, 1e6)
        if i == 0:
          v = torch.clamp(v, min=0.6)
        dyn[i].data.copy_(torch.log(torch.expm1(v).clamp_min(1e-20)))

  def optimizer_step():
    stats = {"acc": [None] * len(params), "loss": {}, "norm": {}}
    last = 0.0
    for i in range(SAMPLES_PER_STEP):
      last = one_sample(i, stats)
    for p, g in zip(params, stats["acc"]):
      p.grad = g
    optimizer.step()
    optimizer.zero_grad()
    if not best:
      reweight(stats)
    return last

  t0 = time.perf_counter()
  optimizer_step()
  first = time.perf_counter() - t0
  times, loss = [], 0.0
  _release_freed_memory()
  setup_peak = _reset_window_peak()
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = optimizer_step()
    times.append(time.perf_counter() - t0)
  return {
    "impl": f"torch-{variant}",
    "torch_threads": torch.get_num_threads(),
    "step_seconds": times,
    "samples_per_second": SAMPLES_PER_STEP / float(np.median(times)),
    "best_samples_per_second": SAMPLES_PER_STEP / float(np.min(times)),
    "first_step_seconds": first,
    "step_peak_rss_mb": _window_peak_mb(),
    "peak_rss_mb": max(setup_peak, _peak_rss_mb()),
    "loss": loss,
  }


def _child(impl: str, steps: int, variant: str = "official") -> dict:
  cmd = [
    sys.executable,
    "-m",
    "drivekd_jax.bench.distill_step",
    "--impl",
    impl,
    "--steps",
    str(steps),
    "--torch_variant",
    variant,
    "--child",
  ]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"{impl} ({variant}) benchmark failed:\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--impl", choices=("both", "jax", "torch"), default="both")
  parser.add_argument(
    "--torch_variant",
    choices=("both",) + TORCH_VARIANTS,
    default="both",
    help="official: the official code's structure (teacher once per capability, dynamic "
    "weights); best: teacher once per sample, static weights; both: one run of each",
  )
  parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per impl")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    if args.impl == "jax":
      result = run_jax(args.steps)
    else:
      result = run_torch(args.steps, args.torch_variant)
    print(json.dumps(result))
    return
  variants = TORCH_VARIANTS if args.torch_variant == "both" else (args.torch_variant,)
  runs = [("jax", "official")] if args.impl in ("both", "jax") else []
  if args.impl in ("both", "torch"):
    runs += [("torch", v) for v in variants]
  results = {}
  for impl, variant in runs:
    r = _child(impl, args.steps, variant)
    results[r["impl"]] = r
  for name, r in results.items():
    times = ", ".join(f"{t:.3f}" for t in r["step_seconds"])
    print(
      f"{name:>13}: {r['samples_per_second']:.2f} samples/s (median of steps [{times}] s), "
      f"first step {r['first_step_seconds']:.1f} s, peak RSS during the timed steps "
      f"{r['step_peak_rss_mb']:.0f} MB (whole process incl. imports/compile "
      f"{r['peak_rss_mb']:.0f} MB)"
    )
  jax_r = results.get("jax")
  if jax_r is not None:
    rate, peak = jax_r["matmul_flops_per_second"], jax_r["machine_matmul_flops_per_second"]
    print(
      f"jax step: {jax_r['matmul_flops_per_step']:.3g} matmul FLOPs (HLO) at "
      f"{rate / 1e9:.0f} GFLOP/s, {rate / peak:.0%} of this machine's fp32 matmul rate "
      f"({peak / 1e9:.0f} GFLOP/s, a 2048x2048 product)"
    )
  for name, torch_r in results.items():
    if jax_r is None or name == "jax":
      continue
    speed = jax_r["samples_per_second"] / torch_r["samples_per_second"]
    best = jax_r["best_samples_per_second"] / torch_r["best_samples_per_second"]
    mem = jax_r["step_peak_rss_mb"] / torch_r["step_peak_rss_mb"]
    whole = jax_r["peak_rss_mb"] / torch_r["peak_rss_mb"]
    print(
      f"jax/{name}: throughput x{speed:.2f} (median steps), x{best:.2f} (best steps), "
      f"step peak memory x{mem:.2f}, whole-process peak x{whole:.2f}"
    )
  print(json.dumps(results))


if __name__ == "__main__":
  main()
