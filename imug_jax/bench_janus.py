"""Janus speed: our jitted generation vs transformers on the same random weights (fp32).

  python -m imug_jax.bench_janus [--shapes=tiny,small] [--batch_sizes=1,4] [--repeats=3]

A random transformers `JanusForConditionalGeneration` of each shape is written with
`save_pretrained` and read back with `imug_jax.models.janus.from_pretrained`. Both shapes have
SigLIP 96 px / patch 8 -> 144 image tokens and a VQ of 96 px with 4 levels (base 32 channels);
  tiny   LLaMA width 64, 2 layers, 4 heads, SwiGLU 128, vocabulary 512, codebook 256 (the size
         of the parity tests' tiny random configs);
  small  LLaMA width 256, 4 layers, 8 heads, SwiGLU 704, vocabulary 4096, codebook 1024 (about
         the "student" shape of `drivekd_jax.bench.decode`, whose batch-1 decoding is bound by
         weight streaming on CPU).

* Image generation: CFG (scale 5) greedy image tokens for a 16-token prompt, then the VQ decode to
  pixels; image tokens/s over the batch and seconds per image, batch 1 and 4. transformers runs
  `generate(generation_mode="image")` + `decode_image_tokens`.
* Text decoding: `text_tokens` greedy tokens after a prompt with one image, batch 1.

Times are the best of `repeats` runs after a warm-up (for JAX the warm-up is the compile); both
sides' tokens are compared, so a speed-up cannot come from doing something else.
"""

from __future__ import annotations

import tempfile
import time

import jax
import numpy as np
from absl import app, flags

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "4"], "Image-generation batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per side; the best is reported.")
_TEXT_TOKENS = flags.DEFINE_integer("text_tokens", 32, "Greedy text tokens per row.")
SHAPES = {
  "tiny": dict(width=64, layers=2, heads=4, mlp=128, vocab=512, codes=256, vision=32),
  "small": dict(width=256, layers=4, heads=8, mlp=704, vocab=4096, codes=1024, vision=128),
}
_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Model shapes: {list(SHAPES)}.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "torch intra-op threads (0: default).")

BOS, BOI, PAD, IMAGE = 1, 2, 0, 3
GUIDANCE = 5.0


def random_janus(directory: str, shape: dict, seed: int = 0):
  """A random transformers Janus of `shape` (a `SHAPES` entry), saved to `directory`."""
  import torch
  import transformers

  width = shape["width"]
  config = transformers.JanusConfig(
    vision_config=dict(
      hidden_size=shape["vision"],
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=96,
      patch_size=8,
      projection_dim=width,
      num_image_tokens=144,
    ),
    vq_config=dict(
      embed_dim=8,
      num_embeddings=shape["codes"],
      latent_channels=64,
      base_channels=32,
      channel_multiplier=[1, 1, 2, 2],
      num_res_blocks=1,
      projection_dim=width,
      image_token_embed_dim=width,
    ),
    text_config=dict(
      model_type="llama",
      vocab_size=shape["vocab"],
      hidden_size=width,
      num_hidden_layers=shape["layers"],
      num_attention_heads=shape["heads"],
      num_key_value_heads=shape["heads"],
      intermediate_size=shape["mlp"],
    ),
    image_token_id=IMAGE,
  )
  torch.manual_seed(seed)
  model = transformers.JanusForConditionalGeneration(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != "lm_head.weight":
        is_scale = "norm" in name and name.endswith("weight")
        p.copy_((1.0 if is_scale else 0.0) + 0.05 * torch.randn_like(p))
  model.config._attn_implementation = "sdpa"
  model.generation_config.bos_token_id = BOS
  model.generation_config.pad_token_id = PAD
  model.generation_config.eos_token_id = None
  model.generation_config.generation_kwargs = {"boi_token_id": BOI}
  model.save_pretrained(directory)
  return model.eval()


def _best(fn, repeats: int) -> tuple[float, object]:
  fn()  # warm-up / compile
  best, out = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    out = fn()
    best = min(best, time.perf_counter() - start)
  return best, out


def _measure(name: str, shape: dict, repeats: int, rng) -> list[tuple]:
  import torch

  from imug_jax.models.janus import from_pretrained
  from imug_jax.models.janus.generate import JanusGenerator

  rows = []
  with tempfile.TemporaryDirectory() as directory:
    reference = random_janus(directory, shape)
    ours = JanusGenerator(from_pretrained(directory))
    num_tokens = ours.config.vq.num_tokens

    for batch in (int(b) for b in _BATCH_SIZES.value):
      ids = rng.integers(4, shape["vocab"], size=(batch, 16))
      ids[:, 0], ids[:, -1] = BOS, BOI

      def run_jax(ids=ids):
        codes = ours.image_tokens(ids, bos_id=BOS, boi_id=BOI, pad_id=PAD, guidance=GUIDANCE)
        return codes, jax.block_until_ready(ours.decode(codes))

      def run_torch(ids=ids):
        with torch.no_grad():
          codes = reference.generate(
            torch.tensor(ids),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            generation_mode="image",
            do_sample=False,
            guidance_scale=GUIDANCE,
          )
          return codes.numpy(), reference.decode_image_tokens(codes)

      ours_s, (ours_codes, _) = _best(run_jax, repeats)
      theirs_s, (their_codes, _) = _best(run_torch, repeats)
      same = bool(np.array_equal(ours_codes, their_codes))
      rows.append(
        (
          name,
          "image",
          batch,
          batch * num_tokens / ours_s,
          ours_s / batch,
          batch * num_tokens / theirs_s,
          theirs_s / batch,
          same,
        )
      )

    ids = rng.integers(4, shape["vocab"], size=(1, 16 + 144))
    ids[0, 4 : 4 + 144] = IMAGE
    pixels = rng.uniform(-1, 1, size=(1, 96, 96, 3)).astype(np.float32)
    new = _TEXT_TOKENS.value

    def text_jax():
      return np.asarray(ours.text(ids, pixels, max_new_tokens=new).tokens)

    def text_torch():
      with torch.no_grad():
        out = reference.generate(
          torch.tensor(ids),
          pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
          max_new_tokens=new,
          min_new_tokens=new,
          do_sample=False,
        )
      return out[:, ids.shape[1] :].numpy()

    ours_s, ours_tokens = _best(text_jax, repeats)
    theirs_s, their_tokens = _best(text_torch, repeats)
    same = bool(np.array_equal(ours_tokens, their_tokens))
    rows.append((name, "text", 1, new / ours_s, ours_s, new / theirs_s, theirs_s, same))

  return rows


def main(argv):
  del argv
  import torch

  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  repeats = _REPEATS.value
  rng = np.random.default_rng(0)
  rows = []
  for shape_name in _SHAPES.value:
    rows += _measure(shape_name, SHAPES[shape_name], repeats, rng)
  print(f"JAX backend: {jax.default_backend()}; torch threads: {torch.get_num_threads()}")
  print(
    "| shape | task | batch | ours tok/s | ours s/item | transformers tok/s | transformers s/item "
    "| speed-up | same tokens |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for shape, task, batch, ours_tps, ours_item, their_tps, their_item, same in rows:
    print(
      f"| {shape} | {task} | {batch} | {ours_tps:.0f} | {ours_item:.3f} | {their_tps:.0f} | "
      f"{their_item:.3f} | {their_item / ours_item:.1f}x | {same} |"
    )


if __name__ == "__main__":
  app.run(main)
