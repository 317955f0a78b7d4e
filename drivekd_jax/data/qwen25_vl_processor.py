"""Qwen2.5-VL image preprocessing (reference: transformers `Qwen2VLImageProcessorPil`).

Each image keeps its aspect ratio at a dynamic resolution: `smart_resize` picks the height and
width, multiples of patch * merge (28 px), whose area lies within `[min_pixels, max_pixels]`;
the image is resized there (PIL bicubic), scaled to [0, 1], normalised with the CLIP mean/std and
cut into patches (`patchify`: the still frame repeated over the 2 temporal slots, block-major over
2x2 merge blocks). The output is what the HF processor gives the model: flattened patches
`[sum t*h*w, C*T*P*P]` and `image_grid_thw` `[I, 3]` = (1, H/14, W/14) per image; each image
becomes `h*w/4` `<|image_pad|>` tokens between `<|vision_start|>` and `<|vision_end|>`
(`image_block`). `ImageSettings.fixed_size` resizes every image to one size instead.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from drivekd_jax.data.processor import (
  OPENAI_CLIP_MEAN,
  OPENAI_CLIP_STD,
  ImageLike,
  load_image,
  resize_bicubic,
)
from drivekd_jax.data.tokenizer import IMAGE_PAD, VISION_END, VISION_START
from drivekd_jax.models.qwen25_vl import patchify


def smart_resize(
  height: int,
  width: int,
  factor: int = 28,
  min_pixels: int = 56 * 56,
  max_pixels: int = 28 * 28 * 1280,
) -> tuple[int, int]:
  """The resized `(height, width)`: multiples of `factor`, area within `[min_pixels,
  max_pixels]`, aspect ratio kept as closely as that allows (the reference's rounding)."""
  if min(height, width) <= 0:
    raise ValueError(f"image size {height}x{width} is empty")
  if max(height, width) / min(height, width) > 200:
    raise ValueError(
      f"image size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} "
      f"exceeds 200"
    )
  h_bar = round(height / factor) * factor
  w_bar = round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt((height * width) / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


@dataclasses.dataclass(frozen=True)
class ImageSettings:
  """Processor settings; teacher and student must share them (equal image token counts).

  Attributes:
    min_pixels, max_pixels: area bounds of `smart_resize` (the reference's `size`
      shortest_edge / longest_edge).
    patch_size, merge_size, temporal_patch_size: as in the vision config.
    fixed_size: `(height, width)` every image is resized to instead of `smart_resize` (e.g.
      (448, 448): 256 tokens per image, one shape for the `[B, M, H, W, 3]` training layout).
  """

  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  merge_size: int = 2
  temporal_patch_size: int = 2
  fixed_size: tuple[int, int] | None = None

  def __post_init__(self):
    if self.fixed_size is not None and any(side % self.factor for side in self.fixed_size):
      raise ValueError(f"fixed_size {self.fixed_size} is not a multiple of {self.factor} px")

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  def target_size(self, height: int, width: int) -> tuple[int, int]:
    """The `(height, width)` an image of this size is resized to."""
    if self.fixed_size is not None:
      return self.fixed_size
    return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)


def normalized_image(image: ImageLike, settings: ImageSettings = ImageSettings()) -> np.ndarray:
  """One image, resized by `smart_resize` and normalised: float32 `[H, W, 3]`."""
  pil = load_image(image)
  height, width = settings.target_size(pil.height, pil.width)
  pixels = np.asarray(resize_bicubic(pil, width, height), np.float32) / 255.0
  return (pixels - OPENAI_CLIP_MEAN) / OPENAI_CLIP_STD


def preprocess(
  images: Sequence[ImageLike], settings: ImageSettings = ImageSettings()
) -> tuple[np.ndarray, np.ndarray]:
  """Images -> `(pixel_values float32 [N, C*T*P*P], image_grid_thw int64 [I, 3])`."""
  patches, grids = [], []
  for image in images:
    pixels = normalized_image(image, settings)
    flat = patchify(
      pixels[None], settings.patch_size, settings.merge_size, settings.temporal_patch_size
    )[0]
    patches.append(flat)
    grids.append(
      (1, pixels.shape[0] // settings.patch_size, pixels.shape[1] // settings.patch_size)
    )
  if not patches:
    channels = 3 * settings.temporal_patch_size * settings.patch_size**2
    return np.zeros((0, channels), np.float32), np.zeros((0, 3), np.int64)
  return np.concatenate(patches).astype(np.float32), np.asarray(grids, np.int64)


def image_token_counts(image_grid_thw: np.ndarray, merge_size: int = 2) -> list[int]:
  """`<|image_pad|>` tokens per image: t*h*w / merge_size^2."""
  grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  return [int(t * h * w) // merge_size**2 for t, h, w in grids]


def image_block(num_tokens: int) -> str:
  """The text of one image in a Qwen2.5-VL prompt: `<|vision_start|>`, `num_tokens`
  `<|image_pad|>` (the expanded placeholder), `<|vision_end|>`."""
  return VISION_START + IMAGE_PAD * num_tokens + VISION_END
