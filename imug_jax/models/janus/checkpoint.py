"""Janus checkpoints: `from_pretrained(path)` reads a transformers `JanusForConditionalGeneration`
directory (`config.json` + safetensors, single or sharded), as `save_pretrained` writes it.

Tensors are read lazily, one at a time, through `drivekd_jax.models.hf_import`'s safetensors
reader and loader, which check every tensor's presence and shape and raise `CheckpointError`
naming the file, the tensor, what was found and what was expected. Names: `model.vision_model.*`,
`model.aligner.*`, `model.vqmodel.*`, `model.generation_{embeddings,aligner,head}.*`,
`model.language_model.*` and `lm_head.weight` (absent when tied to the embedding).
"""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
from flax import nnx

from drivekd_jax.models.hf_import import (
  CheckpointError,
  _Checkpoint,
  _conv_t,
  _copy,
  _decoder_specs,
  _first_present,
  _fused_bias,
  _fused_linear_t,
  _linear_t,
  _load,
  _read_json,
  _Spec,
  decoder_config_from_hf,
)
from imug_jax.models.janus.config import (
  JanusConfig,
  JanusConfigError,
  vision_from_hf,
  vq_from_hf,
)
from imug_jax.models.janus.network import Janus

_ARCHITECTURES = ("JanusForConditionalGeneration", "janus")
# Our attribute names that transformers spells differently, keyed by (parent, ours).
_RENAMES = {
  ("vision_model", "layers"): "encoder.layers",
  ("self_attn", "proj"): "projection_layer",
  ("down", "resample"): "downsample",
  ("up", "resample"): "upsample",
}


def config_from_hf(cfg: dict, where: str, *, dtype="float32", param_dtype="float32", tied=False):
  """A `JanusConfig` from a transformers Janus `config.json` dict."""
  arch = (cfg.get("architectures") or [cfg.get("model_type", "")])[0]
  if arch not in _ARCHITECTURES:
    raise CheckpointError(f"{where}: architecture {arch!r} is not Janus ({_ARCHITECTURES[0]})")
  for key in ("text_config", "vision_config", "vq_config"):
    if not isinstance(cfg.get(key), dict):
      raise CheckpointError(f"{where}: required field {key!r} (an object) is missing")
  try:
    vision = vision_from_hf(cfg["vision_config"], f"{where} (vision_config)")
    grid = vision.encoder.image_size // vision.encoder.patch_size
    vq = vq_from_hf(cfg["vq_config"], f"{where} (vq_config)", grid)
  except JanusConfigError as e:
    raise CheckpointError(str(e)) from None
  text = decoder_config_from_hf(cfg["text_config"], f"{where} (text_config)")
  text = dataclasses.replace(text, tie_word_embeddings=tied)
  if vq.image_token_embed_dim != text.hidden_size or vision.projection_dim != text.hidden_size:
    raise CheckpointError(
      f"{where}: vision projection_dim {vision.projection_dim} and vq image_token_embed_dim "
      f"{vq.image_token_embed_dim} must equal the text hidden_size {text.hidden_size}"
    )
  if vision.num_image_tokens != vq.num_tokens:
    raise CheckpointError(
      f"{where}: vision num_image_tokens {vision.num_image_tokens} must be the VQ token grid "
      f"{vq.num_patches}^2 = {vq.num_tokens}"
    )
  return JanusConfig(
    vision=vision,
    vq=vq,
    text=text,
    image_token_id=int(cfg.get("image_token_id", 100581)),
    dtype=jnp.dtype(dtype).name,
    param_dtype=jnp.dtype(param_dtype).name,
  )


def _torch_name(path: tuple) -> str:
  parts, parent = [], None
  for key in path:
    name = _RENAMES.get((parent, key), key) if isinstance(key, str) else str(key)
    parts.append(name)
    parent = key if isinstance(key, str) else parent
  return ".".join(parts)


def _generic_specs(abstract: nnx.Module, prefix: str, skip: tuple[str, ...]) -> dict[tuple, _Spec]:
  """Specs for modules whose paths mirror the torch names: `kernel` / `scale` / `embedding` ->
  `weight`, `bias` -> `bias`; 2-D kernels are transposed Linears, 4-D kernels convolutions."""
  specs = {}
  for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    if path[0] in skip:
      continue
    leaf, shape = path[-1], tuple(variable.shape)
    name = prefix + _torch_name(path[:-1]) + "." + ("bias" if leaf == "bias" else "weight")
    if leaf == "kernel" and len(shape) == 2:
      specs[path] = _Spec((name,), (shape[::-1],), _linear_t)
    elif leaf == "kernel" and len(shape) == 4:
      kh, kw, cin, cout = shape
      specs[path] = _Spec((name,), ((cout, cin, kh, kw),), _conv_t)
    else:
      specs[path] = _Spec((name,), (shape,), _copy(shape))
  return specs


def _vision_qkv_specs(config: JanusConfig, prefix: str) -> dict[tuple, _Spec]:
  """Our fused `qkv` from transformers' separate q/k/v projections."""
  d = config.vision.encoder.hidden_size
  specs = {}
  for i in range(config.vision.encoder.num_layers):
    src = f"{prefix}vision_model.encoder.layers.{i}.self_attn."
    dst = ("vision_model", "layers", i, "self_attn", "qkv")
    names = tuple(f"{src}{x}_proj" for x in "qkv")
    specs[dst + ("kernel",)] = _Spec(
      tuple(f"{n}.weight" for n in names), ((d, d),) * 3, _fused_linear_t
    )
    if config.vision.encoder.qkv_bias:
      specs[dst + ("bias",)] = _Spec(tuple(f"{n}.bias" for n in names), ((d,),) * 3, _fused_bias)
  return specs


def janus_specs(config: JanusConfig, head: str | None) -> dict[tuple, _Spec]:
  """For every parameter of `Janus(config)`, the checkpoint tensors that make it."""
  abstract = nnx.eval_shape(lambda: Janus(config, rngs=nnx.Rngs(0)))
  specs = _generic_specs(abstract, "model.", skip=("language_model",))
  specs = {p: s for p, s in specs.items() if not (p[0] == "vision_model" and "qkv" in p)}
  specs.update(_vision_qkv_specs(config, "model."))
  decoder = _decoder_specs(config.text, "model.language_model.", head)
  specs.update({("language_model", *path): spec for path, spec in decoder.items()})
  return specs


def from_pretrained(
  path: str | os.PathLike,
  dtype: str | jnp.dtype = "float32",
  sharding=None,
  *,
  param_dtype: str | jnp.dtype | None = None,
) -> Janus:
  """Builds a `Janus` from a local transformers checkpoint directory.

  Args:
    path: directory with `config.json` and `*.safetensors` (optionally an index).
    dtype: compute dtype, and the parameter dtype unless `param_dtype` is given.
    sharding: where parameters go (as `drivekd_jax.models.from_pretrained`).
    param_dtype: storage dtype of the parameters.

  Raises:
    CheckpointError: naming the file and tensor / field that does not fit.
  """
  directory = os.fspath(path)
  if not os.path.isdir(directory):
    raise CheckpointError(f"{directory} is not a directory")
  where = os.path.join(directory, "config.json")
  cfg = _read_json(where)
  param_dtype = param_dtype if param_dtype is not None else dtype
  ckpt = _Checkpoint(directory)
  head = _first_present(ckpt, ["lm_head.weight"])
  config = config_from_hf(cfg, where, dtype=dtype, param_dtype=param_dtype, tied=head is None)
  specs = janus_specs(config, head)
  build = lambda: Janus(config, rngs=nnx.Rngs(0))
  return _load(ckpt, directory, build, specs, jnp.dtype(param_dtype), sharding)
