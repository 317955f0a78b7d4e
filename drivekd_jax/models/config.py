"""Network configurations and the attention-map request shared by every model.

Logical axis names used on parameters and caches (mapped to mesh axes by the rules table in
`drivekd_jax.train.sharding`):

  decoder:  "vocab", "embed", "mlp", "q_heads", "kv_heads", "head_dim", "norm"
  vision:   "vit_embed", "vit_mlp", "vit_qkv", "vit_heads", "vit_pos", "patch", "channels", "norm"
  projector:"proj_in", "embed"
  caches:   "cache_layers", "cache_batch", "cache_seq", "cache_kv_heads", "head_dim"
  activations (`layers.constrain`): "batch", "activation_length", "activation_embed",
            "q_heads", "vit_tokens"
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax.numpy as jnp

DTypeName = Literal["float32", "bfloat16", "float16"]


def as_dtype(name: str | jnp.dtype) -> jnp.dtype:
  """Maps a dtype name (as kept in hashable configs) to a jnp dtype."""
  return jnp.dtype(name)


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """A Qwen2 / Qwen2.5 / LLaMA decoder.

  Attributes:
    vocab_size: rows of the embedding table and of the head.
    hidden_size: model width D.
    num_layers: decoder blocks.
    num_heads: query heads H.
    num_kv_heads: key/value heads (GQA when < num_heads).
    intermediate_size: SwiGLU width.
    head_dim: per-head width; defaults to hidden_size // num_heads.
    rope_theta: RoPE base (1e6 for Qwen2.5, 1e4 for LLaMA-2).
    rms_norm_eps: RMSNorm epsilon (computed in fp32).
    qkv_bias: bias on q/k/v projections (Qwen2: True, LLaMA: False).
    tie_word_embeddings: head shares the embedding table.
    max_position_embeddings: informational; RoPE is computed on the fly.
    mrope_section: multimodal RoPE (Qwen2.5-VL): how many of the head_dim/2 rotary frequencies
      follow each position axis, in the order temporal, height, width (e.g. (16, 24, 24)); the
      decoder then also accepts positions `[B, 3, T]`. None: plain RoPE.
    attention_query_block: when > 0 and shorter than the sequence, attention runs over blocks
      of this many queries one after the other, each block's probabilities recomputed in the
      backward pass: at most one block's `[H, block, S]` probabilities live at once instead of
      every head's whole `[H, T, S]` (the results are the unblocked ones). 0: one block.
    fused_attention: layers that return no map call `jax.nn.dot_product_attention` (cuDNN or
      Pallas kernels where present) instead of the softmax attention of `layers.attention`.
    scan_layers: without a cache, each run of consecutive layers that hand back the same kinds
      of signal is one `lax.scan` (`layers.run_blocks`): compile time stops growing with depth.
      The parameters keep their per-layer layout (stacked per call, a transient copy).
    layer_remat: without a cache, what each layer keeps for its backward pass
      (`layers.REMAT_POLICIES`: "none", "dots", "full"). In an InternVL both switches also
      apply to the vision tower's blocks.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  intermediate_size: int
  head_dim: int | None = None
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = True
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 32768
  mrope_section: tuple[int, ...] | None = None
  attention_query_block: int = 0
  fused_attention: bool = False
  scan_layers: bool = False
  layer_remat: str = "none"

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


# `DecoderConfig` fields that change how a model computes, not its parameters or results: a
# checkpoint's model takes them from a run's `text_overrides` (`train.experiment.build_model`).
EXECUTION_FIELDS = ("attention_query_block", "fused_attention", "scan_layers", "layer_remat")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """An InternViT encoder (300M: LayerNorm + qkv bias; 6B: RMSNorm + q/k norm, no qkv bias)."""

  image_size: int = 448
  patch_size: int = 14
  num_channels: int = 3
  hidden_size: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  intermediate_size: int = 4096
  norm_type: Literal["layer_norm", "rms_norm"] = "layer_norm"
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  qk_normalization: bool = False
  layer_scale_init: float = 0.1

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  """InternVL3: InternViT -> drop CLS -> pixel shuffle -> mlp1 -> decoder.

  Attributes:
    vision: the vision tower.
    text: the language model.
    image_token_id: id of the image-context token whose positions receive image embeddings.
    downsample_ratio: pixel-shuffle ratio (0.5: 4 patches -> 1 token).
    vision_select_layer: which ViT layer's output feeds the projector (-1: last).
    dtype: compute dtype name; param_dtype: storage dtype name.
  """

  vision: VisionConfig
  text: DecoderConfig
  image_token_id: int = 151667
  downsample_ratio: float = 0.5
  vision_select_layer: int = -1
  dtype: DTypeName = "float32"
  param_dtype: DTypeName = "float32"

  @property
  def tokens_per_image(self) -> int:
    side = int(self.vision.grid_size * self.downsample_ratio)
    return side * side


@dataclasses.dataclass(frozen=True)
class MapRequest:
  """Which decoder layers hand back signals for distillation. Hashable, so it can be static.

  Every map is the head-averaged post-softmax attention probability in fp32, computed from the
  same q/k as the forward pass. Layers not named here never materialise a map.

  Attributes:
    full_layers: layers returning the whole map, `[B, L, L]` (query, key).
    text_to_image_layers: layers returning every query row against the image keys only,
      `[B, L, N]`, keys gathered at `image_key_positions` `[B, N]` passed to the forward call.
    hidden_layers: layers whose output hidden states `[B, L, D]` are returned.
  Indices may be negative; `resolve(num_layers)` maps them to `0..num_layers-1`.
  """

  full_layers: tuple[int, ...] = ()
  text_to_image_layers: tuple[int, ...] = ()
  hidden_layers: tuple[int, ...] = ()

  def resolve(self, num_layers: int) -> MapRequest:
    def fix(layers):
      out = []
      for layer in layers:
        idx = layer + num_layers if layer < 0 else layer
        if not 0 <= idx < num_layers:
          raise ValueError(f"layer {layer} is out of range for a {num_layers}-layer decoder")
        out.append(idx)
      return tuple(sorted(set(out)))

    return MapRequest(
      fix(self.full_layers), fix(self.text_to_image_layers), fix(self.hidden_layers)
    )

  @property
  def empty(self) -> bool:
    return not (self.full_layers or self.text_to_image_layers or self.hidden_layers)
