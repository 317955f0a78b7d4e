"""Janus generation on the project's `SamplerLoop`: text (the LM head) and image tokens
(classifier-free guidance through the generation head), each one jitted program per shape.

Image generation follows transformers' `generate(generation_mode="image")` and the original
Janus: the batch is `[B conditional rows, B unconditional rows]`; an unconditional row is its
prompt with every token other than BOS and `<begin_of_image>` replaced by the pad token. Both
rows of a pair are fed the same sampled token; logits are `u + s (c - u)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drivekd_jax.models.qwen2 import KVCache
from drivekd_jax.models.sampling import GREEDY, SamplerLoop, SamplingMethod, SamplingState
from imug_jax.models.janus.network import ImageGeneration, Janus
from imug_jax.models.tiny import GuidedSampling


def unconditional_ids(input_ids: np.ndarray, keep_ids: tuple[int, ...], pad_id: int) -> np.ndarray:
  """Prompt ids `[B, L]` with every id not in `keep_ids` replaced by `pad_id`."""
  return np.where(np.isin(input_ids, keep_ids), input_ids, pad_id).astype(np.int32)


def image_sampling(
  num_cond: int, guidance: float, num_codes: int, temperature: float = 0.0, top_p: float = 1.0
) -> SamplingMethod:
  """Guided sampling over the codebook for a `[num_cond cond, num_cond uncond]` batch."""
  return GuidedSampling(
    temperature=temperature,
    top_p=top_p,
    guidance=guidance,
    num_cond=num_cond,
    low=0,
    high=num_codes,
  )


def generate_image_tokens(
  janus: Janus,
  input_ids: np.ndarray,
  *,
  bos_id: int,
  boi_id: int,
  pad_id: int,
  guidance: float = 5.0,
  temperature: float = 0.0,
  rng: jax.Array | None = None,
) -> np.ndarray:
  """Image-token codes for prompts ending in `<begin_of_image>`.

  Args:
    janus: the model.
    input_ids: int `[B, L]` prompts (no padding).
    bos_id, boi_id, pad_id: the tokens the unconditional rows keep / are filled with.
    guidance: CFG scale.
    temperature: 0 for greedy.
    rng: PRNG key when sampling.

  Returns:
    int32 `[B, num_image_tokens]` codes.
  """
  input_ids = np.asarray(input_ids, np.int32)
  batch, length = input_ids.shape
  rows = np.concatenate([input_ids, unconditional_ids(input_ids, (bos_id, boi_id), pad_id)])
  num_tokens = janus.config.vq.num_tokens
  graphdef, params = nnx.split(ImageGeneration(janus))
  loop = SamplerLoop(
    graphdef=graphdef,
    max_new_tokens=num_tokens,
    method=image_sampling(batch, guidance, janus.config.vq.num_embeddings, temperature),
  )
  embeds = _embed_text(janus, jnp.asarray(rows))
  cache = KVCache.create(janus.config.text, 2 * batch, length + 1 + num_tokens, janus.dtype)
  state = _run(loop, params, embeds, cache, rng)
  return np.asarray(state.tokens[:batch])


def generate_text(
  janus: Janus,
  input_ids: np.ndarray,
  pixel_values: np.ndarray | None = None,
  *,
  max_new_tokens: int,
  stop_token_ids: tuple[int, ...] = (),
  method: SamplingMethod = GREEDY,
  rng: jax.Array | None = None,
) -> SamplingState:
  """Text answers to `input_ids` `[B, L]` (image placeholders filled from `pixel_values`)."""
  batch, length = np.shape(input_ids)
  graphdef, params = nnx.split(janus.language_model)
  loop = SamplerLoop(
    graphdef=graphdef,
    max_new_tokens=max_new_tokens,
    stop_token_ids=tuple(int(t) for t in stop_token_ids),
    method=method,
  )
  embeds = _embed_inputs(janus, jnp.asarray(input_ids, jnp.int32), pixel_values)
  cache = KVCache.create(janus.config.text, batch, length + 1 + max_new_tokens, janus.dtype)
  return _run(loop, params, embeds, cache, rng)


@nnx.jit
def _embed_text(janus: Janus, ids: jax.Array) -> jax.Array:
  return janus.language_model.embed(ids)


@nnx.jit
def _embed_inputs(janus: Janus, ids: jax.Array, pixel_values) -> jax.Array:
  return janus.embed_inputs(ids, pixel_values)


def _run(loop: SamplerLoop, params, embeds, cache, rng) -> SamplingState:
  batch = embeds.shape[0]
  return loop.run(
    params,
    embeds,
    jnp.ones(embeds.shape[:2], bool),
    cache,
    jnp.zeros((batch,), jnp.int32),
    jnp.zeros((batch,), bool),
    jax.random.key(0) if rng is None else rng,
  )
