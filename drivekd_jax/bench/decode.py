"""Greedy decode throughput: our jitted sampler vs transformers `generate`, same Qwen2 weights.

  python -m drivekd_jax.bench.decode [--shapes=tiny,student,vocab32k] [--batch_sizes=1,8]

For each model shape a random Qwen2 is written with `save_pretrained` and read back with our
`from_pretrained`, so both sides run the same fp32 weights:
  tiny      width 64, 2 layers, 4/2 heads, SwiGLU 128, vocab 512 (the size of the parity tests'
            tiny random configs);
  student   width 256, 4 layers, 4/2 heads, SwiGLU 768, vocab 4096 (the student LLM of the
            distillation benchmark);
  vocab32k  width 256, 4 layers, 8/2 heads, SwiGLU 1024, vocab 32000 (the head alone is 32 MB);
  custom    the --hidden_size ... --vocab_size flags.
Both sides generate exactly `new_tokens` tokens greedily (no stop token) from the same prompts;
the time covers prefill plus decode, best of `repeats` runs after a warm-up (for JAX the warm-up
is the compile). Tokens/s counts generated tokens over the whole batch. torch is timed with each
of `--torch_threads` and its fastest setting is the one compared. The generated tokens are
compared, so a speed-up can not come from doing something else.

It also prints the bandwidth bound of a decode step: each step streams every weight (the
embedding row aside), so at batch 1 tokens/s can not exceed bandwidth / weight bytes, whatever
the framework (the bandwidth of the memory level the weights come from, measured here). Small
models are bound by per-token overhead (where a compiled loop wins most), large ones by that
bound (where no framework can win much). The method and the figures: `docs/benchmarks.md` §1.2,
§2.2.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 64, "Tokens generated per row.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "Prompt length (all rows, unpadded).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per side; the best is reported.")
SHAPES = {
  "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=512),
  "student": dict(hidden=256, layers=4, heads=4, kv_heads=2, mlp=768, vocab=4096),
  "vocab32k": dict(hidden=256, layers=4, heads=8, kv_heads=2, mlp=1024, vocab=32000),
}
_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Model shapes: {list(SHAPES)} or custom.")
_HIDDEN = flags.DEFINE_integer("hidden_size", 256, "Model width (custom shape).")
_LAYERS = flags.DEFINE_integer("num_layers", 4, "Decoder layers (custom shape).")
_HEADS = flags.DEFINE_integer("num_heads", 8, "Query heads (custom shape).")
_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 2, "Key/value heads (custom shape).")
_MLP = flags.DEFINE_integer("intermediate_size", 1024, "SwiGLU width (custom shape).")
_VOCAB = flags.DEFINE_integer("vocab_size", 32000, "Vocabulary size (custom shape).")
_SEED = flags.DEFINE_integer("seed", 0, "Weights and prompt seed.")
_TORCH_THREADS = flags.DEFINE_list(
  "torch_threads",
  ["1", "0"],
  "torch intra-op thread counts to try (0: torch's default); the fastest is compared.",
)


def _random_qwen2(directory: str, shape: dict):
  import torch
  import transformers

  config = transformers.Qwen2Config(
    vocab_size=shape["vocab"],
    hidden_size=shape["hidden"],
    intermediate_size=shape["mlp"],
    num_hidden_layers=shape["layers"],
    num_attention_heads=shape["heads"],
    num_key_value_heads=shape["kv_heads"],
    max_position_embeddings=4096,
    rope_theta=1e6,
    tie_word_embeddings=False,
    pad_token_id=0,
    bos_token_id=None,
    eos_token_id=None,
  )
  config._attn_implementation = "sdpa"
  torch.manual_seed(_SEED.value)
  model = transformers.Qwen2ForCausalLM(config).eval()
  model.save_pretrained(directory)
  return model


def _read_bandwidth(num_bytes: int = 64 << 20, repeats: int = 20) -> float:
  """Bytes/s this machine streams a `num_bytes` fp32 tensor: the best of `repeats` torch sums
  with torch's default threads. The buffer is larger than any default shape's weights, so it
  comes from the same level of the memory hierarchy as they do (cache bandwidth on a machine
  whose last-level cache holds it)."""
  import torch

  data = torch.ones(num_bytes // 4)
  data.sum()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    data.sum()
    best = min(best, time.perf_counter() - start)
  return num_bytes / best


def _timed(fn) -> tuple[float, object]:
  start = time.perf_counter()
  result = fn()
  return time.perf_counter() - start, result


def _measure(name: str, shape: dict, bandwidth: float, thread_counts: list[int]) -> list[str]:
  """Times one model shape at every batch size; prints the details, returns summary rows."""
  import jax
  import numpy as np
  import torch
  from flax import nnx

  from drivekd_jax.models.hf_import import from_pretrained
  from drivekd_jax.models.sampling import Sampler

  new_tokens, prompt_len = _NEW_TOKENS.value, _PROMPT_LEN.value
  with tempfile.TemporaryDirectory() as directory:
    torch_model = _random_qwen2(directory, shape)
    jax_model = from_pretrained(directory, dtype="float32")
  sampler = Sampler(jax_model, cache_length=prompt_len + new_tokens + 1, max_new_tokens=new_tokens)
  rng = np.random.default_rng(_SEED.value)
  print(
    f"model {name}: qwen2 D={shape['hidden']} layers={shape['layers']} heads={shape['heads']}/"
    f"{shape['kv_heads']} mlp={shape['mlp']} vocab={shape['vocab']}; prompt {prompt_len}, "
    f"{new_tokens} new tokens, fp32, greedy, best of {_REPEATS.value}"
  )
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(jax_model, nnx.Param)))
  if jax_model.lm_head is not None:  # an untied table is only gathered from, one row a token
    weight_bytes -= jax_model.embed_tokens.embedding.nbytes
  bound = bandwidth / weight_bytes
  print(
    f"  bound: every decode step reads {weight_bytes / 2**20:.1f} MB of weights; at the "
    f"measured {bandwidth / 1e9:.0f} GB/s no implementation passes {bound:.0f} steps/s "
    "(tok/s at batch 1)"
  )
  rows = []
  default_threads = torch.get_num_threads()
  for batch in [int(b) for b in _BATCH_SIZES.value]:
    prompts = rng.integers(1, shape["vocab"], size=(batch, prompt_len), dtype=np.int32)
    jax_prompts = jax.device_put(prompts)
    torch_prompts = torch.from_numpy(prompts).long()

    def run_jax(jax_prompts=jax_prompts):
      state = sampler.generate(jax_prompts)
      return np.asarray(jax.block_until_ready(state.tokens))

    def run_torch(torch_prompts=torch_prompts):
      with torch.inference_mode():
        out = torch_model.generate(
          torch_prompts,
          attention_mask=torch.ones_like(torch_prompts),
          max_new_tokens=new_tokens,
          min_new_tokens=new_tokens,
          do_sample=False,
          pad_token_id=0,
        )
      return out[:, prompt_len:].numpy()

    # Warm up (JAX compiles), then interleave the timed runs so load from other processes on a
    # shared machine hits both sides alike; keep each side's best.
    jax_tokens = run_jax()
    torch_tokens = run_torch()
    jax_time = float("inf")
    torch_times = {threads: float("inf") for threads in thread_counts}
    for _ in range(_REPEATS.value):
      seconds, jax_tokens = _timed(run_jax)
      jax_time = min(jax_time, seconds)
      for threads in thread_counts:
        torch.set_num_threads(threads)
        seconds, torch_tokens = _timed(run_torch)
        torch_times[threads] = min(torch_times[threads], seconds)
    torch.set_num_threads(default_threads)
    jax_rate = batch * new_tokens / jax_time
    for threads, seconds in torch_times.items():
      rate = batch * new_tokens / seconds
      label = " (torch default)" if threads == default_threads else ""
      print(
        f"    batch {batch}: torch {threads} thread(s){label}: {rate:9.1f} tok/s, "
        f"jax/torch {jax_rate / rate:5.2f}x"
      )
    torch_threads = min(torch_times, key=torch_times.get)
    torch_time = torch_times[torch_threads]
    same = float(np.mean(jax_tokens == torch_tokens))
    torch_rate = batch * new_tokens / torch_time
    print(
      f"  batch {batch}: jax {jax_rate:9.1f} tok/s ({jax_time * 1e3:7.1f} ms)  "
      f"best torch {torch_rate:9.1f} tok/s ({torch_time * 1e3:7.1f} ms, {torch_threads} thr)  "
      f"ratio {jax_rate / torch_rate:5.2f}x  identical tokens {same:.0%}"
    )
    bound_share = f"{jax_rate / bound:4.0%}" if batch == 1 else "   -"
    rows.append(
      f"{name:>9} {weight_bytes / 2**20:7.1f} {batch:5d} {jax_rate:10.1f} {torch_rate:10.1f} "
      f"{jax_rate / torch_rate:6.2f}x {bound_share:>8} {same:8.0%}"
    )
  return rows


def main(argv):
  del argv
  import jax
  import torch

  default_threads = torch.get_num_threads()
  thread_counts = [int(t) or default_threads for t in _TORCH_THREADS.value]
  custom = dict(
    hidden=_HIDDEN.value,
    layers=_LAYERS.value,
    heads=_HEADS.value,
    kv_heads=_KV_HEADS.value,
    mlp=_MLP.value,
    vocab=_VOCAB.value,
  )
  unknown = [name for name in _SHAPES.value if name not in SHAPES and name != "custom"]
  if unknown:
    raise app.UsageError(f"unknown --shapes {unknown}; expected any of {list(SHAPES)} or custom")
  shapes = {name: SHAPES[name] if name != "custom" else custom for name in _SHAPES.value}
  print(
    f"device: jax {jax.devices()[0].platform} x{len(jax.devices())}, "
    f"torch threads tried {thread_counts}, cpus {os.cpu_count()}"
  )
  bandwidth = _read_bandwidth()
  rows = []
  for name, shape in shapes.items():
    rows += _measure(name, shape, bandwidth, thread_counts)
  print("\n    shape weights batch  jax tok/s torch tok/s  ratio  of bound identical")
  print("\n".join(rows))


if __name__ == "__main__":
  app.run(main)
