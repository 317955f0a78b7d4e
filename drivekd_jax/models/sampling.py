"""Jitted sampling over a fixed-length KV cache: prefill, then a `lax.while_loop` of decode steps.

`SamplerLoop` is a frozen dataclass of static, hashable settings (the decoder's graph definition,
lengths, stop ids, the sampling method); its `run` is jitted with `self` static, so every call
with the same shapes reuses one compiled program. All changing values (parameters, cache, tokens,
flags, PRNG key) travel in the `SamplingState` pytree.

A turn is: write `[pending token] + chunk` into the cache (the pending token is the previous
turn's last sampled token, which was never fed; on the first turn it is a dead slot), take the
logits at the last real position, sample, then decode one token per step until every row has
produced a stop token, `max_new_tokens` are out, or the cache is full. Finished rows keep
writing dead slots (mask False), so the cache holds exactly each row's real conversation and a
later turn can append to it (`Sampler.continue_`) with the same compiled program as long as the
chunk shape repeats.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from drivekd_jax.models.qwen2 import Decoder, KVCache


@dataclasses.dataclass(frozen=True)
class SamplingMethod:
  """How the next token is chosen from fp32 logits.

  Attributes:
    temperature: 0 means greedy (argmax); otherwise logits are divided by it and sampled.
    top_p: nucleus size; the smallest set of top tokens whose probability reaches `top_p` is kept
      (1.0 keeps everything). Ignored when greedy.
  """

  temperature: float = 0.0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

  def next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    """fp32 `[B, V]` -> int32 `[B]`."""
    if self.temperature == 0.0:
      return greedy_tokens(logits)
    logits = logits / self.temperature
    if self.top_p < 1.0:
      sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
      probs = jax.nn.softmax(sorted_logits, axis=-1)
      mass_before = jnp.cumsum(probs, axis=-1) - probs
      keep = mass_before < self.top_p  # the top token always stays
      cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
      logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def greedy_tokens(logits: jax.Array) -> jax.Array:
  """`argmax` over the last axis, fp32 `[B, V]` -> int32 `[B]`: the first index of the maximum.

  Two plain reductions (the maximum, then the first index holding it) instead of XLA's
  value-and-index reduction, which XLA:CPU runs several times slower over a vocabulary-sized row
  (`docs/benchmarks.md` §4). NaN counts as +inf here (so a row with NaN gives the first NaN or
  +inf entry).
  """
  logits = jnp.where(jnp.isnan(logits), jnp.inf, logits)
  top = jnp.max(logits, axis=-1, keepdims=True)
  index = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  return jnp.min(jnp.where(logits == top, index, logits.shape[-1]), axis=-1)


GREEDY = SamplingMethod()


@flax.struct.dataclass
class SamplingState:
  """The loop's pytree state, also what a turn returns.

  Attributes:
    step: int32 scalar, tokens sampled so far in this turn.
    done: bool `[B]`, the row produced a stop token (or had no real input).
    pending_token: int32 `[B]`, the last sampled token of the row, not yet in the cache (the next
      turn feeds it first).
    tokens: int32 `[B, max_new_tokens]`, this turn's sampled tokens, `pad_token_id` after a stop.
    num_tokens: int32 `[B]`, sampled tokens per row including its stop token.
    cache: the KV cache after this turn.
    rng: the PRNG key for the next draw.
  """

  step: jax.Array
  done: jax.Array
  pending_token: jax.Array
  tokens: jax.Array
  num_tokens: jax.Array
  cache: KVCache
  rng: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplerLoop:
  """Static description of a sampling turn; only hashable attributes, so it can be a static arg.

  Attributes:
    graphdef: `nnx.split(decoder)[0]` of a `Decoder`.
    max_new_tokens: tokens sampled per turn at most.
    stop_token_ids: any of these ends a row (it is kept in `tokens` and in the cache).
    pad_token_id: written into `tokens` after a row stops.
    method: greedy / temperature / top-p.
  """

  graphdef: nnx.GraphDef
  max_new_tokens: int
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0
  method: SamplingMethod = GREEDY

  def __post_init__(self):
    # jit hashes a static argument on every call; a graphdef's hash walks the whole graph.
    fields = tuple(getattr(self, f.name) for f in dataclasses.fields(self))
    object.__setattr__(self, "_hash", hash(fields))

  def __hash__(self) -> int:
    return self._hash

  @functools.partial(jax.jit, static_argnames=("self",), donate_argnames=("cache",))
  def run(self, params, chunk, chunk_mask, cache, pending_token, pending_valid, rng):
    """The jitted turn (see `turn`); `cache` is donated."""
    return self.turn(params, chunk, chunk_mask, cache, pending_token, pending_valid, rng)

  def turn(
    self,
    params: nnx.State,
    chunk: jax.Array,
    chunk_mask: jax.Array,
    cache: KVCache,
    pending_token: jax.Array,
    pending_valid: jax.Array,
    rng: jax.Array,
  ) -> SamplingState:
    """One turn: prefill `[pending] + chunk` into `cache`, then decode.

    Args:
      params: the decoder's state, `nnx.split(decoder)[1]`.
      chunk: int token ids `[B, T]` or embeddings `[B, T, D]`.
      chunk_mask: bool `[B, T]`, True for real tokens (any padding layout).
      cache: the cache to append to (donated: do not reuse the argument afterwards).
      pending_token: int32 `[B]`, fed before the chunk where `pending_valid`.
      pending_valid: bool `[B]`.
      rng: PRNG key.

    Returns:
      The final `SamplingState`.
    """
    model = nnx.merge(self.graphdef, params)
    embeds = model.embed(chunk) if chunk.ndim == 2 else chunk.astype(model.dtype)
    embeds = jnp.concatenate([model.embed(pending_token)[:, None], embeds], axis=1)
    mask = jnp.concatenate([pending_valid[:, None], chunk_mask.astype(bool)], axis=1)
    batch, length = mask.shape
    last_real = (length - 1) - jnp.argmax(mask[:, ::-1], axis=1)
    out = model(
      inputs_embeds=embeds, attention_mask=mask, cache=cache, logits_indices=last_real[:, None]
    )
    stop_ids = jnp.asarray(self.stop_token_ids or (-1,), jnp.int32)
    rng, draw = jax.random.split(rng)
    first = self.method.next_tokens(out.logits[:, 0], draw)
    empty_row = ~jnp.any(mask, axis=1)
    first = jnp.where(empty_row, self.pad_token_id, first)
    tokens = jnp.full((batch, self.max_new_tokens), self.pad_token_id, jnp.int32)
    state = SamplingState(
      step=jnp.ones((), jnp.int32),
      done=empty_row | jnp.isin(first, stop_ids),
      pending_token=jnp.where(empty_row, pending_token, first),
      tokens=tokens.at[:, 0].set(first),
      num_tokens=(~empty_row).astype(jnp.int32),
      cache=out.cache,
      rng=rng,
    )

    def keep_going(state: SamplingState) -> jax.Array:
      return (state.step < self.max_new_tokens) & ~jnp.all(state.done) & ~state.cache.is_full

    def decode_step(state: SamplingState) -> SamplingState:
      step_out = model(
        inputs_embeds=model.embed(state.pending_token)[:, None],
        attention_mask=~state.done[:, None],
        cache=state.cache,
      )
      rng, draw = jax.random.split(state.rng)
      sampled = self.method.next_tokens(step_out.logits[:, 0], draw)
      sampled = jnp.where(state.done, self.pad_token_id, sampled)
      return SamplingState(
        step=state.step + 1,
        done=state.done | jnp.isin(sampled, stop_ids),
        pending_token=jnp.where(state.done, state.pending_token, sampled),
        tokens=jax.lax.dynamic_update_slice(state.tokens, sampled[:, None], (0, state.step)),
        num_tokens=state.num_tokens + (~state.done).astype(jnp.int32),
        cache=step_out.cache,
        rng=rng,
      )

    return jax.lax.while_loop(keep_going, decode_step, state)


class Sampler:
  """Batched generation (and multi-turn continuation) for a `Decoder`.

  Example:
    sampler = Sampler(decoder, cache_length=256, max_new_tokens=32, stop_token_ids=(eos,))
    state = sampler.generate(input_ids, attention_mask=mask, rng=jax.random.key(0))
    state.tokens, state.num_tokens        # [B, 32], [B]
    state = sampler.continue_(state, next_user_ids, attention_mask=next_mask)  # next turn

  The parameters are captured at construction (`nnx.split`); build a new `Sampler` after they
  change. Calls with the same shapes never retrace. On a mesh, pass `cache_sharding` (a `KVCache`
  of `NamedSharding`s, e.g. from `KVCache.logical_axes` and the rules table) so fresh caches are
  born sharded; sharded parameters are used where they are.
  """

  def __init__(
    self,
    decoder: Decoder,
    *,
    cache_length: int,
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 0,
    method: SamplingMethod = GREEDY,
    cache_dtype: jnp.dtype | None = None,
    cache_sharding: KVCache | None = None,
  ):
    graphdef, self.params = nnx.split(decoder)
    self.config = decoder.config
    self.cache_length = cache_length
    self.cache_dtype = cache_dtype or decoder.dtype
    self.cache_sharding = cache_sharding
    self._new_cache = jax.jit(
      functools.partial(
        KVCache.create, self.config, cache_length=cache_length, dtype=self.cache_dtype
      ),
      static_argnums=(0,),
      out_shardings=cache_sharding,
    )
    self.loop = SamplerLoop(
      graphdef=graphdef,
      max_new_tokens=max_new_tokens,
      stop_token_ids=tuple(int(t) for t in stop_token_ids),
      pad_token_id=pad_token_id,
      method=method,
    )

  def generate(
    self,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    rng: jax.Array | None = None,
  ) -> SamplingState:
    """First turn into a fresh cache.

    Args:
      input_ids: int `[B, T]` prompts (any padding layout), or give `inputs_embeds` `[B, T, D]`.
      attention_mask: bool `[B, T]`, True for real tokens; defaults to all True.
      rng: PRNG key (unused when greedy; defaults to key 0).

    Returns:
      The turn's `SamplingState` (tokens, counts, cache for `continue_`).
    """
    chunk = _one_of(input_ids, inputs_embeds)
    batch, length = chunk.shape[:2]
    if length + 1 > self.cache_length:
      raise ValueError(f"a prompt of {length} tokens does not fit a cache of {self.cache_length}")
    cache = self._new_cache(batch)
    no_pending = jnp.zeros((batch,), jnp.int32)
    return self._run(chunk, attention_mask, cache, no_pending, jnp.zeros((batch,), bool), rng)

  def continue_(
    self,
    state: SamplingState,
    input_ids: jax.Array | None = None,
    *,
    inputs_embeds: jax.Array | None = None,
    attention_mask: jax.Array | None = None,
    rng: jax.Array | None = None,
  ) -> SamplingState:
    """Next turn: appends the previous turn's last token and the new chunk, then samples.

    `state.cache` is donated (reused in place); keep only the returned state.
    """
    chunk = _one_of(input_ids, inputs_embeds)
    used = int(state.cache.length)  # one scalar read per turn, so overflow fails loudly
    if used + chunk.shape[1] + 1 > self.cache_length:
      raise ValueError(
        f"a {chunk.shape[1]}-token turn after {used} cached slots does not fit a cache of "
        f"{self.cache_length}"
      )
    rng = state.rng if rng is None else rng
    valid = jnp.ones(state.pending_token.shape, bool)
    return self._run(chunk, attention_mask, state.cache, state.pending_token, valid, rng)

  def _run(self, chunk, attention_mask, cache, pending_token, pending_valid, rng):
    if attention_mask is None:
      attention_mask = jnp.ones(chunk.shape[:2], bool)
    rng = jax.random.key(0) if rng is None else rng
    return self.loop.run(
      self.params, chunk, attention_mask, cache, pending_token, pending_valid, rng
    )


def _one_of(input_ids, inputs_embeds):
  if (input_ids is None) == (inputs_embeds is None):
    raise ValueError("pass exactly one of input_ids and inputs_embeds")
  return input_ids if inputs_embeds is None else inputs_embeds


def completions(state: SamplingState) -> list[list[int]]:
  """The sampled tokens of each row as Python lists (stop token included)."""
  tokens = jax.device_get(state.tokens)
  counts = jax.device_get(state.num_tokens)
  return [row[:count].tolist() for row, count in zip(tokens, counts)]
