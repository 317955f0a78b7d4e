"""Qwen2.5-VL in Flax NNX: a windowed ViT with 2-D rotary positions -> 2x2 merger -> the decoder.

Vision encoder (`Qwen2_5_VisionTransformerPretrainedModel`): each image is cut into patches of
`temporal_patch_size x patch_size x patch_size` pixels (a still image repeats its frame), laid out
block-major over 2x2 merge blocks (`patchify`). A bias-free linear map (the Conv3d) embeds them;
blocks are pre-RMSNorm with bidirectional attention (fused qkv with bias, axial 2-D RoPE over the
patch's row and column) and a SwiGLU MLP with biases. Blocks listed in `fullatt_block_indexes`
attend across the whole frame, the others within windows of `window_size` pixels
(`window_size / patch_size / merge` merged tokens a side). The merger RMS-normalises every patch,
concatenates the 4 patches of a merge block and maps them through Linear-GELU-Linear into the
decoder's width.

The reference permutes patches into window order and back; attention is order-free given the
masks, so here patches stay in the processor's order and windows are masks (`same window` /
`same frame`), and images of equal grid are encoded as one batch.

The language model is the shared `Decoder` with multimodal RoPE: text tokens count up as usual,
the tokens of an image get (temporal, height, width) positions `start + (t, i, j)` and the text
after it continues at `start + max(h, w) / merge` (`rope_positions`, the reference's
`get_rope_index`). Image embeddings go to the positions holding `image_token_id`, in order.

`pixel_values` comes in one of three layouts:

* `[N, C*T*P*P]` flattened patches of all images with `image_grid_thw` `[I, 3]` (the HF
  processor's output, `qwen25_vl_processor.preprocess`); the grid must be concrete (numpy or a
  tuple; under `jit` a static argument).
* `[N, H, W, C]` normalised images of one size, in order of appearance in the batch.
* `[B, M, H, W, C]` M image slots per row, as `InternVL` (trailing slots of a row may be padding).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drivekd_jax.models.config import DecoderConfig, DTypeName, MapRequest, as_dtype
from drivekd_jax.models.internvl import image_key_positions
from drivekd_jax.models.layers import Linear, RMSNorm, apply_rope, attention, dense, param
from drivekd_jax.models.qwen2 import Decoder, DecoderOutput, KVCache
from drivekd_jax.models.sampling import GREEDY, Sampler, SamplingMethod, SamplingState

NO_MAPS = MapRequest()
Grid = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Qwen25VisionConfig:
  """The Qwen2.5-VL vision tower (`vision_config`; every released size shares it but
  `out_hidden_size`, the decoder width)."""

  patch_size: int = 14
  temporal_patch_size: int = 2
  in_channels: int = 3
  hidden_size: int = 1280
  depth: int = 32
  num_heads: int = 16
  intermediate_size: int = 3420
  spatial_merge_size: int = 2
  window_size: int = 112
  out_hidden_size: int = 2048
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6

  @property
  def patch_dim(self) -> int:
    """Width of one flattened patch, C*T*P*P."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  @property
  def window_tokens(self) -> int:
    """Merged tokens along one side of an attention window."""
    return self.window_size // self.spatial_merge_size // self.patch_size


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
  """Qwen2.5-VL: vision tower + decoder (with `mrope_section`).

  Attributes:
    vision: the vision tower.
    text: the language model; its `mrope_section` must be set.
    image_token_id: `<|image_pad|>`, whose positions receive image embeddings.
    dtype: compute dtype name; param_dtype: storage dtype name.
  """

  vision: Qwen25VisionConfig
  text: DecoderConfig
  image_token_id: int = 151655
  dtype: DTypeName = "float32"
  param_dtype: DTypeName = "float32"

  def __post_init__(self):
    if self.text.mrope_section is None:
      raise ValueError("Qwen25VLConfig.text needs an mrope_section (multimodal RoPE)")
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ValueError(
        f"vision out_hidden_size {self.vision.out_hidden_size} differs from the decoder width "
        f"{self.text.hidden_size}"
      )
    if self.vision.window_tokens < 1:
      raise ValueError(
        f"window_size {self.vision.window_size} is smaller than one merged token "
        f"({self.vision.patch_size * self.vision.spatial_merge_size} px)"
      )

  def image_tokens(self, height: int, width: int) -> int:
    """Decoder tokens of one `height x width` image (a multiple of patch * merge)."""
    factor = self.vision.patch_size * self.vision.spatial_merge_size
    return (height // factor) * (width // factor)


def check_same_image_tokens(student: Qwen25VLConfig, teacher: Qwen25VLConfig) -> None:
  """Raises ValueError unless the two models turn every image into the same tokens.

  Distillation compares attention maps position by position over one shared token sequence, so
  the teacher must see the student's image tokens. With the same processor settings (pixel
  bounds) and the same patch and merge sizes the grids, hence the token counts, are equal; there
  is no alignment of maps between different image-token layouts.
  """
  s, t = student.vision, teacher.vision
  if (s.patch_size, s.spatial_merge_size, s.temporal_patch_size) != (
    t.patch_size,
    t.spatial_merge_size,
    t.temporal_patch_size,
  ):
    raise ValueError(
      f"teacher and student cut images differently (patch/merge/temporal "
      f"{t.patch_size}/{t.spatial_merge_size}/{t.temporal_patch_size} vs "
      f"{s.patch_size}/{s.spatial_merge_size}/{s.temporal_patch_size}): their image token "
      f"counts differ and text->vision maps cannot be compared; use one processor setting"
    )
  if student.image_token_id != teacher.image_token_id:
    raise ValueError(
      f"teacher image_token_id {teacher.image_token_id} differs from the student's "
      f"{student.image_token_id}: they must share the tokenizer"
    )


# ---------------------------------------------------------------------------------------------
# Patches and grid bookkeeping (host side: the grids are static shapes)


def patchify(images, patch_size: int, merge_size: int, temporal_patch_size: int):
  """Still images -> flattened patches in the reference processor's order.

  Args:
    images: `[N, H, W, C]` normalised images (numpy or jax), H and W multiples of
      patch_size * merge_size.
    patch_size, merge_size, temporal_patch_size: as in the vision config.

  Returns:
    `[N, (H/p)*(W/p), C*T*p*p]`: patches block-major over merge blocks (merge-block row, column,
    then the row and column inside the block), each flattened as (channel, frame, row, column)
    with the frame repeated T times.
  """
  n, height, width, channels = images.shape
  factor = patch_size * merge_size
  if height % factor or width % factor:
    raise ValueError(f"image size {height}x{width} is not a multiple of patch x merge = {factor}")
  grid_h, grid_w = height // patch_size, width // patch_size
  x = images.reshape(
    n, grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size,
    channels,
  )  # fmt: skip
  x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # [n, bh, bw, mh, mw, C, p, p]
  x = x[:, :, :, :, :, :, None]
  shape = x.shape[:6] + (temporal_patch_size,) + x.shape[7:]
  xp = jnp if isinstance(x, jax.Array) else np
  x = xp.broadcast_to(x, shape)
  return x.reshape(n, grid_h * grid_w, channels * temporal_patch_size * patch_size**2)


def concrete_grids(image_grid_thw) -> tuple[Grid, ...]:
  """`image_grid_thw` (numpy / list / tuple `[I, 3]`) as a tuple of int triples."""
  if isinstance(image_grid_thw, jax.core.Tracer):
    raise ValueError(
      "image_grid_thw must be concrete (numpy or a tuple); under jit pass it as a static argument"
    )
  grids = np.asarray(image_grid_thw, np.int64)
  if grids.ndim != 2 or grids.shape[1] != 3:
    raise ValueError(f"image_grid_thw must be [I, 3] (t, h, w); got shape {grids.shape}")
  return tuple((int(t), int(h), int(w)) for t, h, w in grids)


def _patch_rows_cols(grid: Grid, merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Row and column of every patch of a `(t, h, w)` grid, in patch order (`[t*h*w]` each)."""
  t, h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  block = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).ravel()
  return np.tile(block(rows), t), np.tile(block(cols), t)


def vision_masks(grid: Grid, config: Qwen25VisionConfig) -> tuple[np.ndarray, np.ndarray]:
  """bool `[P, P]` masks of one image: (same frame, same window), P = t*h*w patches."""
  t, h, w = grid
  merge, side = config.spatial_merge_size, config.window_tokens
  if h % merge or w % merge:
    raise ValueError(f"image grid {grid} is not divisible by the merge size {merge}")
  per_frame = h * w
  patch = np.arange(t * per_frame)
  frame = patch // per_frame
  unit = (patch % per_frame) // (merge * merge)  # merged token within the frame, row-major
  llm_w = w // merge
  windows_w = -(-llm_w // side)
  windows_h = -(-(h // merge) // side)
  window = (frame * windows_h + (unit // llm_w) // side) * windows_w + (unit % llm_w) // side
  return frame[:, None] == frame[None, :], window[:, None] == window[None, :]


def vision_rope_tables(grid: Grid, config: Qwen25VisionConfig) -> tuple[jax.Array, jax.Array]:
  """Axial 2-D rotary tables of one image's patches, fp32 `[P, head_dim]` each.

  The first half of each head rotates by the patch row (head_dim/4 frequencies) then the column
  (the same frequencies), and the half is repeated (the `rotate_half` convention).
  """
  head_dim = config.hidden_size // config.num_heads
  spatial = head_dim // 2
  inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, spatial, 2, dtype=np.float32) / spatial))
  rows, cols = _patch_rows_cols(grid, config.spatial_merge_size)
  rows = jnp.asarray(rows, jnp.float32)[:, None] * inv_freq
  cols = jnp.asarray(cols, jnp.float32)[:, None] * inv_freq
  angles = jnp.concatenate([rows, cols, rows, cols], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def image_position_offsets(grid: Grid, merge: int) -> np.ndarray:
  """int `[t*(h/m)*(w/m), 3]`: the (temporal, height, width) M-RoPE offsets of an image's
  decoder tokens from the image's start position."""
  t, h, w = grid
  tt, hh, ww = np.meshgrid(
    np.arange(t), np.arange(h // merge), np.arange(w // merge), indexing="ij"
  )
  return np.stack([tt.ravel(), hh.ravel(), ww.ravel()], axis=-1)


def _token_tables(grids: Sequence[Grid], merge: int) -> tuple[np.ndarray, np.ndarray]:
  """Per image token, in order over `grids`: offsets `[N, 3]` and the position advance `[N]` (the
  image's `max(h, w) / merge` on its last token, 0 on the others)."""
  offsets, advance = [], []
  for grid in grids:
    offsets.append(image_position_offsets(grid, merge))
    step = np.zeros(len(offsets[-1]), np.int32)
    step[-1] = max(grid[1], grid[2]) // merge
    advance.append(step)
  if not offsets:
    return np.zeros((1, 3), np.int32), np.zeros((1,), np.int32)
  return np.concatenate(offsets).astype(np.int32), np.concatenate(advance)


def mrope_positions(
  image_mask: jax.Array,
  attention_mask: jax.Array,
  grids: Sequence[Grid],
  merge: int,
  *,
  per_row: bool = False,
  start: jax.Array | int = 0,
) -> jax.Array:
  """Multimodal RoPE positions, as the reference's `get_rope_index` (images only).

  Args:
    image_mask: bool `[B, L]`, the image-token positions.
    attention_mask: bool `[B, L]`, True for real tokens (padding gets its neighbour's position and
      advances nothing).
    grids: the images' `(t, h, w)` patch grids in order of appearance over the whole batch, or,
      with `per_row`, the grids of one row's slots (every row uses the same list).
    merge: spatial merge size.
    start: int or int32 `[B]`, the position of each row's first token (a cache's
      `next_position`).

  Returns:
    int32 `[B, 3, L]`. A text token gets the number of positions used before it on all three axes;
    an image's tokens get `start + (t, i, j)` and the image uses `max(h, w) / merge` positions.
  """
  offsets, advance = _token_tables(grids, merge)
  image = image_mask & attention_mask
  if per_row:
    rank = jnp.cumsum(image, axis=1) - 1
  else:
    rank = (jnp.cumsum(image.reshape(-1)) - 1).reshape(image.shape)
  rank = jnp.clip(rank, 0, len(advance) - 1)
  steps = jnp.where(image, jnp.asarray(advance)[rank], attention_mask.astype(jnp.int32))
  before = jnp.cumsum(steps, axis=1) - steps
  start = jnp.asarray(start, jnp.int32)
  if start.ndim == 1:
    start = start[:, None]
  offset = jnp.where(image[:, None], jnp.moveaxis(jnp.asarray(offsets)[rank], -1, 1), 0)
  return (start + before)[:, None] + offset


# ---------------------------------------------------------------------------------------------
# Vision tower


class VisionAttention(nnx.Module):
  """Bidirectional attention with a fused qkv projection (columns [q | k | v]) and 2-D RoPE."""

  def __init__(self, config: Qwen25VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    width = config.hidden_size
    if width % config.num_heads:
      raise ValueError(f"vision hidden_size {width} is not divisible by {config.num_heads} heads")
    self.num_heads = config.num_heads
    self.head_dim = width // config.num_heads
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = Linear(width, 3 * width, axes=("vit_embed", "vit_qkv"), **common)
    self.proj = Linear(width, width, axes=("vit_qkv", "vit_embed"), **common)

  def __call__(self, x, cos, sin, allowed):
    """`x` `[I, P, D]`, tables `[P, head_dim]`, allowed bool `[P, P]` -> `[I, P, D]`."""
    n, length, width = x.shape
    q, k, v = jnp.split(self.qkv(x).reshape(n, length, 3 * self.num_heads, self.head_dim), 3, 2)
    q = apply_rope(q, cos[None], sin[None])
    k = apply_rope(k, cos[None], sin[None]).transpose(0, 2, 1, 3)
    out, _ = attention(q, k, v.transpose(0, 2, 1, 3), allowed[None])
    return self.proj(out.reshape(n, length, width))


class VisionMLP(nnx.Module):
  """SwiGLU with biases."""

  def __init__(self, config: Qwen25VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width, inner = config.hidden_size, config.intermediate_size
    self.gate_proj = Linear(width, inner, axes=("vit_embed", "vit_mlp"), **common)
    self.up_proj = Linear(width, inner, axes=("vit_embed", "vit_mlp"), **common)
    self.down_proj = Linear(inner, width, axes=("vit_mlp", "vit_embed"), **common)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nnx.Module):
  """`x += attn(norm1(x)); x += mlp(norm2(x))`."""

  def __init__(self, config: Qwen25VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = RMSNorm(config.hidden_size, **norm)
    self.attn = VisionAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = RMSNorm(config.hidden_size, **norm)
    self.mlp = VisionMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, allowed):
    x = x + self.attn(self.norm1(x), cos, sin, allowed)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm per patch -> concatenate each merge block's patches -> Linear -> GELU -> Linear."""

  def __init__(self, config: Qwen25VisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    merged = config.hidden_size * config.merge_unit
    self.merged = merged
    self.ln_q = RMSNorm(
      config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    common = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = Linear(merged, merged, axes=("proj_in", "vit_mlp"), **common)
    self.fc2 = Linear(merged, config.out_hidden_size, axes=("vit_mlp", "embed"), **common)

  def __call__(self, x):
    """`[I, P, D]` -> `[I, P / merge_unit, out_hidden_size]`."""
    x = self.ln_q(x).reshape(x.shape[0], -1, self.merged)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Qwen25VisionTransformer(nnx.Module):
  """The vision tower. Parameters: `patch_embed [C*T*p*p, D]`, `blocks[i].{norm1, attn.{qkv,
  proj}, norm2, mlp.{gate,up,down}_proj}`, `merger.{ln_q, fc1, fc2}`."""

  def __init__(
    self, config: Qwen25VisionConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs
  ):
    dtype, param_dtype = as_dtype(dtype), as_dtype(param_dtype)
    self.config = config
    self.dtype = dtype
    kernel = 0.02 * jax.random.normal(
      rngs.params(), (config.patch_dim, config.hidden_size), param_dtype
    )
    self.patch_embed = param(kernel, ("patch", "vit_embed"))
    common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([VisionBlock(config, **common) for _ in range(config.depth)])
    self.merger = PatchMerger(config, **common)

  def __call__(self, patches: jax.Array, grid: Grid) -> jax.Array:
    """Encodes images of one grid.

    Args:
      patches: `[I, P, C*T*p*p]` flattened patches (`patchify` order), P = t*h*w.
      grid: the images' `(t, h, w)`.

    Returns:
      `[I, P / merge_unit, out_hidden_size]` merged tokens in row-major order of merge blocks.
    """
    if patches.ndim != 3 or patches.shape[-1] != self.config.patch_dim:
      raise ValueError(
        f"patches must be [I, P, {self.config.patch_dim}]; got {tuple(patches.shape)}"
      )
    if patches.shape[1] != int(np.prod(grid)):
      raise ValueError(f"{patches.shape[1]} patches per image do not match the grid {grid}")
    full, windowed = (jnp.asarray(m) for m in vision_masks(grid, self.config))
    cos, sin = vision_rope_tables(grid, self.config)
    x = dense(patches.astype(self.dtype), self.patch_embed[...].astype(self.dtype))
    for i, block in enumerate(self.blocks):
      x = block(x, cos, sin, full if i in self.config.fullatt_block_indexes else windowed)
    return self.merger(x)


# ---------------------------------------------------------------------------------------------
# The whole model


class Qwen25VL(nnx.Module):
  """`Qwen2_5_VLForConditionalGeneration`. Submodules: `visual`, `language_model` (Decoder).

  Its interface follows `InternVL` (`embed_inputs`, `map_key_positions`, `num_image_keys`,
  `__call__` returning a `DecoderOutput` with the requested maps), plus `image_grid_thw` for the
  flattened-patch layout and `rope_positions` for the multimodal positions.
  """

  def __init__(self, config: Qwen25VLConfig, *, rngs: nnx.Rngs):
    self.config = config
    dtype, param_dtype = as_dtype(config.dtype), as_dtype(config.param_dtype)
    self.dtype = dtype
    self.visual = Qwen25VisionTransformer(
      config.vision, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
    self.language_model = Decoder(config.text, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # -- images

  def image_grids(self, pixel_values: jax.Array, image_grid_thw=None) -> tuple[Grid, ...]:
    """The `(t, h, w)` grid of every image (of one row's slots for `[B, M, H, W, C]`)."""
    vision = self.config.vision
    if pixel_values.ndim == 2:
      if image_grid_thw is None:
        raise ValueError("flattened pixel_values [N, C*T*P*P] need image_grid_thw")
      grids = concrete_grids(image_grid_thw)
      total = sum(int(np.prod(g)) for g in grids)
      if total != pixel_values.shape[0]:
        raise ValueError(
          f"image_grid_thw covers {total} patches but pixel_values has {pixel_values.shape[0]}"
        )
      return grids
    if pixel_values.ndim not in (4, 5):
      raise ValueError(
        f"pixel_values must be [N, C*T*P*P], [N, H, W, C] or [B, M, H, W, C]; got shape "
        f"{tuple(pixel_values.shape)}"
      )
    images = pixel_values.shape[-4]
    grid = (
      1,
      pixel_values.shape[-3] // vision.patch_size,
      pixel_values.shape[-2] // vision.patch_size,
    )
    return (grid,) * images

  def embed_images(self, pixel_values: jax.Array, image_grid_thw=None) -> jax.Array:
    """Image embeddings `[N_tokens, D]` in order: flattened patches `[N, C*T*P*P]` with
    `image_grid_thw`, or images `[N, H, W, C]`. Images of equal grid run as one batch."""
    vision = self.config.vision
    if pixel_values.ndim == 4:
      patches = patchify(
        pixel_values, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
      )
      grid = self.image_grids(pixel_values)[0]
      merged = self.visual(patches, grid)
      return merged.reshape(-1, merged.shape[-1])
    grids = self.image_grids(pixel_values, image_grid_thw)
    starts = np.cumsum([0] + [int(np.prod(g)) for g in grids])
    pieces: list = [None] * len(grids)
    for grid in dict.fromkeys(grids):
      members = [i for i, g in enumerate(grids) if g == grid]
      stacked = jnp.stack([pixel_values[starts[i] : starts[i + 1]] for i in members])
      merged = self.visual(stacked, grid)
      for row, i in enumerate(members):
        pieces[i] = merged[row]
    return jnp.concatenate(pieces, axis=0)

  def check_image_tokens(self, input_ids, pixel_values, image_grid_thw=None) -> None:
    """Raises ValueError unless concrete `input_ids` hold as many image tokens as the images
    give (per row a multiple of the slot size and at most M images for `[B, M, H, W, C]`)."""
    if pixel_values is None:
      return
    mask = np.asarray(input_ids) == self.config.image_token_id
    grids = self.image_grids(pixel_values, image_grid_thw)
    merge_unit = self.config.vision.merge_unit
    counts = [int(np.prod(g)) // merge_unit for g in grids]
    token_id = self.config.image_token_id
    if pixel_values.ndim == 5:
      per_image = counts[0]
      for row, found in enumerate(mask.sum(axis=1)):
        if found > len(grids) * per_image or found % per_image:
          raise ValueError(
            f"row {row} of input_ids holds {found} image tokens (id {token_id}); expected a "
            f"multiple of {per_image} per image and at most {len(grids)} images"
          )
      return
    found, wanted = int(mask.sum()), sum(counts)
    if found != wanted:
      raise ValueError(
        f"input_ids hold {found} image tokens (id {token_id}) but the {len(grids)} images give "
        f"{wanted} ({counts})"
      )

  def embed_inputs(
    self, input_ids: jax.Array, pixel_values: jax.Array | None = None, image_grid_thw=None
  ) -> jax.Array:
    """Token embeddings `[B, L, D]` with image embeddings written at the image-token positions
    (global order, or per-row slots for `[B, M, H, W, C]`)."""
    embeds = self.language_model.embed(input_ids)
    if pixel_values is None:
      return embeds
    if not isinstance(input_ids, jax.core.Tracer):
      self.check_image_tokens(input_ids, pixel_values, image_grid_thw)
    mask = input_ids == self.config.image_token_id
    if pixel_values.ndim == 5:
      batch, slots = pixel_values.shape[:2]
      if batch != input_ids.shape[0]:
        raise ValueError(
          f"pixel_values [B, M, H, W, C] has B={batch} but input_ids has {input_ids.shape[0]} rows"
        )
      features = self.embed_images(pixel_values.reshape(batch * slots, *pixel_values.shape[2:]))
      features = features.reshape(batch, -1, features.shape[-1]).astype(embeds.dtype)
      rank = jnp.clip(jnp.cumsum(mask, axis=1) - 1, 0, features.shape[1] - 1)
      gathered = jnp.take_along_axis(features, rank[:, :, None], axis=1)
    else:
      features = self.embed_images(pixel_values, image_grid_thw).astype(embeds.dtype)
      rank = jnp.cumsum(mask.reshape(-1)).reshape(mask.shape) - 1
      gathered = features[jnp.clip(rank, 0, features.shape[0] - 1)]
    return jnp.where(mask[:, :, None], gathered, embeds)

  def rope_positions(
    self,
    input_ids: jax.Array,
    pixel_values: jax.Array | None = None,
    image_grid_thw=None,
    attention_mask: jax.Array | None = None,
    start: jax.Array | int = 0,
  ) -> jax.Array:
    """int32 `[B, 3, L]` M-RoPE positions of a batch (see `mrope_positions`); traceable as long
    as the grids are static."""
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, bool)
    image_mask = input_ids == self.config.image_token_id
    grids = () if pixel_values is None else self.image_grids(pixel_values, image_grid_thw)
    return mrope_positions(
      image_mask,
      attention_mask.astype(bool),
      grids,
      self.config.vision.spatial_merge_size,
      per_row=pixel_values is not None and pixel_values.ndim == 5,
      start=start,
    )

  def num_image_keys(self, pixel_values: jax.Array, image_grid_thw=None) -> int:
    """The fixed number N of image-key columns of text-to-image maps (upper bound per row)."""
    grids = self.image_grids(pixel_values, image_grid_thw)
    return sum(int(np.prod(g)) for g in grids) // self.config.vision.merge_unit

  def map_key_positions(
    self,
    input_ids: jax.Array,
    pixel_values: jax.Array | None,
    cache: KVCache | None = None,
    image_grid_thw=None,
  ) -> jax.Array:
    """int32 `[B, N]`: the key columns of text-to-image maps (the row's image positions in order,
    N = `num_image_keys`), as cache slots when a `cache` is given (as `InternVL`)."""
    num_keys = 0 if pixel_values is None else self.num_image_keys(pixel_values, image_grid_thw)
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
    image_grid_thw=None,
    *,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    cache: KVCache | None = None,
    maps: MapRequest = NO_MAPS,
    logits_indices: jax.Array | None = None,
  ) -> DecoderOutput:
    """Runs the whole model on a batch.

    Args:
      input_ids: int `[B, L]` with `image_token_id` where image embeddings go.
      pixel_values: see the module docstring; `image_grid_thw` with flattened patches.
      attention_mask: bool `[B, L]`, True for real tokens.
      positions: int32 `[B, 3, L]` (or `[B, L]`, the same on all three axes, as the reference
        treats 2-D `position_ids`); None computes the M-RoPE positions from the images, counted
        from the cache's `next_position` when a cache is given.
      cache, logits_indices: passed to the decoder.
      maps: which decoder layers return maps / hidden states; text-to-image maps have
        N = `num_image_keys` columns, as `InternVL`.

    Returns:
      The decoder's `DecoderOutput` (`.logits` fp32 `[B, L, V]`).
    """
    embeds = self.embed_inputs(input_ids, pixel_values, image_grid_thw)
    if positions is None:
      start = 0 if cache is None else cache.next_position
      positions = self.rope_positions(
        input_ids, pixel_values, image_grid_thw, attention_mask, start=start
      )
    key_positions = None
    if maps.text_to_image_layers:
      key_positions = self.map_key_positions(input_ids, pixel_values, cache, image_grid_thw)
    return self.language_model(
      inputs_embeds=embeds,
      positions=positions,
      attention_mask=attention_mask,
      cache=cache,
      maps=maps,
      image_key_positions=key_positions,
      logits_indices=logits_indices,
    )


# ---------------------------------------------------------------------------------------------
# Generation


@flax.struct.dataclass
class _Prefill:
  first: jax.Array
  cache: KVCache
  rng: jax.Array


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _prefill(graphdef, state, input_ids, pixel_values, grids, cache_length, method, mask, rng):
  model = nnx.merge(graphdef, state)
  batch, length = input_ids.shape
  last_real = (length - 1) - jnp.argmax(mask[:, ::-1], axis=1)
  out = model(
    input_ids,
    pixel_values,
    grids,
    attention_mask=mask,
    cache=model.init_cache(batch, cache_length),
    logits_indices=last_real[:, None],
  )
  rng, draw = jax.random.split(rng)
  return _Prefill(first=method.next_tokens(out.logits[:, 0], draw), cache=out.cache, rng=rng)


def generate(
  model: Qwen25VL,
  input_ids: jax.Array,
  pixel_values: jax.Array | None = None,
  image_grid_thw=None,
  *,
  max_new_tokens: int,
  cache_length: int | None = None,
  attention_mask: jax.Array | None = None,
  stop_token_ids: tuple[int, ...] = (),
  pad_token_id: int = 0,
  method: SamplingMethod = GREEDY,
  rng: jax.Array | None = None,
) -> SamplingState:
  """Generates a reply: one compiled prefill of the prompt (images, M-RoPE positions) into a
  fresh cache samples the first token, then the decoder's jitted `Sampler` decodes the rest
  (text positions continue from the cache's `next_position`, past the largest M-RoPE position,
  as the reference's `rope_deltas` do).

  Args:
    model: the Qwen2.5-VL.
    input_ids: int `[B, L]` prompts with image tokens (any padding layout with `attention_mask`).
    pixel_values, image_grid_thw: images, any layout (see the module docstring).
    max_new_tokens: tokens to sample at most.
    cache_length: KV-cache slots; defaults to `L + 1 + max_new_tokens`.
    attention_mask, stop_token_ids, pad_token_id, method, rng: as in `sampling.Sampler`.

  Returns:
    A `SamplingState` (`tokens [B, max_new_tokens]`, `num_tokens [B]`, cache). A row whose
    first token is a stop token reports just that token (its cache holds the decode steps the
    batch ran anyway).
  """
  input_ids = jnp.asarray(input_ids)
  batch, length = input_ids.shape
  mask = jnp.ones((batch, length), bool) if attention_mask is None else jnp.asarray(attention_mask)
  cache_length = cache_length or length + 1 + max_new_tokens
  grids = None
  if pixel_values is not None:
    model.check_image_tokens(input_ids, pixel_values, image_grid_thw)
    grids = model.image_grids(pixel_values, image_grid_thw)
  rng = jax.random.key(0) if rng is None else rng
  graphdef, state = nnx.split(model)
  pre = _prefill(
    graphdef, state, input_ids, pixel_values, grids, cache_length, method, mask.astype(bool), rng
  )
  stop_ids = jnp.asarray(tuple(stop_token_ids) or (-1,), jnp.int32)
  first_done = jnp.isin(pre.first, stop_ids)
  tokens = jnp.full((batch, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(pre.first)
  result = SamplingState(
    step=jnp.ones((), jnp.int32),
    done=first_done,
    pending_token=pre.first,
    tokens=tokens,
    num_tokens=jnp.ones((batch,), jnp.int32),
    cache=pre.cache,
    rng=pre.rng,
  )
  if max_new_tokens == 1:
    return result
  sampler = Sampler(
    model.language_model,
    cache_length=cache_length,
    max_new_tokens=max_new_tokens - 1,
    stop_token_ids=stop_token_ids,
    pad_token_id=pad_token_id,
    method=method,
  )
  rest = sampler.continue_(result, jnp.zeros((batch, 0), jnp.int32))
  later = jnp.where(first_done[:, None], pad_token_id, rest.tokens)
  return SamplingState(
    step=rest.step + 1,
    done=first_done | rest.done,
    pending_token=rest.pending_token,
    tokens=tokens.at[:, 1:].set(later),
    num_tokens=1 + jnp.where(first_done, 0, rest.num_tokens),
    cache=rest.cache,
    rng=rest.rng,
  )
