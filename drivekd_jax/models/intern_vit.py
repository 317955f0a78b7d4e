"""InternViT, the vision tower of InternVL3, in Flax NNX.

One encoder covers both released variants:

* InternViT-300M-448px-V2_5 (InternVL3 1B-14B): LayerNorm (eps 1e-6), bias on the fused qkv
  projection, no q/k normalisation.
* InternViT-6B-448px-V2_5 (InternVL3 38B/78B): RMSNorm, RMS q/k normalisation over the whole
  width (before the split into heads), no qkv bias.

Both use layer scale (`ls1`, `ls2`), exact GELU and no final norm. Images are NHWC. A CLS token
is prepended and the learned position embeddings are resized bicubically (PyTorch's
`F.interpolate(mode="bicubic", align_corners=False)`, A = -0.75, edge clamping) whenever the
patch grid of the input differs from the grid the embeddings were trained for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drivekd_jax.models.config import VisionConfig, as_dtype
from drivekd_jax.models.layers import (
  Linear,
  RMSNorm,
  attention,
  constrain,
  dense,
  param,
  run_blocks,
)


def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """Matrix `[out_size, in_size]` of PyTorch's 1-D bicubic resampling (align_corners=False).

  PyTorch uses the cubic convolution kernel with A = -0.75, maps output pixel `o` to the source
  coordinate `(o + 0.5) * in/out - 0.5` and clamps the four taps to the border. Applying the
  matrix along each spatial axis reproduces `F.interpolate(..., mode="bicubic")` exactly.
  """
  a = -0.75

  def near(x):  # |x| <= 1
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

  matrix = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for o in range(out_size):
    source = scale * (o + 0.5) - 0.5
    base = int(np.floor(source))
    t = source - base
    weights = (far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t))
    for tap, weight in zip(range(base - 1, base + 3), weights):
      matrix[o, min(max(tap, 0), in_size - 1)] += weight
  return matrix


def resize_position_grid(grid: jax.Array, out_h: int, out_w: int) -> jax.Array:
  """Resizes patch position embeddings `[h, w, D]` to `[out_h, out_w, D]` (torch bicubic)."""
  in_h, in_w, _ = grid.shape
  if (in_h, in_w) == (out_h, out_w):
    return grid
  rows = jnp.asarray(torch_bicubic_matrix(in_h, out_h), jnp.float32)
  cols = jnp.asarray(torch_bicubic_matrix(in_w, out_w), jnp.float32)
  out = jnp.einsum(
    "oh,hwd,pw->opd", rows, grid.astype(jnp.float32), cols, precision=jax.lax.Precision.HIGHEST
  )
  return out.astype(grid.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias; statistics and affine in fp32, output in `dtype`."""

  def __init__(self, features: int, *, eps: float, dtype=jnp.float32, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((features,), param_dtype), ("norm",))
    self.bias = param(jnp.zeros((features,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    out = normed * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return out.astype(self.dtype)


def _norm(norm_type: str, width: int, eps: float, *, dtype, param_dtype) -> nnx.Module:
  if norm_type == "layer_norm":
    return LayerNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)
  if norm_type == "rms_norm":
    return RMSNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f"unknown vision norm_type {norm_type!r}; expected layer_norm or rms_norm")


class VisionEmbeddings(nnx.Module):
  """Patch projection, CLS token and (resizable) learned position embeddings."""

  def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    width, patch, channels = config.hidden_size, config.patch_size, config.num_channels
    kernel = 0.02 * jax.random.normal(rngs.params(), (patch, patch, channels, width), param_dtype)
    # The stride-p convolution, stored as the torch kernel transposed to (kh, kw, C, D).
    self.patch_kernel = param(kernel, (None, None, "channels", "vit_embed"))
    self.patch_bias = param(jnp.zeros((width,), param_dtype), ("vit_embed",))
    self.class_embedding = param(
      0.02 * jax.random.normal(rngs.params(), (width,), param_dtype), ("vit_embed",)
    )
    num_positions = config.grid_size * config.grid_size + 1
    self.position_embedding = param(
      0.02 * jax.random.normal(rngs.params(), (num_positions, width), param_dtype),
      ("vit_pos", "vit_embed"),
    )

  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    """`[N, H, W, C]` images -> `[N, 1 + h*w, D]` tokens (CLS first, then patches row-major)."""
    n, height, width_px, channels = pixel_values.shape
    patch = self.config.patch_size
    grid_h, grid_w = height // patch, width_px // patch
    patches = pixel_values.astype(self.dtype).reshape(n, grid_h, patch, grid_w, patch, channels)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(n, grid_h * grid_w, -1)
    kernel = self.patch_kernel[...].astype(self.dtype).reshape(patch * patch * channels, -1)
    tokens = dense(patches, kernel) + self.patch_bias[...].astype(self.dtype)
    width = tokens.shape[-1]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (n, 1, width))
    tokens = jnp.concatenate([cls, tokens], axis=1)
    stored = self.config.grid_size
    positions = self.position_embedding[...]
    patch_positions = resize_position_grid(
      positions[1:].reshape(stored, stored, width), grid_h, grid_w
    ).reshape(grid_h * grid_w, width)
    positions = jnp.concatenate([positions[:1], patch_positions], axis=0)
    return tokens + positions.astype(self.dtype)[None]


class VisionAttention(nnx.Module):
  """Bidirectional multi-head attention with a fused qkv projection (columns [q | k | v])."""

  def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    width = config.hidden_size
    if width % config.num_heads:
      raise ValueError(
        f"vision hidden_size {width} is not divisible by num_heads {config.num_heads}"
      )
    self.num_heads = config.num_heads
    self.head_dim = width // config.num_heads
    self.qkv = Linear(
      width,
      3 * width,
      axes=("vit_embed", "vit_qkv"),
      use_bias=config.qkv_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.proj = Linear(
      width,
      width,
      axes=("vit_qkv", "vit_embed"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    if config.qk_normalization:
      # q/k normalisation is RMS over the full width (before the head split), as in InternViT-6B.
      eps = config.layer_norm_eps
      self.q_norm = RMSNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)
      self.k_norm = RMSNorm(width, eps=eps, dtype=dtype, param_dtype=param_dtype)
    else:
      self.q_norm = None
      self.k_norm = None

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[N, T, D]` -> `[N, T, D]`."""
    n, t, width = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    if self.q_norm is not None:
      q = self.q_norm(q)
      k = self.k_norm(k)
    shape = (n, t, self.num_heads, self.head_dim)
    everything = jnp.ones((n, 1, 1), jnp.bool_)  # bidirectional: every key is visible
    head_major = lambda x: x.reshape(shape).transpose(0, 2, 1, 3)  # keys/values [N, H, T, Dh]
    out, _ = attention(q.reshape(shape), head_major(k), head_major(v), everything)
    return self.proj(out.reshape(n, t, width))


class VisionMLP(nnx.Module):
  def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = Linear(
      config.hidden_size,
      config.intermediate_size,
      axes=("vit_embed", "vit_mlp"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    self.fc2 = Linear(
      config.intermediate_size,
      config.hidden_size,
      axes=("vit_mlp", "vit_embed"),
      use_bias=True,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionBlock(nnx.Module):
  """`x += ls1 * attn(norm1(x)); x += ls2 * mlp(norm2(x))`."""

  def __init__(self, config: VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    width, eps = config.hidden_size, config.layer_norm_eps
    self.dtype = dtype
    self.norm1 = _norm(config.norm_type, width, eps, dtype=dtype, param_dtype=param_dtype)
    self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ls1 = param(jnp.full((width,), config.layer_scale_init, param_dtype), ("vit_embed",))
    self.norm2 = _norm(config.norm_type, width, eps, dtype=dtype, param_dtype=param_dtype)
    self.mlp = VisionMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ls2 = param(jnp.full((width,), config.layer_scale_init, param_dtype), ("vit_embed",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = constrain(x, (None, "vit_tokens", "activation_embed"))
    x = x + self.ls1[...].astype(self.dtype) * self.attn(self.norm1(x))
    return x + self.ls2[...].astype(self.dtype) * self.mlp(self.norm2(x))


class InternViT(nnx.Module):
  """InternViT encoder.

  Parameters (names used by the checkpoint loader): `embeddings.{patch_kernel [p, p, C, D],
  patch_bias [D], class_embedding [D], position_embedding [1 + g*g, D]}`,
  `layers[i].{norm1, attn.{qkv, proj, q_norm?, k_norm?}, ls1 [D], norm2, mlp.{fc1, fc2}, ls2 [D]}`.
  """

  def __init__(
    self, config: VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
  ):
    dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
    self.config = config
    self.embeddings = VisionEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.layers = nnx.List(
      [
        VisionBlock(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.num_layers)
      ]
    )

  def __call__(
    self,
    pixel_values: jax.Array,
    *,
    select_layer: int = -1,
    scan: bool = False,
    remat: str = "none",
  ) -> jax.Array:
    """Encodes images.

    Args:
      pixel_values: `[N, H, W, C]` normalised images; H and W multiples of the patch size.
      select_layer: which hidden state to return, indexed like the reference's
        `hidden_states` tuple (0: embeddings, -1: last block). Only the needed blocks run.
      scan, remat: the blocks as one `lax.scan`, each block rematerialised under a
        `layers.REMAT_POLICIES` name (`layers.run_blocks`).

    Returns:
      `[N, 1 + (H/p)*(W/p), D]` hidden states, CLS first.
    """
    total = self.config.num_layers
    depth = select_layer + total + 1 if select_layer < 0 else select_layer
    if not 0 <= depth <= total:
      raise ValueError(f"select_layer {select_layer} is out of range for {total} vision layers")
    patch = self.config.patch_size
    if pixel_values.ndim != 4 or pixel_values.shape[-1] != self.config.num_channels:
      raise ValueError(
        f"pixel_values must be [N, H, W, {self.config.num_channels}] (NHWC); got "
        f"shape {tuple(pixel_values.shape)}"
      )
    if pixel_values.shape[1] % patch or pixel_values.shape[2] % patch:
      raise ValueError(
        f"image size {tuple(pixel_values.shape[1:3])} is not a multiple of the patch size {patch}"
      )
    hidden = self.embeddings(pixel_values)
    if depth and (scan or remat != "none"):
      hidden, _ = run_blocks(
        self.layers[:depth], hidden, lambda block, x: (block(x), None), scan=scan, remat=remat
      )
      return hidden
    for block in self.layers[:depth]:
      hidden = block(hidden)
    return hidden
