"""Janus-Pro configurations: the SigLIP understanding encoder, the VQ image tokenizer, the
generation modules, and the LLaMA decoder (a `DecoderConfig`), with the released presets.

Field names follow transformers' `JanusConfig` (`vision_config`, `vq_config`, `text_config`) so a
`config.json` maps onto them one to one (`from_hf_dict`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from drivekd_jax.models.config import DecoderConfig, VisionConfig

# Activations the released checkpoints use, by their transformers names.
ACTIVATIONS = ("gelu", "gelu_pytorch_tanh", "silu")


class JanusConfigError(ValueError):
  """A Janus `config.json` field that this implementation does not support."""


@dataclasses.dataclass(frozen=True)
class JanusVisionConfig:
  """The SigLIP-style understanding encoder and its aligner MLP.

  Attributes:
    encoder: the ViT shape (`VisionConfig`: LayerNorm, q/k/v bias, no CLS token, no layer scale).
    projection_dim: the aligner's width (the decoder's hidden size).
    depth: aligner layers (`fc1`, then `depth - 1` hidden layers each after an activation).
    hidden_act: activation of the encoder MLP and the aligner.
    num_image_tokens: tokens per image (the patch grid), also the image tokens generated.
  """

  encoder: VisionConfig
  projection_dim: int
  depth: int = 2
  hidden_act: str = "gelu"
  num_image_tokens: int = 576


@dataclasses.dataclass(frozen=True)
class JanusVQConfig:
  """The VQ image tokenizer (encoder, quantizer, decoder) and the generation modules.

  Attributes:
    embed_dim: codebook vector width.
    num_embeddings: codebook size (the image-token vocabulary).
    latent_channels: width of the encoder's output / decoder's input.
    in_channels, out_channels: image channels.
    base_channels, channel_multiplier, num_res_blocks: the conv tower (each level but the last
      halves the resolution; channels must be multiples of 32 for the GroupNorms).
    num_patches: side of the token grid (`num_patches ** 2` tokens per image).
    projection_dim: width of the generation aligner and of the generation head's hidden layer.
    num_hidden_layers: generation aligner layers.
    hidden_act: activation of the generation aligner and head.
    image_token_embed_dim: the decoder width the generation head reads.
  """

  embed_dim: int = 8
  num_embeddings: int = 16384
  latent_channels: int = 256
  in_channels: int = 3
  out_channels: int = 3
  base_channels: int = 128
  channel_multiplier: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  num_patches: int = 24
  projection_dim: int = 2048
  num_hidden_layers: int = 2
  hidden_act: str = "gelu"
  image_token_embed_dim: int = 2048

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.channel_multiplier) - 1)

  @property
  def image_size(self) -> int:
    """Side of the images the tokenizer encodes and decodes."""
    return self.num_patches * self.downsample

  @property
  def num_tokens(self) -> int:
    return self.num_patches * self.num_patches


@dataclasses.dataclass(frozen=True)
class JanusConfig:
  """A whole Janus model.

  Attributes:
    vision, vq: as above.
    text: the LLaMA decoder.
    image_token_id: the `<image_placeholder>` id replaced by image features.
    dtype, param_dtype: compute and parameter dtype names.
  """

  vision: JanusVisionConfig
  vq: JanusVQConfig
  text: DecoderConfig
  image_token_id: int = 100581
  dtype: str = "float32"
  param_dtype: str = "float32"


def _llama(**kw) -> DecoderConfig:
  return DecoderConfig(
    rope_theta=10_000.0, rms_norm_eps=1e-6, qkv_bias=False, max_position_embeddings=16384, **kw
  )


def _preset(width: int, layers: int, heads: int, inner: int) -> JanusConfig:
  siglip_large = VisionConfig(
    image_size=384,
    patch_size=16,
    hidden_size=1024,
    num_layers=24,
    num_heads=16,
    intermediate_size=4096,
    qkv_bias=True,
  )
  return JanusConfig(
    vision=JanusVisionConfig(encoder=siglip_large, projection_dim=width),
    vq=JanusVQConfig(projection_dim=width, image_token_embed_dim=width),
    text=_llama(
      vocab_size=102400,
      hidden_size=width,
      num_layers=layers,
      num_heads=heads,
      num_kv_heads=heads,
      intermediate_size=inner,
    ),
  )


# The released deepseek-community/Janus-Pro-{1B,7B} shapes (untied LM head).
PRESETS: dict[str, JanusConfig] = {
  "janus-pro-1b": _preset(width=2048, layers=24, heads=16, inner=5632),
  "janus-pro-7b": _preset(width=4096, layers=30, heads=32, inner=11008),
}


def _get(cfg: dict, key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
  if key in cfg and cfg[key] is not None:
    return cfg[key]
  if default is dataclasses.MISSING:
    raise JanusConfigError(f"{where}: required field {key!r} is missing")
  return default


def _square(value, key: str, where: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise JanusConfigError(f"{where}: non-square {key} {value} is not supported")
    value = value[0]
  return int(value)


def _activation(value: str, where: str) -> str:
  if value not in ACTIVATIONS:
    raise JanusConfigError(f"{where}: hidden_act {value!r} is not supported; one of {ACTIVATIONS}")
  return value


def vision_from_hf(cfg: dict, where: str) -> JanusVisionConfig:
  """A `JanusVisionConfig` from transformers' `vision_config` dict."""
  if cfg.get("use_qk_norm"):
    raise JanusConfigError(f"{where}: use_qk_norm=true is not supported")
  hidden = int(_get(cfg, "hidden_size", where, 1024))
  encoder = VisionConfig(
    image_size=_square(_get(cfg, "image_size", where, 384), "image_size", where),
    patch_size=_square(_get(cfg, "patch_size", where, 16), "patch_size", where),
    num_channels=int(_get(cfg, "num_channels", where, 3)),
    hidden_size=hidden,
    num_layers=int(_get(cfg, "num_hidden_layers", where, 24)),
    num_heads=int(_get(cfg, "num_attention_heads", where, 16)),
    intermediate_size=int(hidden * float(_get(cfg, "mlp_ratio", where, 4.0))),
    layer_norm_eps=float(_get(cfg, "layer_norm_eps", where, 1e-6)),
    qkv_bias=bool(_get(cfg, "attention_bias", where, True)),
  )
  if encoder.hidden_size % encoder.num_heads:
    raise JanusConfigError(f"{where}: hidden_size {hidden} is not divisible by the heads")
  grid = encoder.image_size // encoder.patch_size
  return JanusVisionConfig(
    encoder=encoder,
    projection_dim=int(_get(cfg, "projection_dim", where, 2048)),
    depth=int(_get(cfg, "depth", where, 2)),
    hidden_act=_activation(_get(cfg, "hidden_act", where, "gelu"), where),
    num_image_tokens=int(_get(cfg, "num_image_tokens", where, grid * grid)),
  )


def vq_from_hf(cfg: dict, where: str, num_patches: int) -> JanusVQConfig:
  """A `JanusVQConfig` from transformers' `vq_config` dict (`num_patches` from the vision grid,
  as `JanusConfig.__post_init__` sets it)."""
  if cfg.get("double_latent"):
    raise JanusConfigError(f"{where}: double_latent=true is not supported")
  vq = JanusVQConfig(
    embed_dim=int(_get(cfg, "embed_dim", where, 8)),
    num_embeddings=int(_get(cfg, "num_embeddings", where, 16384)),
    latent_channels=int(_get(cfg, "latent_channels", where, 256)),
    in_channels=int(_get(cfg, "in_channels", where, 3)),
    out_channels=int(_get(cfg, "out_channels", where, 3)),
    base_channels=int(_get(cfg, "base_channels", where, 128)),
    channel_multiplier=tuple(
      int(m) for m in _get(cfg, "channel_multiplier", where, (1, 1, 2, 2, 4))
    ),
    num_res_blocks=int(_get(cfg, "num_res_blocks", where, 2)),
    num_patches=num_patches,
    projection_dim=int(_get(cfg, "projection_dim", where, 2048)),
    num_hidden_layers=int(_get(cfg, "num_hidden_layers", where, 2)),
    hidden_act=_activation(_get(cfg, "hidden_act", where, "gelu"), where),
    image_token_embed_dim=int(_get(cfg, "image_token_embed_dim", where, 2048)),
  )
  widths = [vq.base_channels * m for m in (1, *vq.channel_multiplier)]
  if any(w % 32 for w in widths):
    raise JanusConfigError(
      f"{where}: channel widths {widths} must be multiples of 32 (GroupNorm with 32 groups)"
    )
  return vq
