"""Janus generation on the project's `SamplerLoop`: text (the LM head) and image tokens
(classifier-free guidance through the generation head), each one jitted program per shape.

Image generation follows transformers' `generate(generation_mode="image")` and the original
Janus: the batch is `[B conditional rows, B unconditional rows]`; an unconditional row is its
prompt with every token other than BOS and `<begin_of_image>` replaced by the pad token. Both
rows of a pair are fed the same sampled token; logits are `u + s (c - u)`.
"""

from __future__ import annotations

import functools

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


class JanusGenerator:
  """Jitted generation with one Janus: the model is split once, every call with the same shapes
  reuses one compiled program (the turn, the embedding, the VQ decoder)."""

  def __init__(self, janus: Janus):
    self.config = janus.config
    self.dtype = janus.dtype
    self.graphdef, self.params = nnx.split(janus)
    self.text_graphdef, self.text_params = nnx.split(janus.language_model)
    self.image_graphdef, self.image_params = nnx.split(ImageGeneration(janus))

  def image_tokens(
    self,
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
    num_tokens = self.config.vq.num_tokens
    loop = SamplerLoop(
      graphdef=self.image_graphdef,
      max_new_tokens=num_tokens,
      method=image_sampling(batch, guidance, self.config.vq.num_embeddings, temperature),
    )
    embeds = _embed(self.graphdef, self.params, jnp.asarray(rows), None)
    cache = KVCache.create(self.config.text, 2 * batch, length + 1 + num_tokens, self.dtype)
    state = _run(loop, self.image_params, embeds, cache, rng)
    return np.asarray(state.tokens[:batch])

  def text(
    self,
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
    loop = SamplerLoop(
      graphdef=self.text_graphdef,
      max_new_tokens=max_new_tokens,
      stop_token_ids=tuple(int(t) for t in stop_token_ids),
      method=method,
    )
    ids = jnp.asarray(input_ids, jnp.int32)
    pixels = None if pixel_values is None else jnp.asarray(pixel_values)
    embeds = _embed(self.graphdef, self.params, ids, pixels)
    cache = KVCache.create(self.config.text, batch, length + 1 + max_new_tokens, self.dtype)
    return _run(loop, self.text_params, embeds, cache, rng)

  def decode(self, codes: np.ndarray) -> jax.Array:
    """Codes `[N, P*P]` -> pixels `[N, S, S, 3]` in about `[-1, 1]` (the VQ decoder)."""
    return _decode(self.graphdef, self.params, jnp.asarray(codes, jnp.int32))


def generate_image_tokens(janus: Janus, input_ids: np.ndarray, **kwargs) -> np.ndarray:
  """`JanusGenerator(janus).image_tokens(input_ids, **kwargs)` (one-off calls)."""
  return JanusGenerator(janus).image_tokens(input_ids, **kwargs)


def generate_text(janus: Janus, input_ids, pixel_values=None, **kwargs) -> SamplingState:
  """`JanusGenerator(janus).text(input_ids, pixel_values, **kwargs)` (one-off calls)."""
  return JanusGenerator(janus).text(input_ids, pixel_values, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _embed(graphdef, params, ids, pixel_values):
  return nnx.merge(graphdef, params).embed_inputs(ids, pixel_values)


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, params, codes):
  return nnx.merge(graphdef, params).vqmodel.decode(codes)


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
