"""InternVL3 shapes, 1B to 78B, and tiny configs for tests and demos.

Language models are the Qwen2.5 shapes InternVL3 is built on (`docs/data_formats.md`
§3.5); vision towers are InternViT-300M-448px-V2_5 (1B-14B) and InternViT-6B-448px-V2_5 (38B,
78B; 45 layers, RMSNorm, q/k norm, no qkv bias). The vocabulary is 151674 (InternVL3 adds its
special tokens to Qwen2.5's 151643 + 22). Heads are untied for every size: InternVL builds the
LLM with `tie_word_embeddings=False`, and the 1B checkpoint's size (1.88 GB bf16 = 0.938 B
parameters) only fits an untied head.
"""

from __future__ import annotations

import dataclasses

from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
from drivekd_jax.models.qwen25_vl import Qwen25VisionConfig, Qwen25VLConfig

VOCAB_SIZE = 151674
IMAGE_TOKEN_ID = 151667

VIT_300M = VisionConfig(
  image_size=448,
  patch_size=14,
  hidden_size=1024,
  num_layers=24,
  num_heads=16,
  intermediate_size=4096,
  norm_type="layer_norm",
  layer_norm_eps=1e-6,
  qkv_bias=True,
  qk_normalization=False,
)

VIT_6B = VisionConfig(
  image_size=448,
  patch_size=14,
  hidden_size=3200,
  num_layers=45,
  num_heads=25,
  intermediate_size=12800,
  norm_type="rms_norm",
  layer_norm_eps=1e-6,
  qkv_bias=False,
  qk_normalization=True,
)


def _qwen25(hidden, layers, heads, kv_heads, ffn) -> DecoderConfig:
  return DecoderConfig(
    vocab_size=VOCAB_SIZE,
    hidden_size=hidden,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    intermediate_size=ffn,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_word_embeddings=False,
  )


_FULL = {
  "1B": (VIT_300M, _qwen25(896, 24, 14, 2, 4864)),  # Qwen2.5-0.5B
  "2B": (VIT_300M, _qwen25(1536, 28, 12, 2, 8960)),  # Qwen2.5-1.5B
  "8B": (VIT_300M, _qwen25(3584, 28, 28, 4, 18944)),  # Qwen2.5-7B
  "14B": (VIT_300M, _qwen25(5120, 48, 40, 8, 13824)),  # Qwen2.5-14B
  "38B": (VIT_6B, _qwen25(5120, 64, 40, 8, 27648)),  # Qwen2.5-32B
  "78B": (VIT_6B, _qwen25(8192, 80, 64, 8, 29568)),  # Qwen2.5-72B
}

# Tiny shapes for tests and the demo. 56 px images with patch 14 give a 4x4 grid, i.e. 4 image
# tokens after the pixel shuffle. "tiny" is 300M-style, "tiny-6b" 6B-style (RMSNorm + q/k norm).
_TINY_TEXT = DecoderConfig(
  vocab_size=512,
  hidden_size=64,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  intermediate_size=128,
  rope_theta=1_000_000.0,
  qkv_bias=True,
  tie_word_embeddings=False,
)
_TINY_VIT = VisionConfig(
  image_size=56, patch_size=14, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64
)
_TINY = {
  "tiny": (_TINY_VIT, _TINY_TEXT),
  "tiny-6b": (
    dataclasses.replace(_TINY_VIT, norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
    _TINY_TEXT,
  ),
}
TINY_IMAGE_TOKEN_ID = 500

NAMES = tuple(_FULL) + tuple(_TINY)


def internvl3(
  name: str,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  image_token_id: int | None = None,
  **text_overrides,
) -> InternVLConfig:
  """The InternVL3 config called `name` ("1B", "2B", "8B", "14B", "38B", "78B", "tiny",
  "tiny-6b").

  `image_token_id` overrides the `<IMG_CONTEXT>` id (151667; 500 for the tiny presets) and
  `text_overrides` replace `DecoderConfig` fields (e.g. `vocab_size` for a demo tokenizer,
  `tie_word_embeddings`).
  """
  if name in _FULL:
    vision, text = _FULL[name]
    default_token_id = IMAGE_TOKEN_ID
  elif name in _TINY:
    vision, text = _TINY[name]
    default_token_id = TINY_IMAGE_TOKEN_ID
  else:
    raise ValueError(f"unknown InternVL3 preset {name!r}; known: {', '.join(NAMES)}")
  text = dataclasses.replace(text, **text_overrides)
  if image_token_id is None:
    image_token_id = default_token_id
  if not 0 <= image_token_id < text.vocab_size:
    raise ValueError(
      f"image_token_id {image_token_id} is outside the vocabulary (vocab_size {text.vocab_size})"
    )
  return InternVLConfig(
    vision=vision,
    text=text,
    image_token_id=image_token_id,
    downsample_ratio=0.5,
    vision_select_layer=-1,
    dtype=dtype,
    param_dtype=param_dtype or dtype,
  )


# Qwen2.5-VL-{3B,7B,32B,72B}-Instruct (their config.json files): one vision tower design (32
# blocks of width 1280, SwiGLU width 3420, 3456 for 32B/72B, full attention in blocks 7/15/23/31,
# 112 px windows) whose merger maps into the decoder width; Qwen2.5 decoders with M-RoPE sections
# (16, 24, 24). Only the 3B ties its head.
QWEN25_VL_IMAGE_TOKEN_ID = 151655
_QWEN25_MROPE = (16, 24, 24)


def _qwen25_vl(hidden, layers, heads, kv_heads, ffn, vocab, tied, vit_ffn=3420) -> Qwen25VLConfig:
  text = DecoderConfig(
    vocab_size=vocab,
    hidden_size=hidden,
    num_layers=layers,
    num_heads=heads,
    num_kv_heads=kv_heads,
    intermediate_size=ffn,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    qkv_bias=True,
    tie_word_embeddings=tied,
    max_position_embeddings=128000,
    mrope_section=_QWEN25_MROPE,
  )
  vision = Qwen25VisionConfig(intermediate_size=vit_ffn, out_hidden_size=hidden)
  return Qwen25VLConfig(vision=vision, text=text)


_QWEN25_VL_FULL = {
  "3B": _qwen25_vl(2048, 36, 16, 2, 11008, 151936, True),
  "7B": _qwen25_vl(3584, 28, 28, 4, 18944, 152064, False),
  "32B": _qwen25_vl(5120, 64, 40, 8, 27648, 152064, False, vit_ffn=3456),
  "72B": _qwen25_vl(8192, 80, 64, 8, 29568, 152064, False, vit_ffn=3456),
}
# A tiny Qwen2.5-VL for tests and the demo: 56 px windows (2x2 merged tokens), full attention in
# the last vision block; head_dim 16 gives 8 rotary frequencies, split (2, 3, 3).
_QWEN25_VL_TINY = Qwen25VLConfig(
  vision=Qwen25VisionConfig(
    hidden_size=32,
    depth=2,
    num_heads=4,
    intermediate_size=64,
    window_size=56,
    out_hidden_size=_TINY_TEXT.hidden_size,
    fullatt_block_indexes=(1,),
  ),
  text=dataclasses.replace(_TINY_TEXT, mrope_section=(2, 3, 3)),
)
QWEN25_VL_NAMES = tuple(_QWEN25_VL_FULL) + ("tiny",)


def qwen25_vl(
  name: str,
  *,
  dtype: str = "float32",
  param_dtype: str | None = None,
  image_token_id: int | None = None,
  **text_overrides,
) -> Qwen25VLConfig:
  """The Qwen2.5-VL config called `name` ("3B", "7B", "32B", "72B", "tiny").

  `image_token_id` overrides `<|image_pad|>` (151655; 500 for "tiny") and `text_overrides`
  replace `DecoderConfig` fields (e.g. `vocab_size`, `tie_word_embeddings`); the vision merger
  follows the decoder's `hidden_size`.
  """
  if name in _QWEN25_VL_FULL:
    config, default_token_id = _QWEN25_VL_FULL[name], QWEN25_VL_IMAGE_TOKEN_ID
  elif name == "tiny":
    config, default_token_id = _QWEN25_VL_TINY, TINY_IMAGE_TOKEN_ID
  else:
    raise ValueError(f"unknown Qwen2.5-VL preset {name!r}; known: {', '.join(QWEN25_VL_NAMES)}")
  text = dataclasses.replace(config.text, **text_overrides)
  image_token_id = default_token_id if image_token_id is None else image_token_id
  if not 0 <= image_token_id < text.vocab_size:
    raise ValueError(
      f"image_token_id {image_token_id} is outside the vocabulary (vocab_size {text.vocab_size})"
    )
  return dataclasses.replace(
    config,
    vision=dataclasses.replace(config.vision, out_hidden_size=text.hidden_size),
    text=text,
    image_token_id=image_token_id,
    dtype=dtype,
    param_dtype=param_dtype or dtype,
  )


QWEN25_VL_PREFIX = "qwen2.5-vl-"


def model_config(name: str, **kwargs) -> InternVLConfig | Qwen25VLConfig:
  """The config of any preset: `"qwen2.5-vl-<size>"` (e.g. "qwen2.5-vl-3B", "qwen2.5-vl-tiny")
  is `qwen25_vl(<size>)`, every other name `internvl3(name)`; `kwargs` go to that function."""
  if name.startswith(QWEN25_VL_PREFIX):
    return qwen25_vl(name[len(QWEN25_VL_PREFIX) :], **kwargs)
  return internvl3(name, **kwargs)
