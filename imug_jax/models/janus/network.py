"""Janus-Pro in Flax NNX: SigLIP understanding encoder + aligner, VQ image tokenizer, generation
embeddings / aligner / head, around the project's LLaMA `Decoder`.

Images are NHWC. Understanding images are normalised by the processor (`[-1, 1]` for Janus-Pro);
the VQ tokenizer reads and writes pixels in `[-1, 1]`. Module and attribute names mirror
transformers' `JanusForConditionalGeneration` so that the checkpoint loader maps parameter paths
to tensor names mechanically (`checkpoint.py`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from drivekd_jax.models.config import MapRequest, as_dtype
from drivekd_jax.models.intern_vit import LayerNorm, VisionAttention, VisionMLP
from drivekd_jax.models.layers import Embed, Linear, dense, param
from drivekd_jax.models.qwen2 import Decoder, DecoderOutput, KVCache
from imug_jax.models.janus.config import JanusConfig, JanusVQConfig

_HIGHEST = jax.lax.Precision.HIGHEST


def activation(name: str):
  """The transformers activation `name` (`ACT2FN`) as a JAX function."""
  if name == "gelu":
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name == "gelu_pytorch_tanh":
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "silu":
    return jax.nn.silu
  raise ValueError(f"unsupported activation {name!r}")


# ------------------------------------------------------------------------------------ SigLIP


class PatchEmbedding(nnx.Module):
  """The stride-p patch convolution, kernel stored as `[p, p, C, D]`."""

  def __init__(self, patch: int, channels: int, width: int, *, dtype, param_dtype, rngs):
    self.patch = patch
    self.dtype = dtype
    kernel = 0.02 * jax.random.normal(rngs.params(), (patch, patch, channels, width), param_dtype)
    self.kernel = param(kernel, (None, None, "channels", "vit_embed"))
    self.bias = param(jnp.zeros((width,), param_dtype), ("vit_embed",))

  def __call__(self, images: jax.Array) -> jax.Array:
    """`[N, H, W, C]` -> `[N, (H/p)*(W/p), D]` (row-major patches)."""
    n, height, width, channels = images.shape
    p = self.patch
    patches = images.astype(self.dtype).reshape(n, height // p, p, width // p, p, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, (height // p) * (width // p), -1)
    kernel = self.kernel[...].astype(self.dtype).reshape(p * p * channels, -1)
    return dense(patches, kernel) + self.bias[...].astype(self.dtype)


class SigLIPEmbeddings(nnx.Module):
  def __init__(self, config, *, dtype, param_dtype, rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    grid = config.image_size // config.patch_size
    self.patch_embedding = PatchEmbedding(
      config.patch_size, config.num_channels, config.hidden_size, **common
    )
    self.position_embedding = Embed(grid * grid, config.hidden_size, **common)

  def __call__(self, images: jax.Array) -> jax.Array:
    tokens = self.patch_embedding(images)
    return tokens + self.position_embedding.embedding[...].astype(tokens.dtype)[None]


class SigLIPLayer(nnx.Module):
  """Pre-norm ViT block without layer scale."""

  def __init__(self, config, *, dtype, param_dtype, rngs):
    norm = dict(eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.layer_norm1 = LayerNorm(config.hidden_size, **norm)
    self.self_attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layer_norm2 = LayerNorm(config.hidden_size, **norm)
    self.mlp = VisionMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class SigLIPEncoder(nnx.Module):
  """The understanding encoder: patches + learned positions, ViT blocks, a final LayerNorm."""

  def __init__(self, config, *, dtype, param_dtype, rngs):
    self.config = config
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = SigLIPEmbeddings(config, **common)
    self.layers = nnx.List([SigLIPLayer(config, **common) for _ in range(config.num_layers)])
    self.post_layernorm = LayerNorm(
      config.hidden_size, eps=config.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
    )

  def __call__(self, images: jax.Array) -> jax.Array:
    """`[N, S, S, C]` normalised images (S = `image_size`) -> `[N, (S/p)^2, D_vision]`."""
    size = self.config.image_size
    if images.ndim != 4 or images.shape[1:] != (size, size, self.config.num_channels):
      raise ValueError(
        f"pixel_values must be [N, {size}, {size}, {self.config.num_channels}] (NHWC); got "
        f"{tuple(images.shape)}"
      )
    x = self.embeddings(images)
    for layer in self.layers:
      x = layer(x)
    return self.post_layernorm(x)


class AlignerMLP(nnx.Module):
  """`fc1`, then `(activation, linear)` for each hidden layer (the Janus aligners)."""

  def __init__(self, in_features, width, depth, act, *, dtype, param_dtype, rngs):
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.fc1 = Linear(in_features, width, axes=("proj_in", "embed"), **common)
    self.hidden_layers = nnx.List(
      [Linear(width, width, axes=("embed", "embed"), **common) for _ in range(depth - 1)]
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.fc1(x)
    for layer in self.hidden_layers:
      x = layer(activation(self.act)(x))
    return x


class GenerationHead(nnx.Module):
  """Decoder hidden state -> image-token logits: `vision_head(act(proj_out(h)))`."""

  def __init__(self, config: JanusVQConfig, *, dtype, param_dtype, rngs):
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = config.hidden_act
    self.proj_out = Linear(
      config.image_token_embed_dim, config.projection_dim, axes=("embed", "mlp"), **common
    )
    self.vision_head = Linear(
      config.projection_dim, config.num_embeddings, axes=("mlp", "vocab"), **common
    )

  def __call__(self, hidden: jax.Array) -> jax.Array:
    """`[..., D]` -> fp32 `[..., num_embeddings]`."""
    return self.vision_head(activation(self.act)(self.proj_out(hidden))).astype(jnp.float32)


# ---------------------------------------------------------------------------- VQ tokenizer


class Conv2d(nnx.Module):
  """`torch.nn.Conv2d` on NHWC with kernel `[kh, kw, I, O]` (symmetric padding, or none)."""

  def __init__(self, cin, cout, size, *, stride=1, padding=0, dtype, param_dtype, rngs):
    self.stride, self.padding, self.dtype = stride, padding, dtype
    scale = (cin * size * size) ** -0.5
    kernel = scale * jax.random.normal(rngs.params(), (size, size, cin, cout), param_dtype)
    self.kernel = param(kernel, (None, None, None, None))
    self.bias = param(jnp.zeros((cout,), param_dtype), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    pad = self.padding
    y = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      self.kernel[...].astype(self.dtype),
      window_strides=(self.stride, self.stride),
      padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=_HIGHEST,
    )
    return y + self.bias[...].astype(self.dtype)


class GroupNorm(nnx.Module):
  """`torch.nn.GroupNorm(32, C, eps=1e-6)` on NHWC; statistics in fp32."""

  def __init__(self, channels: int, *, dtype, param_dtype, groups: int = 32, eps: float = 1e-6):
    self.groups, self.eps, self.dtype = groups, eps, dtype
    self.scale = param(jnp.ones((channels,), param_dtype), (None,))
    self.bias = param(jnp.zeros((channels,), param_dtype), (None,))

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(n, h, w, self.groups, c // self.groups)
    mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
    normed = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(n, h, w, c)
    out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


class ResnetBlock(nnx.Module):
  def __init__(self, cin: int, cout: int, *, dtype, param_dtype, rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = GroupNorm(cin, **common)
    self.conv1 = Conv2d(cin, cout, 3, padding=1, rngs=rngs, **common)
    self.norm2 = GroupNorm(cout, **common)
    self.conv2 = Conv2d(cout, cout, 3, padding=1, rngs=rngs, **common)
    self.nin_shortcut = Conv2d(cin, cout, 1, rngs=rngs, **common) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    residual = x if self.nin_shortcut is None else self.nin_shortcut(x)
    return residual + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over the pixels of a feature map (1x1 conv projections)."""

  def __init__(self, channels: int, *, dtype, param_dtype, rngs):
    common = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm = GroupNorm(channels, **common)
    self.q = Conv2d(channels, channels, 1, rngs=rngs, **common)
    self.k = Conv2d(channels, channels, 1, rngs=rngs, **common)
    self.v = Conv2d(channels, channels, 1, rngs=rngs, **common)
    self.proj_out = Conv2d(channels, channels, 1, rngs=rngs, **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    normed = self.norm(x)
    q, k, v = (f(normed).reshape(n, h * w, c) for f in (self.q, self.k, self.v))
    scores = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) * c**-0.5
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("nqk,nkc->nqc", probs, v).reshape(n, h, w, c)
    return x + self.proj_out(out)


class MidBlock(nnx.Module):
  def __init__(self, channels: int, **common):
    self.block_1 = ResnetBlock(channels, channels, **common)
    self.attn_1 = AttnBlock(channels, **common)
    self.block_2 = ResnetBlock(channels, channels, **common)

  def __call__(self, x):
    return self.block_2(self.attn_1(self.block_1(x)))


class Downsample(nnx.Module):
  def __init__(self, channels: int, *, dtype, param_dtype, rngs):
    self.conv = Conv2d(
      channels, channels, 3, stride=2, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x):
    # torch pads right/bottom by one, then a valid stride-2 convolution.
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  def __init__(self, channels: int, *, dtype, param_dtype, rngs):
    self.conv = Conv2d(
      channels, channels, 3, padding=1, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution of the conv tower: res blocks (+ attention), then a resampling conv."""

  def __init__(self, blocks, attns, resample):
    self.block = nnx.List(blocks)
    self.attn = nnx.List(attns)
    self.resample = resample

  def __call__(self, x):
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    return x if self.resample is None else self.resample(x)


class VQEncoder(nnx.Module):
  def __init__(self, config: JanusVQConfig, **common):
    mults, base = config.channel_multiplier, config.base_channels
    self.conv_in = Conv2d(config.in_channels, base, 3, padding=1, **common)
    levels, width = [], base
    for i, mult in enumerate(mults):
      blocks, attns = [], []
      for _ in range(config.num_res_blocks):
        blocks.append(ResnetBlock(width, base * mult, **common))
        width = base * mult
        if i == len(mults) - 1:
          attns.append(AttnBlock(width, **common))
      resample = Downsample(width, **common) if i != len(mults) - 1 else None
      levels.append(Level(blocks, attns, resample))
    self.down = nnx.List(levels)
    self.mid = MidBlock(width, **common)
    self.norm_out = GroupNorm(width, dtype=common["dtype"], param_dtype=common["param_dtype"])
    self.conv_out = Conv2d(width, config.latent_channels, 3, padding=1, **common)

  def __call__(self, x):
    x = self.conv_in(x)
    for level in self.down:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.norm_out(self.mid(x))))


class VQDecoder(nnx.Module):
  def __init__(self, config: JanusVQConfig, **common):
    mults, base = config.channel_multiplier, config.base_channels
    width = base * mults[-1]
    self.conv_in = Conv2d(config.latent_channels, width, 3, padding=1, **common)
    self.mid = MidBlock(width, **common)
    levels = []
    for i in reversed(range(len(mults))):
      blocks, attns = [], []
      for _ in range(config.num_res_blocks + 1):
        blocks.append(ResnetBlock(width, base * mults[i], **common))
        width = base * mults[i]
        if i == len(mults) - 1:
          attns.append(AttnBlock(width, **common))
      levels.append(Level(blocks, attns, Upsample(width, **common) if i != 0 else None))
    self.up = nnx.List(levels)
    self.norm_out = GroupNorm(width, dtype=common["dtype"], param_dtype=common["param_dtype"])
    self.conv_out = Conv2d(width, config.out_channels, 3, padding=1, **common)

  def __call__(self, x):
    x = self.mid(self.conv_in(x))
    for level in self.up:
      x = level(x)
    return self.conv_out(jax.nn.silu(self.norm_out(x)))


class VectorQuantizer(nnx.Module):
  def __init__(self, config: JanusVQConfig, *, dtype, param_dtype, rngs):
    self.embedding = Embed(
      config.num_embeddings, config.embed_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )

  def codes(self, latents: jax.Array) -> jax.Array:
    """`[N, h, w, E]` -> int32 `[N, h*w]`: the nearest codebook entry (squared L2) per vector."""
    flat = latents.astype(jnp.float32).reshape(latents.shape[0], -1, latents.shape[-1])
    book = self.embedding.embedding[...].astype(jnp.float32)
    distances = (
      jnp.sum(flat**2, axis=-1, keepdims=True)
      + jnp.sum(book**2, axis=-1)
      - 2 * jnp.einsum("nte,ke->ntk", flat, book, precision=_HIGHEST)
    )
    return jnp.argmin(distances, axis=-1).astype(jnp.int32)

  def lookup(self, codes: jax.Array, grid: int) -> jax.Array:
    """int `[N, grid*grid]` -> L2-normalised codebook vectors `[N, grid, grid, E]`."""
    vectors = self.embedding(codes).astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(vectors**2, axis=-1, keepdims=True))
    vectors = vectors / jnp.maximum(norm, 1e-12)
    return vectors.reshape(codes.shape[0], grid, grid, -1).astype(self.embedding.dtype)


class VQModel(nnx.Module):
  """The image tokenizer: pixels `[-1, 1]` <-> `num_patches ** 2` codes."""

  def __init__(self, config: JanusVQConfig, *, dtype, param_dtype, rngs):
    self.config = config
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.encoder = VQEncoder(config, **common)
    self.quant_conv = Conv2d(config.latent_channels, config.embed_dim, 1, **common)
    self.quantize = VectorQuantizer(config, **common)
    self.post_quant_conv = Conv2d(config.embed_dim, config.latent_channels, 1, **common)
    self.decoder = VQDecoder(config, **common)

  def encode(self, pixels: jax.Array) -> jax.Array:
    """`[N, S, S, C]` in `[-1, 1]` (S = `config.image_size`) -> int32 codes `[N, P*P]`."""
    return self.quantize.codes(self.quant_conv(self.encoder(pixels)))

  def decode(self, codes: jax.Array) -> jax.Array:
    """int `[N, P*P]` -> pixels `[N, S, S, C]` (nominally in `[-1, 1]`)."""
    if codes.shape[-1] != self.config.num_tokens:
      raise ValueError(f"expected {self.config.num_tokens} codes per image, got {codes.shape}")
    latents = self.quantize.lookup(codes, self.config.num_patches)
    return self.decoder(self.post_quant_conv(latents))


# ------------------------------------------------------------------------------------ Janus


class Janus(nnx.Module):
  """Janus / Janus-Pro (`JanusForConditionalGeneration`).

  `model(input_ids, pixel_values)` is the understanding forward pass: the ids' embeddings with
  every `image_token_id` position replaced, in order, by the aligned SigLIP features of the
  images; returns the `DecoderOutput` (`.logits` over the text vocabulary).
  """

  def __init__(self, config: JanusConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = as_dtype(config.dtype), as_dtype(config.param_dtype)
    self.dtype = dtype
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    vision, vq, text = config.vision, config.vq, config.text
    if vision.hidden_act != "gelu":
      raise ValueError(f"vision hidden_act {vision.hidden_act!r}: the SigLIP MLP uses exact gelu")
    self.vision_model = SigLIPEncoder(vision.encoder, **common)
    self.aligner = AlignerMLP(
      vision.encoder.hidden_size, vision.projection_dim, vision.depth, vision.hidden_act, **common
    )
    self.vqmodel = VQModel(vq, **common)
    self.generation_embeddings = Embed(vq.num_embeddings, vq.embed_dim, **common)
    self.generation_aligner = AlignerMLP(
      vq.embed_dim, vq.projection_dim, vq.num_hidden_layers, vq.hidden_act, **common
    )
    self.generation_head = GenerationHead(vq, **common)
    self.language_model = Decoder(text, **common)

  def image_features(self, pixel_values: jax.Array) -> jax.Array:
    """Normalised images `[N, S, S, 3]` -> aligned features `[N, num_image_tokens, D]`."""
    return self.aligner(self.vision_model(pixel_values))

  def embed_inputs(self, input_ids: jax.Array, pixel_values: jax.Array | None = None):
    """Token embeddings `[B, L, D]`, image placeholders filled in order (as `masked_scatter`:
    the k-th placeholder of the flattened batch takes the k-th feature vector)."""
    embeds = self.language_model.embed(input_ids)
    if pixel_values is None:
      return embeds
    features = self.image_features(pixel_values).reshape(-1, embeds.shape[-1])
    return scatter_features(embeds, input_ids == self.config.image_token_id, features)

  def __call__(
    self,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    *,
    attention_mask: jax.Array | None = None,
    cache: KVCache | None = None,
  ) -> DecoderOutput:
    """Understanding pass: int32 `[B, L]` ids, float32 `[N, S, S, 3]` images -> `DecoderOutput`."""
    embeds = self.embed_inputs(input_ids, pixel_values)
    return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, cache=cache)

  def image_token_embeds(self, codes: jax.Array) -> jax.Array:
    """Image-token codes `[...]` -> decoder inputs `[..., D]` (generation embedding + aligner)."""
    return self.generation_aligner(self.generation_embeddings(codes)).astype(self.dtype)


def scatter_features(embeds: jax.Array, mask: jax.Array, features: jax.Array) -> jax.Array:
  """`embeds [B, L, D]` with `mask [B, L]` positions replaced by `features [F, D]` in order."""
  flat_mask = mask.reshape(-1)
  index = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)
  filled = jnp.where(
    flat_mask[:, None], features[index].astype(embeds.dtype), embeds.reshape(flat_mask.shape[0], -1)
  )
  return filled.reshape(embeds.shape)


@flax.struct.dataclass
class _HeadOutput:
  logits: jax.Array
  cache: KVCache | None


class ImageGeneration(nnx.Module):
  """Janus as an image-token language model, for `SamplerLoop`: tokens are VQ codes embedded by
  the generation embedding + aligner, logits come from the generation head on the final-normed
  hidden state (the text head is never computed)."""

  def __init__(self, janus: Janus):
    self.janus = janus
    self.dtype = janus.dtype

  def embed(self, codes: jax.Array) -> jax.Array:
    return self.janus.image_token_embeds(codes)

  def __call__(self, *, inputs_embeds, attention_mask=None, cache=None, logits_indices=None):
    decoder = self.janus.language_model
    last = decoder.config.num_layers - 1
    batch = inputs_embeds.shape[0]
    out = decoder(
      inputs_embeds=inputs_embeds,
      attention_mask=attention_mask,
      cache=cache,
      maps=MapRequest(hidden_layers=(last,)),
      logits_indices=jnp.zeros((batch, 0), jnp.int32),  # no text logits
    )
    hidden = out.hidden_states[last]
    if logits_indices is not None:
      hidden = jnp.take_along_axis(hidden, logits_indices[:, :, None].astype(jnp.int32), axis=1)
    return _HeadOutput(logits=self.janus.generation_head(decoder.norm(hidden)), cache=out.cache)
