"""One decoder for Qwen2 / Qwen2.5 and LLaMA, with a fixed-length KV cache and attention maps.

Padding, positions and the cache
--------------------------------
* `attention_mask` bool `[B, T]` marks real tokens; padding may sit anywhere (left, right, or
  inside a chunk). Padding keys are never attended. Padding query rows produce finite garbage.
* Positions (RoPE) default to "number of real tokens before this one in the row", counted from
  the cache's per-row `next_position` when a cache is given. Without left padding this is
  `arange`; with padding it makes a padded row compute exactly what the unpadded row computes.
  Explicit `positions` `[B, T]` override this.
* `KVCache` has a fixed number of slots S. A call with a cache writes its chunk of T tokens at
  slots `[length, length + T)` for every row (the same slots for the whole batch), marks the real
  ones in `key_mask`, and advances `length` by T and each row's `next_position` past its last
  real position. Queries attend to earlier-or-same slots whose `key_mask` is True. So prefill
  (T = prompt bucket), one-token decode (T = 1; a finished row passes mask False to write a dead
  slot) and appending a new multi-token turn all use the same call; shapes only depend on
  (B, T, S), so turns with the same chunk shape reuse one compiled program.
* The caller keeps `length + T <= S` (a write past the end is clamped by XLA and would overwrite
  the last slots); `KVCache.is_full` helps loops stop.
* With a cache, maps span the cache slots: full maps are `[B, T, S]` and `image_key_positions`
  index slots. Without a cache they are `[B, T, T]` and positions index the chunk.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from drivekd_jax.models.config import DecoderConfig, MapRequest
from drivekd_jax.models.layers import (
  Embed,
  Linear,
  RMSNorm,
  apply_rope,
  attention,
  constrain,
  dense,
  gather_key_columns,
  rope_tables,
  run_blocks,
)

NO_MAPS = MapRequest()
_CACHE_KV_AXES = ("cache_batch", "cache_kv_heads", "cache_seq", "head_dim")


@flax.struct.dataclass
class KVCache:
  """Fixed-length key/value cache (a pytree).

  Attributes:
    k: per layer, keys `[B, K, S, Dh]` (already rotated; head-major so decode steps read the
      cache without transposing it).
    v: per layer, values `[B, K, S, Dh]`.
    key_mask: bool `[B, S]`, True where a slot holds a real token.
    length: int32 scalar, slots written so far (the same for every row).
    next_position: int32 `[B]`, the RoPE position the row's next real token gets.
  """

  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  key_mask: jax.Array
  length: jax.Array
  next_position: jax.Array

  @classmethod
  def create(
    cls, config: DecoderConfig, batch_size: int, cache_length: int, dtype: jnp.dtype = jnp.float32
  ) -> KVCache:
    """An empty cache with `cache_length` slots."""
    shape = (batch_size, config.num_kv_heads, cache_length, config.resolved_head_dim)
    return cls(
      k=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      v=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
      key_mask=jnp.zeros((batch_size, cache_length), bool),
      length=jnp.zeros((), jnp.int32),
      next_position=jnp.zeros((batch_size,), jnp.int32),
    )

  @classmethod
  def logical_axes(cls, num_layers: int) -> KVCache:
    """The same pytree structure with a `PartitionSpec` of logical axis names per array."""
    kv = jax.P(*_CACHE_KV_AXES)
    return cls(
      k=(kv,) * num_layers,
      v=(kv,) * num_layers,
      key_mask=jax.P("cache_batch", "cache_seq"),
      length=jax.P(),
      next_position=jax.P("cache_batch"),
    )

  @property
  def cache_length(self) -> int:
    return self.key_mask.shape[1]

  @property
  def is_full(self) -> jax.Array:
    return self.length >= self.cache_length


@flax.struct.dataclass
class DecoderOutput:
  """What a decoder call returns.

  Attributes:
    logits: fp32 `[B, T, V]` (or `[B, K, V]` when `logits_indices` was given).
    cache: the updated cache, or None when called without one.
    full_maps: layer -> fp32 `[B, T, T]` (`[B, T, S]` with a cache).
    text_to_image_maps: layer -> fp32 `[B, T, N]`.
    hidden_states: layer -> `[B, T, D]`, the output of that block (the last block's is taken
      before the final norm, unlike HF's last `hidden_states` entry).
  """

  logits: jax.Array
  cache: KVCache | None = None
  full_maps: dict[int, jax.Array] = flax.struct.field(default_factory=dict)
  text_to_image_maps: dict[int, jax.Array] = flax.struct.field(default_factory=dict)
  hidden_states: dict[int, jax.Array] = flax.struct.field(default_factory=dict)


@flax.struct.dataclass
class LayerContext:
  """What every block of one decoder call shares (`Decoder.layer_context`).

  Attributes:
    cos, sin: fp32 `[B, T, head_dim]` rotary tables.
    allowed: bool `[B, T, S]`, query t may attend key s (S = T without a cache).
    positions: int32 `[B, T]` RoPE positions (`[B, 3, T]` with M-RoPE).
    write_index: int32 scalar cache slot of the chunk's first token, or None without a cache.
    key_mask: bool `[B, S]`, the cache's real slots after this chunk, or None without a cache.
  """

  cos: jax.Array
  sin: jax.Array
  allowed: jax.Array
  positions: jax.Array
  write_index: jax.Array | None = None
  key_mask: jax.Array | None = None


@flax.struct.dataclass
class LayerRun:
  """What `Decoder.run_layers` returns for its range of blocks.

  Attributes:
    hidden: `[B, T, D]`, the last block's output.
    full_maps, text_to_image_maps, hidden_states: as in `DecoderOutput`, for the range's layers.
    cache_k, cache_v: the range's updated cache layers (empty without a cache).
  """

  hidden: jax.Array
  full_maps: dict[int, jax.Array]
  text_to_image_maps: dict[int, jax.Array]
  hidden_states: dict[int, jax.Array]
  cache_k: tuple[jax.Array, ...] = ()
  cache_v: tuple[jax.Array, ...] = ()


class Attention(nnx.Module):
  """GQA self-attention with RoPE and optional q/k/v bias."""

  def __init__(self, config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = config.resolved_head_dim
    self.query_block = config.attention_query_block
    self.fused = config.fused_attention
    width = config.hidden_size
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(
      width,
      self.num_heads * self.head_dim,
      axes=("embed", "q_heads"),
      use_bias=config.qkv_bias,
      **common,
    )
    self.k_proj = Linear(
      width,
      self.num_kv_heads * self.head_dim,
      axes=("embed", "kv_heads"),
      use_bias=config.qkv_bias,
      **common,
    )
    self.v_proj = Linear(
      width,
      self.num_kv_heads * self.head_dim,
      axes=("embed", "kv_heads"),
      use_bias=config.qkv_bias,
      **common,
    )
    self.o_proj = Linear(self.num_heads * self.head_dim, width, axes=("q_heads", "embed"), **common)

  def __call__(
    self,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    allowed: jax.Array,
    kv: tuple[jax.Array, jax.Array] | None,
    write_index: jax.Array | None,
    want_map: bool,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, jax.Array | None]:
    """Attends `x` `[B, T, D]`; with `kv` (layer cache `[B, K, S, Dh]` x2) writes the chunk's keys
    and values at slot `write_index` first and attends over all S slots.

    Returns `(out [B, T, D], updated kv or None, head-averaged map or None)`.
    """
    batch, length, _ = x.shape
    q = self.q_proj(x).reshape(batch, length, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(batch, length, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin).transpose(0, 2, 1, 3)  # [B, K, T, Dh]
    v = v.transpose(0, 2, 1, 3)
    new_kv = None
    if kv is not None:
      start = (0, 0, write_index, 0)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      new_kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    out, head_mean = attention(
      q, k, v, allowed, want_map=want_map, query_block=self.query_block, fused=self.fused
    )
    return self.o_proj(out.reshape(batch, length, -1)), new_kv, head_mean


class MLP(nnx.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width, inner = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(width, inner, axes=("embed", "mlp"), **common)
    self.up_proj = Linear(width, inner, axes=("embed", "mlp"), **common)
    self.down_proj = Linear(inner, width, axes=("mlp", "embed"), **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: `h = x + attn(norm(x)); y = h + mlp(norm(h))`."""

  def __init__(self, config: DecoderConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.input_layernorm = RMSNorm(config.hidden_size, **norm)
    self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
    self.mlp = MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, allowed, kv, write_index, want_map):
    x = constrain(x, ("batch", "activation_length", "activation_embed"))
    attn_out, new_kv, head_mean = self.self_attn(
      self.input_layernorm(x), cos, sin, allowed, kv, write_index, want_map
    )
    h = x + attn_out
    return h + self.mlp(self.post_attention_layernorm(h)), new_kv, head_mean


def default_positions(attention_mask: jax.Array, start: jax.Array | int = 0) -> jax.Array:
  """Positions that count real tokens: `start + (#real tokens before t in the row)`.

  Args:
    attention_mask: bool `[B, T]`.
    start: int or int32 `[B]`, the first real token's position per row.

  Returns:
    int32 `[B, T]`; `arange` for an unpadded row; padding slots get their neighbour's value.
  """
  counts = jnp.cumsum(attention_mask.astype(jnp.int32), axis=1) - 1
  start = jnp.asarray(start, jnp.int32)
  if start.ndim == 1:
    start = start[:, None]
  return jnp.maximum(start + counts, start)


class Decoder(nnx.Module):
  """Qwen2 / Qwen2.5 / LLaMA causal language model.

  Parameter paths (for loaders): `embed_tokens.embedding [V, D]`;
  `layers[i].input_layernorm.scale`, `layers[i].self_attn.{q,k,v,o}_proj.kernel [in, out]`,
  `layers[i].self_attn.{q,k,v}_proj.bias` (when `qkv_bias`), `layers[i].post_attention_layernorm
  .scale`, `layers[i].mlp.{gate,up,down}_proj.kernel`; `norm.scale`; `lm_head.kernel [D, V]`
  (None when the head is tied to the embedding).
  """

  def __init__(
    self,
    config: DecoderConfig,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed_tokens = Embed(config.vocab_size, config.hidden_size, **common)
    self.layers = nnx.List([DecoderLayer(config, **common) for _ in range(config.num_layers)])
    self.norm = RMSNorm(
      config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = Linear(
        config.hidden_size, config.vocab_size, axes=("embed", "vocab"), **common
      )

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """int `[B, L]` -> `[B, L, D]` in the compute dtype."""
    return self.embed_tokens(input_ids)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Final-normed hidden states `[..., D]` -> fp32 logits `[..., V]`."""
    if self.lm_head is None:
      return self.embed_tokens.attend(hidden)
    kernel = self.lm_head.kernel[...].astype(self.dtype)
    return dense(hidden.astype(self.dtype), kernel, jnp.float32)

  def head(self, hidden: jax.Array) -> jax.Array:
    """The last block's output `[..., D]` -> fp32 logits `[..., V]` (final norm, then head)."""
    return self.logits(self.norm(hidden))

  def init_cache(self, batch_size: int, cache_length: int, dtype=None) -> KVCache:
    """An empty cache with `cache_length` slots, in the compute dtype unless `dtype` is given."""
    return KVCache.create(self.config, batch_size, cache_length, dtype or self.dtype)

  def __call__(
    self,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    positions: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
    maps: MapRequest = NO_MAPS,
    image_key_positions: jax.Array | None = None,
    logits_indices: jax.Array | None = None,
  ) -> DecoderOutput:
    """Runs the decoder on a chunk of T tokens.

    Args:
      input_ids: int `[B, T]`; or give `inputs_embeds` `[B, T, D]` instead.
      positions: int32 `[B, T]`, or `[B, 3, T]` M-RoPE positions when the config has an
        `mrope_section`; defaults to counting real tokens (see module docstring).
      attention_mask: bool `[B, T]`, True for real tokens; defaults to all True.
      cache: a `KVCache` to write this chunk into and attend over; None for a plain causal pass.
      maps: which layers return attention maps / hidden states (static).
      image_key_positions: int32 `[B, N]` key indices for `maps.text_to_image_layers`.
      logits_indices: optional int32 `[B, K]`: compute logits only at these chunk positions.

    Returns:
      A `DecoderOutput`.
    """
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("pass exactly one of input_ids and inputs_embeds")
    x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
    batch, length = x.shape[:2]
    if attention_mask is None:
      attention_mask = jnp.ones((batch, length), bool)
    attention_mask = attention_mask.astype(bool)
    ctx = self.layer_context(attention_mask, positions, cache)
    run = self.run_layers(
      x,
      ctx,
      range(self.config.num_layers),
      maps=maps,
      image_key_positions=image_key_positions,
      cache=cache,
    )
    x = run.hidden

    if logits_indices is not None:
      x = jnp.take_along_axis(x, logits_indices[:, :, None].astype(jnp.int32), axis=1)
    logits = self.head(x)

    new_cache = None
    if cache is not None:
      # M-RoPE positions [B, 3, T]: the next text token follows the largest of the three axes.
      top = ctx.positions.max(axis=1) if ctx.positions.ndim == 3 else ctx.positions
      last_real = jnp.max(jnp.where(attention_mask, top + 1, 0), axis=1)
      new_cache = KVCache(
        k=run.cache_k,
        v=run.cache_v,
        key_mask=ctx.key_mask,
        length=cache.length + length,
        next_position=jnp.maximum(cache.next_position, last_real.astype(jnp.int32)),
      )
    return DecoderOutput(
      logits=logits,
      cache=new_cache,
      full_maps=run.full_maps,
      text_to_image_maps=run.text_to_image_maps,
      hidden_states=run.hidden_states,
    )

  def layer_context(
    self,
    attention_mask: jax.Array,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> LayerContext:
    """What every block of one call shares (see the module docstring for positions and masks).

    Args:
      attention_mask: bool `[B, T]`, True for real tokens.
      positions: int32 `[B, T]` (`[B, 3, T]` with M-RoPE), or None to count real tokens.
      cache: the cache the call writes into, or None for a plain causal pass.
    """
    length = attention_mask.shape[1]
    if cache is None:
      if positions is None:
        positions = default_positions(attention_mask)
      causal = jnp.tril(jnp.ones((length, length), bool))
      allowed = attention_mask[:, None, :] & causal[None]
      write_index, key_mask = None, None
    else:
      if positions is None:
        positions = default_positions(attention_mask, cache.next_position)
      write_index = cache.length
      key_mask = jax.lax.dynamic_update_slice(cache.key_mask, attention_mask, (0, write_index))
      slots = jnp.arange(cache.cache_length)
      causal = slots[None, :] <= write_index + jnp.arange(length)[:, None]
      allowed = key_mask[:, None, :] & causal[None]
    cos, sin = rope_tables(
      positions, self.config.resolved_head_dim, self.config.rope_theta, self.config.mrope_section
    )
    return LayerContext(
      cos=cos,
      sin=sin,
      allowed=allowed,
      positions=positions,
      write_index=write_index,
      key_mask=key_mask,
    )

  def run_layers(
    self,
    x: jax.Array,
    ctx: LayerContext,
    layers: Sequence[int],
    *,
    maps: MapRequest = NO_MAPS,
    image_key_positions: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> LayerRun:
    """Runs the blocks `layers` (consecutive, ascending) on `x` `[B, T, D]`.

    `maps` is resolved on the full depth and only its layers inside `layers` are produced, so a
    forward pass may be cut into ranges (the train step differentiates each range on its own).
    With a `cache`, each block reads and writes its own slot of it.
    """
    request = maps.resolve(self.config.num_layers)
    if request.text_to_image_layers and image_key_positions is None:
      raise ValueError("text_to_image maps were requested without image_key_positions")
    if cache is None and (self.config.scan_layers or self.config.layer_remat != "none"):
      return self._run_layer_runs(x, ctx, layers, request, image_key_positions)
    full_maps, t2i_maps, hidden_states = {}, {}, {}
    new_k, new_v = [], []
    for i in layers:
      want_map = i in request.full_layers or i in request.text_to_image_layers
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, layer_kv, head_mean = self.layers[i](
        x, ctx.cos, ctx.sin, ctx.allowed, kv, ctx.write_index, want_map
      )
      if layer_kv is not None:
        new_k.append(layer_kv[0])
        new_v.append(layer_kv[1])
      _keep_signals(
        (full_maps, t2i_maps, hidden_states), i, head_mean, x, request, image_key_positions
      )
    return LayerRun(
      hidden=x,
      full_maps=full_maps,
      text_to_image_maps=t2i_maps,
      hidden_states=hidden_states,
      cache_k=tuple(new_k),
      cache_v=tuple(new_v),
    )

  def _run_layer_runs(self, x, ctx, layers, request, image_key_positions) -> LayerRun:
    """`run_layers` without a cache through `layers.run_blocks`: consecutive layers that hand
    back the same kinds of signal form one run (one scan under `config.scan_layers`), each
    layer rematerialised under `config.layer_remat`."""
    kinds = lambda i: (
      i in request.full_layers or i in request.text_to_image_layers,
      i in request.hidden_layers,
    )
    runs = [list(run) for _, run in itertools.groupby(layers, key=kinds)]
    full_maps, t2i_maps, hidden_states = {}, {}, {}
    for run in runs:
      want_map, want_hidden = kinds(run[0])

      def apply(layer, x, want_map=want_map, want_hidden=want_hidden):
        x, _, head_mean = layer(x, ctx.cos, ctx.sin, ctx.allowed, None, None, want_map)
        return x, (head_mean, x if want_hidden else None)

      x, outputs = run_blocks(
        [self.layers[i] for i in run],
        x,
        apply,
        scan=self.config.scan_layers,
        remat=self.config.layer_remat,
      )
      for i, (head_mean, hidden) in zip(run, outputs):
        _keep_signals(
          (full_maps, t2i_maps, hidden_states), i, head_mean, hidden, request, image_key_positions
        )
    return LayerRun(
      hidden=x, full_maps=full_maps, text_to_image_maps=t2i_maps, hidden_states=hidden_states
    )


def _keep_signals(signals, i, head_mean, hidden, request, image_key_positions) -> None:
  """Stores layer `i`'s requested signals into `signals` = (full maps, text-to-image maps,
  hidden states), dicts keyed by layer: the one bookkeeping of the looped and scanned paths."""
  full_maps, t2i_maps, hidden_states = signals
  if i in request.full_layers:
    full_maps[i] = head_mean
  if i in request.text_to_image_layers:
    t2i_maps[i] = gather_key_columns(head_mean, image_key_positions)
  if i in request.hidden_layers:
    hidden_states[i] = hidden
