"""Builds our Flax models from local HuggingFace checkpoint directories (no torch, no network).

Supported layouts (picked from `config.json`'s `architectures`, else `model_type`):

* `InternVLForConditionalGeneration` (`OpenGVLab/InternVL3-*-hf`, transformers' InternVL): keys
  `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*` and
  `language_model.lm_head.weight` (the converted hub files), or the same with a leading `model.`
  and a bare `lm_head.weight` (another save convention); the vision q/k/v projections are
  separate and are fused here into `qkv`.
* `InternVLChatModel` (`OpenGVLab/InternVL3-*`, the original remote code): `vision_model.*`,
  `mlp1.{0,1,3}.*`, `language_model.model.*`, `language_model.lm_head.weight`; config with
  `vision_config` / `llm_config`.
* `Qwen2_5_VLForConditionalGeneration`: `model.visual.*`, `model.language_model.*` (transformers
  5) or `visual.*`, `model.*` (the hub files), `lm_head.weight` -> a `Qwen25VL`; the Conv3d patch
  weight `[D, C, T, p, p]` becomes the linear kernel `[C*T*p*p, D]`.
* `Qwen2ForCausalLM` / `LlamaForCausalLM`: `model.*`, `lm_head.weight` -> a bare `Decoder`.

Tensors are read lazily from the safetensors files (single file, or sharded with
`model.safetensors.index.json`) through a memory map of each file, so one tensor at a time is
materialised; bf16 works without torch (via `ml_dtypes`). Each is transposed to our layout (Linear
`[out, in]` -> `[in, out]`, conv `[O, I, kh, kw]` -> `[kh, kw, I, O]`), cast to the asked dtype and
optionally placed straight into its sharding. The head is loaded when the checkpoint has one and
tied to the embedding otherwise. Anything that does not fit (a missing or unexpected tensor, a
wrong shape, an unknown architecture or unsupported option) raises `CheckpointError` naming the
file, the tensor, what was found and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
from drivekd_jax.models.intern_vit import torch_bicubic_matrix
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.models.qwen2 import Decoder
from drivekd_jax.models.qwen25_vl import Qwen25VisionConfig, Qwen25VL, Qwen25VLConfig
from drivekd_jax.paths import path_component_problem

DEFAULT_IMAGE_TOKEN_ID = 151667
_IMG_CONTEXT = "<IMG_CONTEXT>"

_SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
  "F8_E4M3": ml_dtypes.float8_e4m3fn,
  "F8_E5M2": ml_dtypes.float8_e5m2,
  "I64": np.int64,
  "I32": np.int32,
  "I16": np.int16,
  "I8": np.int8,
  "U8": np.uint8,
  "BOOL": np.bool_,
}

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})

# Buffers some exporters write that carry no parameters.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
  """A checkpoint directory that does not match the model it claims to be."""


# ---------------------------------------------------------------------------------------------
# Reading safetensors


def _is_count(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _header_entry_problem(info: Any) -> str | None:
  """Why a safetensors header entry is malformed, or None."""
  if not isinstance(info, dict):
    return f"is {type(info).__name__}, expected {{'dtype', 'shape', 'data_offsets'}}"
  if not isinstance(info.get("dtype"), str):
    return f"has dtype {info.get('dtype')!r}, expected a string such as 'BF16'"
  shape = info.get("shape")
  if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
    return f"has shape {shape!r}, expected a list of non-negative integers"
  offsets = info.get("data_offsets")
  if (
    not isinstance(offsets, list)
    or len(offsets) != 2
    or not all(_is_count(o) for o in offsets)
    or offsets[0] > offsets[1]
  ):
    return f"has data_offsets {offsets!r}, expected [start, end] with 0 <= start <= end"
  return None


class _SafetensorsFile:
  """One `.safetensors` file: its header, and tensors as read-only views of a memory map."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      prefix = f.read(8)
      if len(prefix) < 8:
        raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
      header_len = int.from_bytes(prefix, "little")
      if header_len > size - 8:
        raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}")
      try:
        header = json.loads(f.read(header_len))
      except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
      raise CheckpointError(f"{path}: the safetensors header is {type(header).__name__}, not {{}}")
    header.pop("__metadata__", None)
    for name, info in header.items():
      problem = _header_entry_problem(info)
      if problem:
        raise CheckpointError(f"{path}: header entry of tensor {name!r} {problem}")
    self.header: dict[str, dict[str, Any]] = header
    self.data_start = 8 + header_len
    self.size = size
    self._map = None

  def names(self) -> list[str]:
    return list(self.header)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.header[name]["shape"])

  def dtype_name(self, name: str) -> str:
    return self.header[name]["dtype"]

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    dtype_name = info["dtype"]
    if dtype_name not in _SAFETENSORS_DTYPES:
      raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if end - start != int(np.prod(shape)) * dtype.itemsize or self.data_start + end > self.size:
      raise CheckpointError(
        f"{self.path}: tensor {name!r} ({dtype_name} {list(shape)}) has byte range "
        f"[{start}, {end}) that does not fit its shape or the file ({self.size} bytes)"
      )
    if self._map is None:
      self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
    raw = self._map[self.data_start + start : self.data_start + end]
    return raw.view(dtype).reshape(shape)


class _Checkpoint:
  """All tensors of a checkpoint directory, by name, with the file each lives in."""

  def __init__(self, directory: str):
    index_path = os.path.join(directory, "model.safetensors.index.json")
    self.files: dict[str, _SafetensorsFile] = {}
    self.location: dict[str, str] = {}
    if os.path.exists(index_path):
      try:
        with open(index_path) as f:
          weight_map = json.load(f)["weight_map"]
      except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' ({e})") from e
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
      for name, filename in weight_map.items():
        problem = path_component_problem(filename)
        if problem is not None:  # The index must not send us outside the checkpoint folder.
          raise CheckpointError(
            f"{index_path}: weight_map entry of tensor {name!r}: the file name {problem}"
          )
        path = os.path.join(directory, filename)
        if path not in self.files:
          if not os.path.exists(path):
            raise CheckpointError(
              f"{index_path}: tensor {name!r} is mapped to {filename}, which does not exist"
            )
          self.files[path] = _SafetensorsFile(path)
        if name not in self.files[path].header:
          raise CheckpointError(
            f"{index_path}: tensor {name!r} is mapped to {filename}, which does not contain it"
          )
        self.location[name] = path
    else:
      names = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
      if not names:
        raise CheckpointError(f"{directory}: no *.safetensors file and no index")
      for filename in names:
        path = os.path.join(directory, filename)
        file = self.files[path] = _SafetensorsFile(path)
        for name in file.names():
          if name in self.location:
            raise CheckpointError(
              f"{directory}: tensor {name!r} is in both {self.location[name]} and {path}"
            )
          self.location[name] = path

  def __contains__(self, name: str) -> bool:
    return name in self.location

  def names(self) -> list[str]:
    return list(self.location)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.files[self.location[name]].shape(name)

  def dtype_name(self, name: str) -> str:
    return self.files[self.location[name]].dtype_name(name)

  def get(self, name: str) -> np.ndarray:
    return self.files[self.location[name]].get(name)

  def file_of(self, name: str) -> str:
    return self.location[name]


# ---------------------------------------------------------------------------------------------
# Configs


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise CheckpointError(f"{path} does not exist")
  try:
    with open(path) as f:
      value = json.load(f)
  except (ValueError, RecursionError) as e:
    raise CheckpointError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(value, dict):
    raise CheckpointError(f"{path}: expected a JSON object, got {type(value).__name__}")
  return value


# The type every numeric or nested config field must have (checked where it is read).
_INT_FIELDS = frozenset(
  {
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "num_channels",
    "depth",
    "num_heads",
    "temporal_patch_size",
    "spatial_merge_size",
    "window_size",
    "out_hidden_size",
    "image_token_id",
  }
)
_FLOAT_FIELDS = frozenset({"rms_norm_eps", "layer_norm_eps"})
_DICT_FIELDS = frozenset({"llm_config", "vision_config", "text_config"})


def _field(cfg: dict, key: str, where: str, default: Any = dataclasses.MISSING) -> Any:
  """`cfg[key]` (or `default` when absent or null), type-checked for the known numeric fields.

  Raises:
    CheckpointError: naming `where` and the field, when it is missing or has the wrong type.
  """
  if key in cfg and cfg[key] is not None:
    value = cfg[key]
    if key in _INT_FIELDS and not _is_count(value):
      raise CheckpointError(f"{where}: field {key!r} must be a non-negative integer, got {value!r}")
    if key in _FLOAT_FIELDS and (isinstance(value, bool) or not isinstance(value, int | float)):
      raise CheckpointError(f"{where}: field {key!r} must be a number, got {value!r}")
    if key in _DICT_FIELDS and not isinstance(value, dict):
      raise CheckpointError(f"{where}: field {key!r} must be an object, got {value!r}")
    return value
  if default is dataclasses.MISSING:
    raise CheckpointError(f"{where}: required field {key!r} is missing")
  return default


def _architecture(cfg: dict) -> str:
  archs = cfg.get("architectures") or []
  return archs[0] if archs else cfg.get("model_type", "")


_TEXT_ARCHS = {
  "Qwen2ForCausalLM": "qwen2",
  "qwen2": "qwen2",
  "LlamaForCausalLM": "llama",
  "llama": "llama",
}


def decoder_config_from_hf(cfg: dict, where: str) -> DecoderConfig:
  """A `DecoderConfig` from a Qwen2 / LLaMA `config.json` dict (tie decided by the loader)."""
  arch = _architecture(cfg)
  family = _TEXT_ARCHS.get(arch) or _TEXT_ARCHS.get(cfg.get("model_type", ""))
  if family is None:
    raise CheckpointError(
      f"{where}: unknown language model architecture {arch!r}; expected one of "
      f"Qwen2ForCausalLM, LlamaForCausalLM"
    )
  act = cfg.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{where}: hidden_act {act!r} is not supported (expected 'silu')")
  if cfg.get("use_sliding_window"):
    raise CheckpointError(f"{where}: use_sliding_window=true is not supported")
  if family == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
    raise CheckpointError(f"{where}: LLaMA attention_bias / mlp_bias are not supported")
  rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "dynamic"):
    raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported")
  if rope_type == "dynamic":
    # Dynamic NTK only changes RoPE beyond max_position_embeddings; we never run that long.
    logging.info("%s: dynamic RoPE scaling is a no-op up to max_position_embeddings", where)
  theta = cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0
  heads = _field(cfg, "num_attention_heads", where)
  return DecoderConfig(
    vocab_size=_field(cfg, "vocab_size", where),
    hidden_size=_field(cfg, "hidden_size", where),
    num_layers=_field(cfg, "num_hidden_layers", where),
    num_heads=heads,
    num_kv_heads=_field(cfg, "num_key_value_heads", where, heads),
    intermediate_size=_field(cfg, "intermediate_size", where),
    head_dim=cfg.get("head_dim"),
    rope_theta=float(theta),
    rms_norm_eps=float(_field(cfg, "rms_norm_eps", where, 1e-6)),
    qkv_bias=family == "qwen2",
    tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    max_position_embeddings=int(_field(cfg, "max_position_embeddings", where, 32768)),
  )


def _square(value, key: str, where: str) -> int:
  if isinstance(value, (list, tuple)):
    if not value or not all(_is_count(v) for v in value) or len(set(value)) != 1:
      raise CheckpointError(f"{where}: {key} {value!r} is not a square size (equal integers)")
    value = value[0]
  if not _is_count(value):
    raise CheckpointError(f"{where}: field {key!r} must be a non-negative integer, got {value!r}")
  return value


def vision_config_from_hf(cfg: dict, where: str, *, original: bool) -> VisionConfig:
  """A `VisionConfig` from an InternViT config dict (original or transformers naming)."""
  act = cfg.get("hidden_act", "gelu")
  if act != "gelu":
    raise CheckpointError(f"{where}: vision hidden_act {act!r} is not supported (expected gelu)")
  if not original:
    if not cfg.get("use_mean_pooling", True):
      raise CheckpointError(
        f"{where}: use_mean_pooling=false (a final vision LayerNorm) is not supported by InternVL3"
      )
    if not cfg.get("use_absolute_position_embeddings", True):
      raise CheckpointError(f"{where}: use_absolute_position_embeddings=false is not supported")
  return VisionConfig(
    image_size=_square(_field(cfg, "image_size", where, 448), "image_size", where),
    patch_size=_square(_field(cfg, "patch_size", where, 14), "patch_size", where),
    num_channels=int(_field(cfg, "num_channels", where, 3)),
    hidden_size=_field(cfg, "hidden_size", where),
    num_layers=_field(cfg, "num_hidden_layers", where),
    num_heads=_field(cfg, "num_attention_heads", where),
    intermediate_size=_field(cfg, "intermediate_size", where),
    norm_type=_field(cfg, "norm_type", where, "layer_norm"),
    layer_norm_eps=float(_field(cfg, "layer_norm_eps", where, 1e-6)),
    qkv_bias=bool(cfg.get("qkv_bias", False) if original else cfg.get("attention_bias", False)),
    qk_normalization=bool(
      cfg.get("qk_normalization", False) if original else cfg.get("use_qk_norm", False)
    ),
    layer_scale_init=float(cfg.get("layer_scale_init_value", 0.1)),
  )


def _image_token_id_from_tokenizer_files(directory: str) -> int | None:
  added = os.path.join(directory, "added_tokens.json")
  if os.path.exists(added):
    tokens = _read_json(added)
    if _IMG_CONTEXT in tokens:
      return int(tokens[_IMG_CONTEXT])
  tok_cfg = os.path.join(directory, "tokenizer_config.json")
  if os.path.exists(tok_cfg):
    for token_id, entry in (_read_json(tok_cfg).get("added_tokens_decoder") or {}).items():
      if entry.get("content") == _IMG_CONTEXT:
        return int(token_id)
  return None


# ---------------------------------------------------------------------------------------------
# Tensor specs: for each parameter, which checkpoint tensors make it and how.


@dataclasses.dataclass(frozen=True)
class _Spec:
  """A parameter built from checkpoint tensors `names` of shapes `shapes` by `combine`."""

  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  combine: Callable[..., np.ndarray]


def _copy(shape):
  return lambda x: x.reshape(shape)


def _linear_t(x):
  return x.T


def _conv_t(x):
  return x.transpose(2, 3, 1, 0)


def _fused_linear_t(*parts):
  return np.concatenate(parts, axis=0).T


def _fused_bias(*parts):
  return np.concatenate(parts, axis=0)


def _decoder_specs(cfg: DecoderConfig, body: str, head: str | None) -> dict[tuple, _Spec]:
  d, v = cfg.hidden_size, cfg.vocab_size
  dh = cfg.resolved_head_dim
  q_out, kv_out = cfg.num_heads * dh, cfg.num_kv_heads * dh
  specs: dict[tuple, _Spec] = {
    ("embed_tokens", "embedding"): _Spec((f"{body}embed_tokens.weight",), ((v, d),), _copy((v, d))),
    ("norm", "scale"): _Spec((f"{body}norm.weight",), ((d,),), _copy((d,))),
  }
  for i in range(cfg.num_layers):
    src, dst = f"{body}layers.{i}.", ("layers", i)
    linears = {
      "self_attn.q_proj": (q_out, d),
      "self_attn.k_proj": (kv_out, d),
      "self_attn.v_proj": (kv_out, d),
      "self_attn.o_proj": (d, q_out),
      "mlp.gate_proj": (cfg.intermediate_size, d),
      "mlp.up_proj": (cfg.intermediate_size, d),
      "mlp.down_proj": (d, cfg.intermediate_size),
    }
    for name, shape in linears.items():
      path = dst + tuple(name.split(".")) + ("kernel",)
      specs[path] = _Spec((f"{src}{name}.weight",), (shape,), _linear_t)
    if cfg.qkv_bias:
      for name, width in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)):
        specs[dst + ("self_attn", name, "bias")] = _Spec(
          (f"{src}self_attn.{name}.bias",), ((width,),), _copy((width,))
        )
    for norm in ("input_layernorm", "post_attention_layernorm"):
      specs[dst + (norm, "scale")] = _Spec((f"{src}{norm}.weight",), ((d,),), _copy((d,)))
  if head is not None:
    specs[("lm_head", "kernel")] = _Spec((head,), ((v, d),), _linear_t)
  return specs


def _resized_positions(stored_grid: int, grid: int, width: int):
  """Checkpoint position embeddings `[1, 1 + s*s, D]` -> ours `[1 + g*g, D]`, the patch part
  resized like InternViT's `resize_pos_embeddings` (torch bicubic in fp32, back to the stored
  dtype); the CLS row is kept."""
  matrix = torch_bicubic_matrix(stored_grid, grid).astype(np.float32)

  def combine(x):
    x = x.reshape(1 + stored_grid * stored_grid, width)
    patches = x[1:].astype(np.float32).reshape(stored_grid, stored_grid, width)
    resized = np.einsum("oh,hwd,pw->opd", matrix, patches, matrix).astype(x.dtype)
    return np.concatenate([x[:1], resized.reshape(grid * grid, width)], axis=0)

  return combine


def _vision_specs(
  cfg: VisionConfig, prefix: str, *, original: bool, stored_grid: int
) -> dict[tuple, _Spec]:
  """Specs of the vision tower; `stored_grid` is the checkpoint's position grid (resized to
  `cfg.grid_size` at load time when they differ)."""
  d, p, c = cfg.hidden_size, cfg.patch_size, cfg.num_channels
  stored_positions = stored_grid * stored_grid + 1
  if stored_grid == cfg.grid_size:
    positions_from = _copy((stored_positions, d))
  else:
    positions_from = _resized_positions(stored_grid, cfg.grid_size, d)
  emb = f"{prefix}embeddings."
  if original:
    names = (
      "class_embedding",
      "patch_embedding.weight",
      "patch_embedding.bias",
      "position_embedding",
    )
  else:
    names = (
      "cls_token",
      "patch_embeddings.projection.weight",
      "patch_embeddings.projection.bias",
      "position_embeddings",
    )
  specs = {
    ("embeddings", "class_embedding"): _Spec((emb + names[0],), ((1, 1, d),), _copy((d,))),
    ("embeddings", "patch_kernel"): _Spec((emb + names[1],), ((d, c, p, p),), _conv_t),
    ("embeddings", "patch_bias"): _Spec((emb + names[2],), ((d,),), _copy((d,))),
    ("embeddings", "position_embedding"): _Spec(
      (emb + names[3],), ((1, stored_positions, d),), positions_from
    ),
  }
  norm_leaves = (("weight", "scale"), ("bias", "bias"))
  if cfg.norm_type == "rms_norm":
    norm_leaves = (("weight", "scale"),)
  for i in range(cfg.num_layers):
    dst = ("layers", i)
    if original:
      src = f"{prefix}encoder.layers.{i}."
      block = {
        "norm1": "norm1",
        "norm2": "norm2",
        "ls1": "ls1",
        "ls2": "ls2",
        "attn": "attn.",
        "proj": "attn.proj",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
      }
    else:
      src = f"{prefix}encoder.layer.{i}."
      block = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "ls1": "lambda_1",
        "ls2": "lambda_2",
        "attn": "attention.",
        "proj": "attention.projection_layer",
        "fc1": "mlp.fc1",
        "fc2": "mlp.fc2",
      }
    for ours in ("norm1", "norm2"):
      for theirs, leaf in norm_leaves:
        specs[dst + (ours, leaf)] = _Spec((f"{src}{block[ours]}.{theirs}",), ((d,),), _copy((d,)))
    for ours in ("ls1", "ls2"):
      specs[dst + (ours,)] = _Spec((src + block[ours],), ((d,),), _copy((d,)))
    attn = src + block["attn"]
    if original:
      specs[dst + ("attn", "qkv", "kernel")] = _Spec(
        (attn + "qkv.weight",), ((3 * d, d),), _linear_t
      )
      if cfg.qkv_bias:
        specs[dst + ("attn", "qkv", "bias")] = _Spec(
          (attn + "qkv.bias",), ((3 * d,),), _copy((3 * d,))
        )
    else:
      parts = tuple(f"{attn}{x}_proj" for x in "qkv")
      specs[dst + ("attn", "qkv", "kernel")] = _Spec(
        tuple(f"{x}.weight" for x in parts), ((d, d),) * 3, _fused_linear_t
      )
      if cfg.qkv_bias:
        specs[dst + ("attn", "qkv", "bias")] = _Spec(
          tuple(f"{x}.bias" for x in parts), ((d,),) * 3, _fused_bias
        )
    if cfg.qk_normalization:
      for which in ("q_norm", "k_norm"):
        specs[dst + ("attn", which, "scale")] = _Spec(
          (f"{attn}{which}.weight",), ((d,),), _copy((d,))
        )
    layers = (
      ("proj", ("attn", "proj"), d, d),
      ("fc1", ("mlp", "fc1"), cfg.intermediate_size, d),
      ("fc2", ("mlp", "fc2"), d, cfg.intermediate_size),
    )
    for key, ours, out_f, in_f in layers:
      specs[dst + ours + ("kernel",)] = _Spec(
        (f"{src}{block[key]}.weight",), ((out_f, in_f),), _linear_t
      )
      specs[dst + ours + ("bias",)] = _Spec(
        (f"{src}{block[key]}.bias",), ((out_f,),), _copy((out_f,))
      )
  return specs


def _projector_specs(in_f: int, d: int, prefix: str, names: Sequence[str]) -> dict[tuple, _Spec]:
  norm, fc1, fc2 = (prefix + n for n in names)
  return {
    ("norm", "scale"): _Spec((f"{norm}.weight",), ((in_f,),), _copy((in_f,))),
    ("norm", "bias"): _Spec((f"{norm}.bias",), ((in_f,),), _copy((in_f,))),
    ("fc1", "kernel"): _Spec((f"{fc1}.weight",), ((d, in_f),), _linear_t),
    ("fc1", "bias"): _Spec((f"{fc1}.bias",), ((d,),), _copy((d,))),
    ("fc2", "kernel"): _Spec((f"{fc2}.weight",), ((d, d),), _linear_t),
    ("fc2", "bias"): _Spec((f"{fc2}.bias",), ((d,),), _copy((d,))),
  }


def _nest(prefix: tuple, specs: dict[tuple, _Spec]) -> dict[tuple, _Spec]:
  return {prefix + k: v for k, v in specs.items()}


def _first_present(ckpt: _Checkpoint, candidates: Sequence[str]) -> str | None:
  return next((c for c in candidates if c in ckpt), None)


def _prefix_in_use(ckpt: _Checkpoint, candidates: Sequence[str]) -> str:
  """The first candidate prefix some tensor starts with (else the first, for error messages)."""
  names = ckpt.names()
  for prefix in candidates:
    if any(n.startswith(prefix) for n in names):
      return prefix
  return candidates[0]


# ---------------------------------------------------------------------------------------------
# Building models


def _dtype_name(dtype) -> str:
  return jnp.dtype(dtype).name


def _load(
  ckpt: _Checkpoint,
  directory: str,
  build: Callable[[], nnx.Module],
  specs: dict[tuple, _Spec],
  param_dtype,
  sharding,
) -> nnx.Module:
  abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  flat = dict(nnx.to_flat_state(state))
  ours = set(flat)
  theirs = set(specs)
  if ours != theirs:  # a bug in this file, not in the checkpoint
    raise AssertionError(
      f"loader/model mismatch: model-only {sorted(ours - theirs)[:5]}, "
      f"spec-only {sorted(theirs - ours)[:5]}"
    )

  consumed: set[str] = set()
  for path, spec in specs.items():
    for name, shape in zip(spec.names, spec.shapes):
      if name not in ckpt:
        raise CheckpointError(
          f"{directory}: missing tensor {name!r} (expected shape {list(shape)}) for parameter "
          f"{'/'.join(map(str, path))}"
        )
      found = ckpt.shape(name)
      if found != tuple(shape):
        raise CheckpointError(
          f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(found)}, expected {list(shape)}"
        )
      stored = ckpt.dtype_name(name)
      if stored not in _FLOAT_DTYPES and jnp.issubdtype(jnp.dtype(param_dtype), jnp.floating):
        raise CheckpointError(
          f"{ckpt.file_of(name)}: tensor {name!r} is stored as {stored}; parameter "
          f"{'/'.join(map(str, path))} needs floating-point values (no silent cast)"
        )
      consumed.add(name)
  unexpected = sorted(
    n for n in ckpt.names() if n not in consumed and not n.endswith(_IGNORED_SUFFIXES)
  )
  if unexpected:
    shown = ", ".join(f"{n!r} {list(ckpt.shape(n))} in {ckpt.file_of(n)}" for n in unexpected[:5])
    raise CheckpointError(
      f"{directory}: {len(unexpected)} unexpected tensor(s) the model has no parameter for: "
      f"{shown}{' ...' if len(unexpected) > 5 else ''}"
    )

  place = _placement(sharding)
  values = {}
  for path, spec in specs.items():
    variable = flat[path]
    array = spec.combine(*(ckpt.get(n) for n in spec.names))
    array = np.asarray(array).astype(jnp.dtype(param_dtype), copy=False)
    if array.shape != tuple(variable.shape):  # also a bug in this file
      raise AssertionError(f"{path}: built {array.shape}, model wants {variable.shape}")
    values[path] = place(path, variable, array)
  for path, value in values.items():
    flat[path].set_value(value)
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def _placement(sharding) -> Callable[[tuple, nnx.Variable, np.ndarray], jax.Array]:
  """How each loaded host array becomes a device array.

  `sharding` is one of: None (default device); a `jax.sharding.Sharding` (every parameter);
  a callable `(path: str, logical_axes: tuple, shape: tuple) -> Sharding` (e.g. built from a
  logical-axis rules table); or a pytree of shardings with the structure of
  `nnx.state(model, nnx.Param)` (e.g. `nnx.get_named_sharding(abstract_state, mesh)`).
  """

  def put(array: np.ndarray, target) -> jax.Array:
    if target is None:
      return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])

  if sharding is None:
    return lambda path, variable, array: put(array, None)
  if isinstance(sharding, jax.sharding.Sharding):
    return lambda path, variable, array: put(array, sharding)
  if callable(sharding):

    def from_callable(path, variable, array):
      axes = variable.get_metadata().get("out_sharding")
      return put(array, sharding("/".join(map(str, path)), axes, array.shape))

    return from_callable

  tree = sharding
  if isinstance(tree, nnx.State):
    tree = nnx.to_pure_dict(tree)

  def from_tree(path, variable, array):
    node = tree
    for key in path:
      try:
        node = node[key]
      except (KeyError, IndexError, TypeError) as e:
        raise ValueError(
          f"sharding tree has no entry for parameter {'/'.join(map(str, path))}"
        ) from e
    if isinstance(node, nnx.Variable):
      node = node.get_value()
    return put(array, node)

  return from_tree


def _internvl_from_dir(
  directory: str,
  cfg: dict,
  *,
  original: bool,
  dtype,
  param_dtype,
  sharding,
  image_token_id,
  image_size,
) -> InternVL:
  where = os.path.join(directory, "config.json")
  ckpt = _Checkpoint(directory)
  if original:
    text_dict = _field(cfg, "llm_config", where)
    vision_dict = _field(cfg, "vision_config", where)
    ps_version = cfg.get("ps_version", "v2")
    if ps_version != "v2":
      raise CheckpointError(f"{where}: ps_version {ps_version!r} is not supported (expected v2)")
    select_layer = int(cfg.get("select_layer", -1))
    token_id = image_token_id
    if token_id is None:
      token_id = _image_token_id_from_tokenizer_files(directory)
    # InternVLChatModel resizes the ViT's position embeddings to `force_image_size`.
    image_size = image_size or cfg.get("force_image_size")
    vision_prefix, projector_prefix = "vision_model.", "mlp1."
    projector_names = ("0", "1", "3")
    body = "language_model.model."
    head = _first_present(ckpt, ["language_model.lm_head.weight"])
  else:
    text_dict = _field(cfg, "text_config", where)
    vision_dict = _field(cfg, "vision_config", where)
    strategy = cfg.get("vision_feature_select_strategy", "default")
    if strategy != "default":
      raise CheckpointError(
        f"{where}: vision_feature_select_strategy {strategy!r} is not "
        f"supported (expected 'default': drop CLS)"
      )
    layer = cfg.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
      raise CheckpointError(f"{where}: vision_feature_layer {layer!r} must be one integer")
    if cfg.get("projector_hidden_act", "gelu") != "gelu":
      raise CheckpointError(
        f"{where}: projector_hidden_act {cfg['projector_hidden_act']!r} is "
        f"not supported (expected gelu)"
      )
    select_layer = layer
    token_id = image_token_id if image_token_id is not None else cfg.get("image_token_id")
    vision_prefix = _prefix_in_use(ckpt, ["vision_tower.", "model.vision_tower."])
    projector_prefix = _prefix_in_use(
      ckpt, ["multi_modal_projector.", "model.multi_modal_projector."]
    )
    projector_names = ("layer_norm", "linear_1", "linear_2")
    body = _prefix_in_use(ckpt, ["language_model.model.", "model.language_model."])
    head = _first_present(ckpt, ["language_model.lm_head.weight", "lm_head.weight"])
  text_where = f"{where} ({'llm_config' if original else 'text_config'})"
  text = decoder_config_from_hf(text_dict, text_where)
  text = dataclasses.replace(text, tie_word_embeddings=head is None)
  vision = vision_config_from_hf(vision_dict, f"{where} (vision_config)", original=original)
  ratio = float(cfg.get("downsample_ratio", 0.5))
  stored_grid = vision.grid_size
  if image_size and int(image_size) != vision.image_size:
    image_size = int(image_size)
    grid = image_size // vision.patch_size
    if image_size % vision.patch_size or abs(grid * ratio - round(grid * ratio)) > 1e-6:
      raise CheckpointError(
        f"{where}: image_size {image_size} must be a multiple of the patch size "
        f"{vision.patch_size} with a patch grid divisible by 1/downsample_ratio"
      )
    vision = dataclasses.replace(vision, image_size=image_size)
  config = InternVLConfig(
    vision=vision,
    text=text,
    image_token_id=int(token_id if token_id is not None else DEFAULT_IMAGE_TOKEN_ID),
    downsample_ratio=ratio,
    vision_select_layer=select_layer,
    dtype=_dtype_name(dtype),
    param_dtype=_dtype_name(param_dtype),
  )
  factor = round(1 / ratio)
  specs = {}
  vision_specs = _vision_specs(vision, vision_prefix, original=original, stored_grid=stored_grid)
  specs.update(_nest(("vision_model",), vision_specs))
  specs.update(
    _nest(
      ("mlp1",),
      _projector_specs(
        vision.hidden_size * factor * factor, text.hidden_size, projector_prefix, projector_names
      ),
    )
  )
  specs.update(_nest(("language_model",), _decoder_specs(text, body, head)))
  return _load(
    ckpt, directory, lambda: InternVL(config, rngs=nnx.Rngs(0)), specs, param_dtype, sharding
  )


def _decoder_from_dir(directory: str, cfg: dict, *, dtype, param_dtype, sharding) -> Decoder:
  ckpt = _Checkpoint(directory)
  head = _first_present(ckpt, ["lm_head.weight"])
  text = decoder_config_from_hf(cfg, os.path.join(directory, "config.json"))
  text = dataclasses.replace(text, tie_word_embeddings=head is None)
  specs = _decoder_specs(text, "model.", head)
  build = lambda: Decoder(text, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
  return _load(ckpt, directory, build, specs, param_dtype, sharding)


_QWEN25_VL_ARCHS = ("Qwen2_5_VLForConditionalGeneration", "qwen2_5_vl")


def qwen25_vl_config_from_hf(cfg: dict, where: str, *, dtype, param_dtype, tied: bool):
  """A `Qwen25VLConfig` from a Qwen2.5-VL `config.json` dict: the hub's flat layout (text fields
  at the top, `rope_scaling` of type "mrope") or transformers 5's `text_config` layout."""
  text_dict = dict(cfg.get("text_config") or cfg)
  rope = text_dict.pop("rope_parameters", None) or text_dict.pop("rope_scaling", None) or {}
  text_dict.pop("rope_scaling", None)
  section = rope.get("mrope_section")
  if not section:
    raise CheckpointError(f"{where}: the text rope parameters have no 'mrope_section' ({rope})")
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope_type not in ("default", "mrope"):
    raise CheckpointError(f"{where}: text rope type {rope_type!r} is not supported")
  text_dict["rope_theta"] = text_dict.get("rope_theta") or rope.get("rope_theta") or 1e6
  # The decoder is Qwen2's; its head_dim is always hidden_size / num_attention_heads.
  text_dict.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2", head_dim=None)
  text = decoder_config_from_hf(text_dict, f"{where} (text)")
  text = dataclasses.replace(
    text, mrope_section=tuple(int(x) for x in section), tie_word_embeddings=tied
  )
  vision_where = f"{where} (vision_config)"
  vision_dict = _field(cfg, "vision_config", where)
  act = vision_dict.get("hidden_act", "silu")
  if act != "silu":
    raise CheckpointError(f"{vision_where}: hidden_act {act!r} is not supported (expected silu)")
  vision_rope = vision_dict.get("rope_parameters") or {}
  vision = Qwen25VisionConfig(
    patch_size=int(_field(vision_dict, "patch_size", vision_where, 14)),
    temporal_patch_size=int(_field(vision_dict, "temporal_patch_size", vision_where, 2)),
    in_channels=int(vision_dict.get("in_channels") or vision_dict.get("in_chans") or 3),
    hidden_size=int(_field(vision_dict, "hidden_size", vision_where)),
    depth=int(_field(vision_dict, "depth", vision_where)),
    num_heads=int(_field(vision_dict, "num_heads", vision_where)),
    intermediate_size=int(_field(vision_dict, "intermediate_size", vision_where)),
    spatial_merge_size=int(_field(vision_dict, "spatial_merge_size", vision_where, 2)),
    window_size=int(_field(vision_dict, "window_size", vision_where, 112)),
    out_hidden_size=int(_field(vision_dict, "out_hidden_size", vision_where)),
    fullatt_block_indexes=tuple(
      int(i) for i in _field(vision_dict, "fullatt_block_indexes", vision_where)
    ),
    rope_theta=float(vision_rope.get("rope_theta", 10000.0)),
  )
  try:
    return Qwen25VLConfig(
      vision=vision,
      text=text,
      image_token_id=int(_field(cfg, "image_token_id", where, 151655)),
      dtype=_dtype_name(dtype),
      param_dtype=_dtype_name(param_dtype),
    )
  except ValueError as e:
    raise CheckpointError(f"{where}: {e}") from e


def _conv3d_t(x):
  """Conv3d weight `[D, C, T, p, p]` -> linear kernel `[C*T*p*p, D]`."""
  return x.reshape(x.shape[0], -1).T


def _qwen25_vision_specs(cfg: Qwen25VisionConfig, prefix: str) -> dict[tuple, _Spec]:
  d, inner, merged = cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size * cfg.merge_unit
  conv = (d, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
  specs = {
    ("patch_embed",): _Spec((f"{prefix}patch_embed.proj.weight",), (conv,), _conv3d_t),
    ("merger", "ln_q", "scale"): _Spec((f"{prefix}merger.ln_q.weight",), ((d,),), _copy((d,))),
  }
  linears = {("merger", "fc1"): ("merger.mlp.0", merged, merged)}
  linears[("merger", "fc2")] = ("merger.mlp.2", cfg.out_hidden_size, merged)
  for i in range(cfg.depth):
    src, dst = f"blocks.{i}.", ("blocks", i)
    for norm in ("norm1", "norm2"):
      specs[dst + (norm, "scale")] = _Spec((f"{prefix}{src}{norm}.weight",), ((d,),), _copy((d,)))
    linears[dst + ("attn", "qkv")] = (src + "attn.qkv", 3 * d, d)
    linears[dst + ("attn", "proj")] = (src + "attn.proj", d, d)
    linears[dst + ("mlp", "gate_proj")] = (src + "mlp.gate_proj", inner, d)
    linears[dst + ("mlp", "up_proj")] = (src + "mlp.up_proj", inner, d)
    linears[dst + ("mlp", "down_proj")] = (src + "mlp.down_proj", d, inner)
  for dst, (src, out_f, in_f) in linears.items():
    specs[dst + ("kernel",)] = _Spec((f"{prefix}{src}.weight",), ((out_f, in_f),), _linear_t)
    specs[dst + ("bias",)] = _Spec((f"{prefix}{src}.bias",), ((out_f,),), _copy((out_f,)))
  return specs


def _qwen25_vl_from_dir(directory: str, cfg: dict, *, dtype, param_dtype, sharding) -> Qwen25VL:
  """Qwen2.5-VL: `model.visual.*` / `model.language_model.*` (transformers 5) or `visual.*` /
  `model.*` (the hub files), and `lm_head.weight` unless the head is tied."""
  where = os.path.join(directory, "config.json")
  ckpt = _Checkpoint(directory)
  head = _first_present(ckpt, ["lm_head.weight"])
  config = qwen25_vl_config_from_hf(
    cfg, where, dtype=dtype, param_dtype=param_dtype, tied=head is None
  )
  vision_prefix = _prefix_in_use(ckpt, ["model.visual.", "visual."])
  body = _prefix_in_use(ckpt, ["model.language_model.", "model."])
  specs = _nest(("visual",), _qwen25_vision_specs(config.vision, vision_prefix))
  specs.update(_nest(("language_model",), _decoder_specs(config.text, body, head)))
  build = lambda: Qwen25VL(config, rngs=nnx.Rngs(0))
  return _load(ckpt, directory, build, specs, param_dtype, sharding)


def from_pretrained(
  path: str | os.PathLike,
  dtype: str | jnp.dtype = "float32",
  sharding=None,
  *,
  param_dtype: str | jnp.dtype | None = None,
  image_token_id: int | None = None,
  image_size: int | None = None,
) -> InternVL | Qwen25VL | Decoder:
  """Builds a model from a local HuggingFace checkpoint directory.

  Args:
    path: directory with `config.json` and `*.safetensors` (optionally an index).
    dtype: compute dtype, and the parameter dtype unless `param_dtype` is given.
    sharding: where parameters go; see `_placement` (None: the default device).
    param_dtype: storage dtype of the parameters.
    image_token_id: override of the image-context id (InternVL). The `-hf` layout carries it in
      its config; for the original layout it is read from `added_tokens.json` /
      `tokenizer_config.json` when present, else 151667.
    image_size: InternVL tile size to build the model for. When it differs from the checkpoint's
      (or, original layout, from `force_image_size` in its config), the ViT position embeddings
      are resized bicubically at load time, as InternViT's `resize_pos_embeddings` does. (Inputs
      of another size still work without this: the model resizes them per call.)

  Returns:
    An `InternVL` (InternVL layouts), a `Qwen25VL` (Qwen2.5-VL) or a `Decoder` (Qwen2 / LLaMA
    causal LMs); each is called
    as `model(input_ids, ...)` and returns an object with `.logits`.
  """
  directory = os.fspath(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is not a directory")
  cfg = _read_json(os.path.join(directory, "config.json"))
  dtype = jnp.dtype(dtype)
  param_dtype = jnp.dtype(param_dtype) if param_dtype is not None else dtype
  arch = _architecture(cfg)
  common = dict(dtype=dtype, param_dtype=param_dtype, sharding=sharding)
  original = arch in ("InternVLChatModel", "internvl_chat")
  if original or arch in ("InternVLForConditionalGeneration", "internvl"):
    return _internvl_from_dir(
      directory,
      cfg,
      original=original,
      image_token_id=image_token_id,
      image_size=image_size,
      **common,
    )
  if arch in _QWEN25_VL_ARCHS:
    return _qwen25_vl_from_dir(directory, cfg, **common)
  if arch in _TEXT_ARCHS:
    return _decoder_from_dir(directory, cfg, **common)
  raise CheckpointError(
    f"{os.path.join(directory, 'config.json')}: unknown architecture {arch!r}; expected one of "
    f"InternVLForConditionalGeneration, InternVLChatModel, Qwen2_5_VLForConditionalGeneration, "
    f"Qwen2ForCausalLM, LlamaForCausalLM"
  )
