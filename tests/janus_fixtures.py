"""Tiny random transformers Janus models written with `save_pretrained`, for the Janus tests."""

from __future__ import annotations

import torch
import transformers

IMAGE_TOKEN_ID = 100
BOS_ID, BOI_ID, EOI_ID, PAD_ID, EOS_ID = 1, 101, 102, 0, 2

# Two tiny shapes: (1) untied head, GQA 2, aligner depth 2, VQ levels (1, 2, 2) x 1 block, gelu;
# (2) tied head, MHA, aligner depth 3, VQ levels (1, 1, 2) x 2 blocks with conv shortcuts, silu.
CASES = {
  "untied_gqa": dict(
    vision=dict(depth=2),
    vq=dict(channel_multiplier=[1, 2, 2], num_res_blocks=1, num_hidden_layers=2, hidden_act="gelu"),
    text=dict(num_attention_heads=4, num_key_value_heads=2),
    tied=False,
  ),
  "tied_mha": dict(
    vision=dict(depth=3),
    vq=dict(channel_multiplier=[1, 1, 2], num_res_blocks=2, num_hidden_layers=3, hidden_act="silu"),
    text=dict(num_attention_heads=4, num_key_value_heads=4),
    tied=True,
  ),
}


def hf_config(
  case: str, vocab_size: int = 128, image_token_id: int = IMAGE_TOKEN_ID
) -> transformers.JanusConfig:
  spec = CASES[case]
  width = 48
  return transformers.JanusConfig(
    vision_config=dict(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      image_size=16,
      patch_size=4,
      mlp_ratio=2.0,
      projection_dim=width,
      num_image_tokens=16,
      **spec["vision"],
    ),
    vq_config=dict(
      embed_dim=8,
      num_embeddings=64,
      latent_channels=32,
      base_channels=32,
      projection_dim=width,
      image_token_embed_dim=width,
      **spec["vq"],
    ),
    text_config=dict(
      model_type="llama",
      vocab_size=vocab_size,
      hidden_size=width,
      num_hidden_layers=2,
      intermediate_size=96,
      rope_theta=10000.0,
      max_position_embeddings=512,
      tie_word_embeddings=spec["tied"],
      **spec["text"],
    ),
    image_token_id=image_token_id,
    tie_word_embeddings=spec["tied"],
  )


def hf_janus(case: str, seed: int = 0, **config) -> transformers.JanusForConditionalGeneration:
  """A tiny random Janus with every weight randomised (norm scales around 1)."""
  torch.manual_seed(seed)
  model = transformers.JanusForConditionalGeneration(hf_config(case, **config))
  tied = CASES[case]["tied"]
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "lm_head.weight" and tied:
        continue
      is_scale = "norm" in name and name.endswith("weight")
      p.copy_((1.0 if is_scale else 0.0) + 0.15 * torch.randn_like(p))
  model.config._attn_implementation = "eager"
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = PAD_ID
  return model.eval()


def tiny_rollout_janus(tokenizer, seed: int = 0):
  """A tiny random Flax Janus whose vocabulary fits `tokenizer` (16 px images, 16 tokens each)."""
  from flax import nnx

  from drivekd_jax.models.config import DecoderConfig, VisionConfig
  from imug_jax.models.janus import Janus, JanusConfig, JanusVisionConfig, JanusVQConfig

  config = JanusConfig(
    vision=JanusVisionConfig(
      encoder=VisionConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
      ),
      projection_dim=48,
      num_image_tokens=16,
    ),
    vq=JanusVQConfig(
      embed_dim=8,
      num_embeddings=64,
      latent_channels=32,
      base_channels=32,
      channel_multiplier=(1, 2, 2),
      num_res_blocks=1,
      num_patches=4,
      projection_dim=48,
      image_token_embed_dim=48,
    ),
    text=DecoderConfig(
      vocab_size=tokenizer.vocab_size,
      hidden_size=48,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      intermediate_size=96,
      qkv_bias=False,
      rope_theta=1e4,
    ),
    image_token_id=tokenizer.image_id,
  )
  janus = Janus(config, rngs=nnx.Rngs(seed))
  # Weights of the parity fixtures' scale (norm scales around 1), so that every input matters.
  import jax

  flat = nnx.to_flat_state(nnx.state(janus, nnx.Param))
  keys = jax.random.split(jax.random.key(seed), len(flat))
  for (path, variable), key in zip(flat, keys):
    base = 1.0 if path[-1] == "scale" else 0.0
    variable.set_value(base + 0.15 * jax.random.normal(key, variable.shape))
  return janus
