"""InternVL3 in Flax NNX: InternViT -> drop CLS -> pixel shuffle -> mlp1 -> Qwen2 decoder.

Images reach the decoder through the positions of `input_ids` that hold `config.image_token_id`
(`<IMG_CONTEXT>`): the k-th such position receives the k-th image embedding, `tokens_per_image`
(256 at 448 px) per image, exactly like the reference's `embeds[ids == IMG_CONTEXT] = vit_embeds`.

`pixel_values` comes in one of two layouts:

* `[N, H, W, 3]`: all images of the batch in order of appearance (row 0's images first). The
  batch must hold exactly `N * tokens_per_image` image-context tokens.
* `[B, M, H, W, 3]`: M image slots per row; row b's image-context positions take row b's images in
  order. A row with fewer than M images leaves its trailing slots unused (padding; they still go
  through the ViT so that shapes stay fixed, but nothing reads them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drivekd_jax.models.config import InternVLConfig, MapRequest, as_dtype
from drivekd_jax.models.intern_vit import InternViT, LayerNorm
from drivekd_jax.models.layers import Linear
from drivekd_jax.models.qwen2 import Decoder, DecoderOutput, KVCache
from drivekd_jax.models.sampling import GREEDY, Sampler, SamplingMethod, SamplingState

# The reference builds mlp1's LayerNorm with PyTorch's default epsilon.
PROJECTOR_LAYER_NORM_EPS = 1e-5
NO_MAPS = MapRequest()


def pixel_shuffle(features: jax.Array, ratio: float) -> jax.Array:
  """InternVL's pixel shuffle (ps_version v2): `[N, h, w, C]` -> `[N, h*r, w*r, C/r^2]`.

  Output token (i, j) concatenates the input tokens `(f*i + p, f*j + q)` (f = 1/r) with channel
  index `(p * f + q) * C + c`: row offset outermost, then column offset, then channel. This is the
  order produced by the reference's view/permute/view/permute sequence.
  """
  factor = round(1 / ratio)
  if abs(factor * ratio - 1) > 1e-6:
    raise ValueError(f"downsample_ratio {ratio} is not 1/integer")
  n, h, w, c = features.shape
  if h % factor or w % factor:
    raise ValueError(f"feature grid {h}x{w} is not divisible by the shuffle factor {factor}")
  x = features.reshape(n, h // factor, factor, w // factor, factor, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(n, h // factor, w // factor, factor * factor * c)


def image_key_positions(
  tokens_or_mask: jax.Array, num_keys: int, image_token_id: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """Positions of the image tokens in each row, in order, padded to a fixed count.

  Args:
    tokens_or_mask: int `[B, L]` token ids (then `image_token_id` is required) or bool `[B, L]`
      image mask.
    num_keys: N, the fixed number of positions returned per row (e.g. slots x tokens_per_image).
    image_token_id: the image-context id when `tokens_or_mask` holds ids.

  Returns:
    `(positions int32 [B, N], valid bool [B, N])`: the first N image positions of each row in
    increasing order; rows with fewer have `valid` False (and position 0) in the tail.
  """
  if tokens_or_mask.dtype == jnp.bool_:
    mask = tokens_or_mask
  else:
    if image_token_id is None:
      raise ValueError("image_key_positions got token ids but no image_token_id")
    mask = tokens_or_mask == image_token_id
  batch, length = mask.shape
  if length < num_keys:
    mask = jnp.pad(mask, ((0, 0), (0, num_keys - length)))
  # A stable sort of "not image" puts the image positions first, in their original order.
  order = jnp.argsort(~mask, axis=1, stable=True)[:, :num_keys].astype(jnp.int32)
  valid = jnp.arange(num_keys)[None, :] < jnp.sum(mask, axis=1, keepdims=True)
  return jnp.where(valid, order, 0), valid


class Projector(nnx.Module):
  """`mlp1`: LayerNorm(C*f^2) -> Linear(C*f^2 -> D) -> GELU -> Linear(D -> D)."""

  def __init__(self, in_features: int, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.norm = LayerNorm(
      in_features, eps=PROJECTOR_LAYER_NORM_EPS, dtype=dtype, param_dtype=param_dtype
    )
    self.fc1 = Linear(
      in_features,
      width,
      axes=("proj_in", "embed"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.fc2 = Linear(
      width,
      width,
      axes=(None, "embed"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(self.norm(x)), approximate=False))


class InternVL(nnx.Module):
  """InternVL3 (`InternVLChatModel` / `InternVLForConditionalGeneration`).

  Submodules: `vision_model` (InternViT), `mlp1` (Projector), `language_model` (Decoder).
  """

  def __init__(self, config: InternVLConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = as_dtype(config.dtype), as_dtype(config.param_dtype)
    self.dtype = dtype
    self.vision_model = InternViT(config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    factor = round(1 / config.downsample_ratio)
    self.mlp1 = Projector(
      config.vision.hidden_size * factor * factor,
      config.text.hidden_size,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.language_model = Decoder(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def embed_images(self, pixel_values: jax.Array) -> jax.Array:
    """`[N, H, W, 3]` NHWC images -> `[N, T, D]` image embeddings in the decoder's width.

    T = (H/p * r) * (W/p * r), 256 for 448 px tiles.
    """
    # The tower follows the decoder's scan and remat switches (one pair per model).
    hidden = self.vision_model(
      pixel_values,
      select_layer=self.config.vision_select_layer,
      scan=self.config.text.scan_layers,
      remat=self.config.text.layer_remat,
    )
    n, _, width = hidden.shape
    patch = self.config.vision.patch_size
    grid_h, grid_w = pixel_values.shape[1] // patch, pixel_values.shape[2] // patch
    patches = hidden[:, 1:].reshape(n, grid_h, grid_w, width)
    shuffled = pixel_shuffle(patches, self.config.downsample_ratio)
    return self.mlp1(shuffled.reshape(n, -1, shuffled.shape[-1]))

  def check_image_tokens(self, input_ids, pixel_values) -> None:
    """Raises ValueError unless the image-context tokens of concrete `input_ids` match the
    images: exactly N*T in total (`[N, H, W, 3]`), or per row a multiple of T and at most M*T
    (`[B, M, H, W, 3]`)."""
    if pixel_values is None:
      return
    mask = np.asarray(input_ids) == self.config.image_token_id
    per_image = self.image_tokens(pixel_values.shape[-3], pixel_values.shape[-2])
    token_id = self.config.image_token_id
    if pixel_values.ndim == 4:
      found, wanted = int(mask.sum()), pixel_values.shape[0] * per_image
      if found != wanted:
        raise ValueError(
          f"input_ids hold {found} image-context tokens (id {token_id}) but pixel_values has "
          f"{pixel_values.shape[0]} images x {per_image} tokens = {wanted}"
        )
    elif pixel_values.ndim == 5:
      slots = pixel_values.shape[1]
      for row, found in enumerate(mask.sum(axis=1)):
        if found > slots * per_image or found % per_image:
          raise ValueError(
            f"row {row} of input_ids holds {found} image-context tokens (id {token_id}); "
            f"expected a multiple of {per_image} per image and at most {slots} images"
          )

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None) -> jax.Array:
    """Token embeddings `[B, L, D]` with image embeddings written at the image-context positions.

    Args:
      input_ids: int `[B, L]`.
      pixel_values: None (text only), `[N, H, W, 3]` (global order) or `[B, M, H, W, 3]`
        (per-row slots; see the module docstring). Token counts are checked when `input_ids`
        is concrete (`check_image_tokens`); under `jit` surplus tokens reuse the last image.
    """
    embeds = self.language_model.embed(input_ids)
    if pixel_values is None:
      return embeds
    if not isinstance(input_ids, jax.core.Tracer):
      self.check_image_tokens(input_ids, pixel_values)
    mask = input_ids == self.config.image_token_id
    if pixel_values.ndim == 4:
      features = self.embed_images(pixel_values)
      num_images, per_image, width = features.shape
      features = features.reshape(num_images * per_image, width).astype(embeds.dtype)
      rank = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
      gathered = features[jnp.clip(rank, 0, num_images * per_image - 1)]
    elif pixel_values.ndim == 5:
      batch, slots = pixel_values.shape[:2]
      if batch != input_ids.shape[0]:
        raise ValueError(
          f"pixel_values [B, M, H, W, 3] has B={batch} but input_ids has {input_ids.shape[0]} rows"
        )
      features = self.embed_images(pixel_values.reshape(batch * slots, *pixel_values.shape[2:]))
      per_image, width = features.shape[1:]
      features = features.reshape(batch, slots * per_image, width).astype(embeds.dtype)
      rank = jnp.cumsum(mask, axis=1) - 1
      index = jnp.clip(rank, 0, slots * per_image - 1)
      gathered = jnp.take_along_axis(features, index[:, :, None], axis=1)
    else:
      raise ValueError(
        f"pixel_values must be [N, H, W, 3] or [B, M, H, W, 3]; got shape "
        f"{tuple(pixel_values.shape)}"
      )
    return jnp.where(mask[:, :, None], gathered, embeds)

  def num_image_keys(self, pixel_values: jax.Array) -> int:
    """The fixed number N of image-key columns for `pixel_values` (upper bound per row)."""
    per_image = self.image_tokens(pixel_values.shape[-3], pixel_values.shape[-2])
    images = pixel_values.shape[0] if pixel_values.ndim == 4 else pixel_values.shape[1]
    return images * per_image

  def image_tokens(self, height: int, width: int) -> int:
    """Embeddings one `height x width` image turns into."""
    patch, ratio = self.config.vision.patch_size, self.config.downsample_ratio
    return int(height // patch * ratio) * int(width // patch * ratio)

  def image_key_positions(
    self, tokens_or_mask: jax.Array, num_slots: int
  ) -> tuple[jax.Array, jax.Array]:
    """`(positions int32 [B, N], valid bool [B, N])` with N = num_slots * tokens_per_image.

    `tokens_or_mask` is `input_ids` or a bool image mask `[B, L]`; see `image_key_positions`.
    """
    return image_key_positions(
      tokens_or_mask, num_slots * self.config.tokens_per_image, self.config.image_token_id
    )

  def map_key_positions(
    self, input_ids: jax.Array, pixel_values: jax.Array | None, cache: KVCache | None = None
  ) -> jax.Array:
    """int32 `[B, N]`: the key columns of text-to-image maps (the row's image positions in
    order, N = `num_image_keys(pixel_values)`), as cache slots when a `cache` is given."""
    num_keys = 0 if pixel_values is None else self.num_image_keys(pixel_values)
    key_positions, _ = image_key_positions(input_ids, num_keys, self.config.image_token_id)
    if cache is not None:
      key_positions = key_positions + cache.length
    return key_positions

  def init_cache(self, batch_size: int, cache_length: int, dtype=None) -> KVCache:
    return self.language_model.init_cache(batch_size, cache_length, dtype)

  def __call__(
    self,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    maps: MapRequest = NO_MAPS,
    logits_indices: jax.Array | None = None,
  ) -> DecoderOutput:
    """Runs the whole model on a batch.

    Args:
      input_ids: int `[B, L]` with image-context ids where image embeddings go.
      pixel_values: see `embed_inputs`.
      attention_mask, positions, cache, logits_indices: passed to the decoder.
      maps: which decoder layers return maps / hidden states. Text-to-image maps have
        N = `num_image_keys(pixel_values)` columns, the row's image positions in order (columns
        past the row's own image count point at position 0; `image_key_positions` gives `valid`).

    Returns:
      The decoder's `DecoderOutput` (`.logits` fp32 `[B, L, V]`).
    """
    embeds = self.embed_inputs(input_ids, pixel_values)
    key_positions = None
    if maps.text_to_image_layers:
      key_positions = self.map_key_positions(input_ids, pixel_values, cache)
    return self.language_model(
      inputs_embeds=embeds,
      positions=positions,
      attention_mask=attention_mask,
      cache=cache,
      maps=maps,
      image_key_positions=key_positions,
      logits_indices=logits_indices,
    )


def embed_inputs_jit(model: InternVL, input_ids: jax.Array, pixel_values: jax.Array | None):
  """`model.embed_inputs` as one compiled program (split / merge around a plain `jax.jit`)."""
  model.check_image_tokens(input_ids, pixel_values)
  graphdef, state = nnx.split(model)
  return _embed_inputs_jit(graphdef, state, input_ids, pixel_values)


@functools.partial(jax.jit, static_argnums=0)
def _embed_inputs_jit(graphdef, state, input_ids, pixel_values):
  return nnx.merge(graphdef, state).embed_inputs(input_ids, pixel_values)


def generate(
  model: InternVL,
  input_ids: jax.Array,
  pixel_values: jax.Array | None = None,
  *,
  max_new_tokens: int,
  cache_length: int | None = None,
  attention_mask: jax.Array | None = None,
  stop_token_ids: tuple[int, ...] = (),
  pad_token_id: int = 0,
  method: SamplingMethod = GREEDY,
  rng: jax.Array | None = None,
) -> SamplingState:
  """Generates a reply: the prompt (text + images) is embedded once, then the decoder's jitted
  sampler prefills from those embeddings and decodes over a fixed-length cache.

  Args:
    model: the InternVL.
    input_ids: int `[B, L]` prompts with image-context ids.
    pixel_values: images, either layout (see `InternVL.embed_inputs`).
    max_new_tokens: tokens to sample at most.
    cache_length: KV-cache slots; defaults to `L + 1 + max_new_tokens`.
    attention_mask, stop_token_ids, pad_token_id, method, rng: as in `sampling.Sampler`.

  Returns:
    The sampler's `SamplingState` (`tokens [B, max_new_tokens]`, `num_tokens [B]`, cache).
  """
  embeds = embed_inputs_jit(model, jnp.asarray(input_ids), pixel_values)
  length = embeds.shape[1]
  sampler = Sampler(
    model.language_model,
    cache_length=cache_length or length + 1 + max_new_tokens,
    max_new_tokens=max_new_tokens,
    stop_token_ids=stop_token_ids,
    pad_token_id=pad_token_id,
    method=method,
  )
  return sampler.generate(inputs_embeds=embeds, attention_mask=attention_mask, rng=rng)
