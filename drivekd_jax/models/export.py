"""Writes our models as HuggingFace checkpoint directories: the inverse of `hf_import`.

`save_pretrained(model, path)` writes

* an `InternVL` as transformers' `InternVLForConditionalGeneration` (`model_type` "internvl",
  tensors `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*` and
  `lm_head.weight` unless the head is tied), the layout transformers itself saves;
* a `Qwen25VL` as `Qwen2_5_VLForConditionalGeneration` (`visual.*`, `model.*`, `lm_head.weight`
  unless tied), the layout transformers saves;
* a bare `Decoder` as `Qwen2ForCausalLM` (qkv bias) or `LlamaForCausalLM` (`model.*`,
  `lm_head.weight`).

The directory holds `config.json`, `model.safetensors` (or `model-0000i-of-0000n.safetensors`
shards with `model.safetensors.index.json` once the tensors exceed `max_shard_bytes`) and, when
`tokenizer_dir` is given, the tokenizer and processor files of the source checkpoint. Nothing is
pickled.

There is one name mapping: the tensor specs of `hf_import` (which checkpoint tensors make each of
our parameters, and how). Each parameter is split back into its checkpoint tensors by the inverse
of its spec's `combine` (transpose, fused q/k/v split, reshape), and every inverse is checked by
running the spec's own `combine` on the result, which must give the parameter back bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx

from drivekd_jax.models import hf_import
from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.models.qwen2 import Decoder
from drivekd_jax.models.qwen25_vl import Qwen25VL, Qwen25VLConfig

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer_config.json",
  "vocab.json",
  "merges.txt",
  "added_tokens.json",
  "special_tokens_map.json",
  "chat_template.json",
  "chat_template.jinja",
  "preprocessor_config.json",
  "processor_config.json",
  "generation_config.json",
)
"""Files copied from `tokenizer_dir` when present (text and JSON only: never weights, never
pickles)."""

_HF_VISION = "model.vision_tower."
_HF_PROJECTOR = "model.multi_modal_projector."
_HF_PROJECTOR_NAMES = ("layer_norm", "linear_1", "linear_2")
_HF_BODY = "model.language_model."
_HF_HEAD = "lm_head.weight"


def _split_fused_linear(param: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
  rows = np.cumsum([shape[0] for shape in shapes])[:-1]
  return [np.ascontiguousarray(part) for part in np.split(param.T, rows, axis=0)]


def _split_fused_bias(param: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
  return np.split(param, np.cumsum([shape[0] for shape in shapes])[:-1], axis=0)


_INVERSES: dict[Callable, Callable[[np.ndarray, Sequence[tuple[int, ...]]], list[np.ndarray]]] = {
  hf_import._linear_t: lambda p, shapes: [np.ascontiguousarray(p.T)],
  hf_import._conv_t: lambda p, shapes: [np.ascontiguousarray(p.transpose(3, 2, 0, 1))],
  hf_import._fused_linear_t: _split_fused_linear,
  hf_import._fused_bias: _split_fused_bias,
  hf_import._conv3d_t: lambda p, shapes: [np.ascontiguousarray(p.T.reshape(shapes[0]))],
}


def _invert(path: tuple, spec, param: np.ndarray) -> dict[str, np.ndarray]:
  """The checkpoint tensors of `spec` that `spec.combine` turns into `param`."""
  inverse = _INVERSES.get(spec.combine)
  if inverse is not None:
    parts = inverse(param, spec.shapes)
  elif len(spec.shapes) == 1 and int(np.prod(spec.shapes[0])) == param.size:
    parts = [param.reshape(spec.shapes[0])]  # the `_copy` reshapes
  else:
    raise AssertionError(f"{'/'.join(map(str, path))}: no inverse for its checkpoint spec")
  rebuilt = np.ascontiguousarray(spec.combine(*parts))
  param = np.ascontiguousarray(param)
  if rebuilt.shape != param.shape or rebuilt.tobytes() != param.tobytes():
    raise AssertionError(
      f"{'/'.join(map(str, path))}: the exported tensors do not load back to the parameter"
    )
  return dict(zip(spec.names, parts))


def text_config_dict(config: DecoderConfig) -> dict:
  """transformers' `Qwen2Config` / `LlamaConfig` fields for a decoder config."""
  if getattr(config, "mrope_section", None):
    raise ValueError("a multimodal-RoPE (Qwen2.5-VL) decoder has no Qwen2/LLaMA export")
  family = "qwen2" if config.qkv_bias else "llama"
  out = {
    "architectures": ["Qwen2ForCausalLM" if family == "qwen2" else "LlamaForCausalLM"],
    "model_type": family,
    "vocab_size": config.vocab_size,
    "hidden_size": config.hidden_size,
    "intermediate_size": config.intermediate_size,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "hidden_act": "silu",
    "max_position_embeddings": config.max_position_embeddings,
    "rms_norm_eps": config.rms_norm_eps,
    "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    "tie_word_embeddings": config.tie_word_embeddings,
  }
  if config.head_dim is not None:
    out["head_dim"] = config.head_dim
  if family == "qwen2":
    out["use_sliding_window"] = False
  else:
    out.update(attention_bias=False, mlp_bias=False)
  return out


def vision_config_dict(config: VisionConfig) -> dict:
  """transformers' `InternVLVisionConfig` fields for an InternViT config."""
  return {
    "model_type": "internvl_vision",
    "hidden_size": config.hidden_size,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "intermediate_size": config.intermediate_size,
    "hidden_act": "gelu",
    "norm_type": config.norm_type,
    "layer_norm_eps": config.layer_norm_eps,
    "attention_bias": config.qkv_bias,
    "use_qk_norm": config.qk_normalization,
    "image_size": [config.image_size, config.image_size],
    "patch_size": [config.patch_size, config.patch_size],
    "num_channels": config.num_channels,
    "layer_scale_init_value": config.layer_scale_init,
    "use_mean_pooling": True,
    "use_absolute_position_embeddings": True,
  }


def internvl_config_dict(config: InternVLConfig, dtype: str) -> dict:
  """transformers' `InternVLConfig` (`InternVLForConditionalGeneration`) for our config."""
  tied = config.text.tie_word_embeddings
  return {
    "architectures": ["InternVLForConditionalGeneration"],
    "model_type": "internvl",
    "vision_config": vision_config_dict(config.vision),
    "text_config": text_config_dict(config.text),
    "image_token_id": config.image_token_id,
    "image_seq_length": config.tokens_per_image,
    "downsample_ratio": config.downsample_ratio,
    "projector_hidden_act": "gelu",
    "vision_feature_layer": config.vision_select_layer,
    "vision_feature_select_strategy": "default",
    "tie_word_embeddings": tied,
    "dtype": dtype,
  }


def _internvl_specs(config: InternVLConfig) -> dict[tuple, hf_import._Spec]:
  vision, text = config.vision, config.text
  factor = round(1 / config.downsample_ratio)
  head = None if text.tie_word_embeddings else _HF_HEAD
  specs = hf_import._nest(
    ("vision_model",),
    hf_import._vision_specs(vision, _HF_VISION, original=False, stored_grid=vision.grid_size),
  )
  specs.update(
    hf_import._nest(
      ("mlp1",),
      hf_import._projector_specs(
        vision.hidden_size * factor * factor, text.hidden_size, _HF_PROJECTOR, _HF_PROJECTOR_NAMES
      ),
    )
  )
  specs.update(hf_import._nest(("language_model",), hf_import._decoder_specs(text, _HF_BODY, head)))
  return specs


def qwen25_vl_config_dict(config: Qwen25VLConfig, dtype: str) -> dict:
  """transformers' `Qwen2_5_VLConfig` (`Qwen2_5_VLForConditionalGeneration`) for our config."""
  text = text_config_dict(dataclasses.replace(config.text, mrope_section=None))
  del text["architectures"]
  text.pop("head_dim", None)  # the Qwen2.5-VL decoder derives it from the width
  text["model_type"] = "qwen2_5_vl_text"
  text["rope_parameters"] = {
    "rope_type": "default",
    "rope_theta": config.text.rope_theta,
    "mrope_section": list(config.text.mrope_section),
  }
  vision = config.vision
  return {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"],
    "model_type": "qwen2_5_vl",
    "text_config": text,
    "vision_config": {
      "model_type": "qwen2_5_vl_vision",
      "depth": vision.depth,
      "hidden_size": vision.hidden_size,
      "hidden_act": "silu",
      "intermediate_size": vision.intermediate_size,
      "num_heads": vision.num_heads,
      "in_channels": vision.in_channels,
      "patch_size": vision.patch_size,
      "spatial_merge_size": vision.spatial_merge_size,
      "temporal_patch_size": vision.temporal_patch_size,
      "window_size": vision.window_size,
      "out_hidden_size": vision.out_hidden_size,
      "fullatt_block_indexes": list(vision.fullatt_block_indexes),
      "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
    },
    "image_token_id": config.image_token_id,
    "tie_word_embeddings": config.text.tie_word_embeddings,
    "dtype": dtype,
  }


def _qwen25_vl_specs(config: Qwen25VLConfig) -> dict[tuple, hf_import._Spec]:
  head = None if config.text.tie_word_embeddings else _HF_HEAD
  # transformers 5 saves Qwen2.5-VL under the hub's names (`visual.*`, `model.*`), not its
  # in-memory ones; so does this, which older transformers releases read as well.
  specs = hf_import._nest(("visual",), hf_import._qwen25_vision_specs(config.vision, "visual."))
  specs.update(
    hf_import._nest(("language_model",), hf_import._decoder_specs(config.text, "model.", head))
  )
  return specs


def _decoder_specs(config: DecoderConfig) -> dict[tuple, hf_import._Spec]:
  head = None if config.tie_word_embeddings else _HF_HEAD
  return hf_import._decoder_specs(config, "model.", head)


def _model_layout(
  model: InternVL | Qwen25VL | Decoder,
) -> tuple[dict, dict[tuple, hf_import._Spec], str]:
  if not isinstance(model, (InternVL, Qwen25VL, Decoder)):
    raise TypeError(
      f"save_pretrained takes an InternVL, a Qwen25VL or a Decoder, got {type(model).__name__}"
    )
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  dtype = jnp.dtype(leaves[0].dtype).name if leaves else "float32"
  if isinstance(model, InternVL):
    return internvl_config_dict(model.config, dtype), _internvl_specs(model.config), dtype
  if isinstance(model, Qwen25VL):
    return qwen25_vl_config_dict(model.config, dtype), _qwen25_vl_specs(model.config), dtype
  config = dict(text_config_dict(model.config), dtype=dtype)
  return config, _decoder_specs(model.config), dtype


def _tensors(model, specs, dtype) -> dict[str, np.ndarray]:
  """Every checkpoint tensor, name -> host array in `dtype` (one parameter gathered at a time)."""
  flat = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  if set(flat) != set(specs):  # a bug in this file or in hf_import, not in the model
    raise AssertionError(
      f"exporter/model mismatch: model-only {sorted(set(flat) - set(specs))[:5]}, "
      f"spec-only {sorted(set(specs) - set(flat))[:5]}"
    )
  tensors: dict[str, np.ndarray] = {}
  for path, spec in specs.items():
    param = np.asarray(jax.device_get(flat[path].get_value())).astype(jnp.dtype(dtype), copy=False)
    tensors.update(_invert(path, spec, param))
  return tensors


def _write_shards(tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int) -> list:
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    nbytes = tensors[name].nbytes
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = np.ascontiguousarray(tensors[name])
    size += nbytes
  metadata = {"format": "pt"}
  if len(shards) == 1:
    safetensors.numpy.save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata)
    return ["model.safetensors"]
  names, weight_map = [], {}
  for i, shard in enumerate(shards):
    filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(shard, os.path.join(directory, filename), metadata)
    weight_map.update({name: filename for name in shard})
    names.append(filename)
  total = sum(t.nbytes for t in tensors.values())
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)
  return names


def save_pretrained(
  model: InternVL | Qwen25VL | Decoder,
  path: str | os.PathLike,
  *,
  tokenizer_dir: str | os.PathLike | None = None,
  dtype: str | jnp.dtype | None = None,
  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
  """Writes `model` as a HuggingFace checkpoint directory (see the module docstring).

  Args:
    model: an `InternVL`, a `Qwen25VL` or a bare `Decoder` (parameters may be sharded; each is
      gathered to the host on its own).
    path: the directory to write (created; files of the same names are replaced).
    tokenizer_dir: the source checkpoint whose `TOKENIZER_FILES` are copied along.
    dtype: storage dtype of the tensors (default: the parameters' dtype).
    max_shard_bytes: largest shard before a new one starts (a tensor is never split).

  Returns:
    The names of the files written, relative to `path`.
  """
  directory = os.fspath(path)
  os.makedirs(directory, exist_ok=True)
  config, specs, param_dtype = _model_layout(model)
  dtype = jnp.dtype(dtype or param_dtype).name
  for name in os.listdir(directory):  # a previous export's shards would shadow this one's
    if name.startswith("model") and name.endswith((".safetensors", ".safetensors.index.json")):
      os.remove(os.path.join(directory, name))
  config["dtype"] = dtype
  written = _write_shards(_tensors(model, specs, dtype), directory, max_shard_bytes)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  written.append("config.json")
  if tokenizer_dir is not None:
    source = os.fspath(tokenizer_dir)
    if not os.path.isdir(source):
      raise FileNotFoundError(f"tokenizer_dir {source} is not a directory")
    for name in TOKENIZER_FILES:
      if os.path.isfile(os.path.join(source, name)):
        shutil.copyfile(os.path.join(source, name), os.path.join(directory, name))
        written.append(name)
  return written
