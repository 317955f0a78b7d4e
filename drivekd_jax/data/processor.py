"""InternVL3 / Qwen2.5-VL image preprocessing, chat template and the Drive-KD training inputs.

Images (reference: InternVL `load_image` / `dynamic_preprocess`):
  RGB -> bicubic resize to `image_size`^2 -> /255 -> ImageNet mean/std, NHWC float32. With dynamic
  tiling, the image is resized to the grid of the nearest aspect ratio, cut into row-major tiles,
  and a thumbnail of the whole image is appended when there is more than one tile. Drive-KD uses
  one tile per image (`max_tiles=1`: a plain resize, no thumbnail).

Text (reference: Drive-KD `qa_loader.py`; InternVL `conversation.py` template `internvl2_5`):
  [<|im_start|>system\\n{sys}<|im_end|>\\n]          only when a system message is configured
  <|im_start|>user\\n{Q'}<|im_end|>\\n               labels -100
  <|im_start|>assistant\\n{A}<|im_end|>\\n           labels = ids (header included)
  where Q' has each `<image>` placeholder replaced, in order, by
  `<img>` + tiles * tokens_per_image * `<IMG_CONTEXT>` + `</img>` (no newline). If no user
  message has a placeholder, one per image is prefixed to the first user message. The text
  between image blocks is tokenised chunk by chunk (no BOS). The student and every teacher share
  the tokenizer, so they see the identical token sequence by construction.

Qwen2.5-VL (`ProcessorConfig.family="qwen2.5-vl"`, `Processor.for_model` of a `Qwen25VLConfig`):
the same chat turns; an image is one bicubic resize to a fixed `image_size`^2 square (a
multiple of patch x merge = 28 px, so every slot of the `[B, M, S, S, 3]` layout has one shape),
/255, CLIP mean/std, and its block is `<|vision_start|>` + (S/28)^2 `<|image_pad|>` +
`<|vision_end|>`. Its batches carry M-RoPE positions `[B, 3, L]` (`Processor.batch_positions`,
the model's own `mrope_positions`), InternVL's `[B, L]`.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import PIL.Image

from drivekd_jax.data.tokenizer import (
  IM_END,
  IM_START,
  IMAGE_TOKENS,
  IMG_CONTEXT,
  IMG_END,
  IMG_START,
  Tokenizer,
)
from drivekd_jax.models.qwen25_vl import Qwen25VLConfig, mrope_positions

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
OPENAI_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
OPENAI_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
# Image side of Qwen2.5-VL training images: 448 px squares give 256 tokens, as InternVL3's tiles.
QWEN25_VL_IMAGE_SIZE = 448
IMAGE_PLACEHOLDER = "<image>"
IGNORE_INDEX = -100

# Ids of the `capability` field (contract: 0 perception, 1 reasoning, 2 planning, 3 other).
CAPABILITIES = ("perception", "reasoning", "planning", "other")
CAPABILITY_IDS = {name: index for index, name in enumerate(CAPABILITIES)}

# InternVL3's default system message (template `internvl2_5`).
INTERNVL_SYSTEM_MESSAGE = (
  "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
  "多模态大语言模型。"
)

ImageLike = bytes | str | os.PathLike | np.ndarray | PIL.Image.Image


# ------------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------------


def load_image(image: ImageLike) -> PIL.Image.Image:
  """Any image source (encoded bytes, a path, a uint8 HWC array, a PIL image) as RGB PIL."""
  if isinstance(image, PIL.Image.Image):
    pil = image
  elif isinstance(image, bytes | bytearray | memoryview):
    pil = PIL.Image.open(io.BytesIO(bytes(image)))
  elif isinstance(image, str | os.PathLike):
    pil = PIL.Image.open(Path(image))
  elif isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"an image array must be uint8 [H, W(, C)], got {image.dtype} {image.shape}")
    pil = PIL.Image.fromarray(image)
  else:
    raise TypeError(f"cannot read an image from {type(image).__name__}")
  return pil.convert("RGB")


def resize_bicubic(image: PIL.Image.Image, width: int, height: int) -> PIL.Image.Image:
  """PIL bicubic resize, what torchvision's `Resize(..., BICUBIC)` does on a PIL image."""
  return image.resize((width, height), resample=PIL.Image.Resampling.BICUBIC)


def normalize(
  image: PIL.Image.Image | np.ndarray,
  mean: np.ndarray = IMAGENET_MEAN,
  std: np.ndarray = IMAGENET_STD,
) -> np.ndarray:
  """uint8 RGB `[H, W, 3]` -> float32 `[H, W, 3]`: /255, then mean/std (ImageNet by default).

  The same float32 operations as torchvision's ToTensor + Normalize.
  """
  pixels = np.asarray(image, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
  return (pixels - mean) / std


def candidate_grids(max_num: int, min_num: int = 1) -> list[tuple[int, int]]:
  """Tile grids (columns, rows) with min_num <= columns*rows <= max_num, sorted by area.

  The grids are collected in a Python set and stably sorted by area, as the reference does, so
  grids of equal area keep the reference's relative order (it matters for the tie rule).
  """
  grids = {
    (columns, rows)
    for n in range(min_num, max_num + 1)
    for columns in range(1, n + 1)
    for rows in range(1, n + 1)
    if min_num <= columns * rows <= max_num
  }
  return sorted(grids, key=lambda grid: grid[0] * grid[1])


def closest_grid(
  width: int, height: int, grids: Sequence[tuple[int, int]], image_size: int
) -> tuple[int, int]:
  """The grid whose aspect ratio is nearest to width/height.

  On an exact tie the later (larger) grid wins only if the image has more than half the pixels
  of that grid at `image_size` per tile.
  """
  aspect_ratio = width / height
  best_diff = float("inf")
  best = (1, 1)
  for columns, rows in grids:
    diff = abs(aspect_ratio - columns / rows)
    if diff < best_diff:
      best_diff, best = diff, (columns, rows)
    elif diff == best_diff and width * height > 0.5 * image_size * image_size * columns * rows:
      best = (columns, rows)
  return best


def tile_image(
  image: PIL.Image.Image,
  *,
  image_size: int = 448,
  max_num: int = 12,
  min_num: int = 1,
  use_thumbnail: bool = True,
) -> list[PIL.Image.Image]:
  """InternVL dynamic tiling: row-major `image_size`^2 tiles, then a thumbnail if > 1 tile."""
  width, height = image.size
  columns, rows = closest_grid(width, height, candidate_grids(max_num, min_num), image_size)
  resized = resize_bicubic(image, columns * image_size, rows * image_size)
  tiles = []
  for index in range(columns * rows):
    left = (index % columns) * image_size
    top = (index // columns) * image_size
    tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
  if use_thumbnail and len(tiles) != 1:
    tiles.append(resize_bicubic(image, image_size, image_size))
  return tiles


def preprocess_image(
  image: ImageLike,
  *,
  image_size: int = 448,
  max_tiles: int = 1,
  use_thumbnail: bool = True,
  mean: np.ndarray = IMAGENET_MEAN,
  std: np.ndarray = IMAGENET_STD,
) -> np.ndarray:
  """One image -> float32 `[num_tiles, image_size, image_size, 3]`, normalised by mean/std.

  `max_tiles=1` is Drive-KD's single bicubic resize (no aspect ratio kept, no thumbnail).
  """
  pil = load_image(image)
  if max_tiles == 1:
    tiles = [resize_bicubic(pil, image_size, image_size)]
  else:
    tiles = tile_image(pil, image_size=image_size, max_num=max_tiles, use_thumbnail=use_thumbnail)
  # A tile is already image_size^2; the reference's per-tile Resize is then the identity.
  return np.stack([normalize(tile, mean, std) for tile in tiles]).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# InternVL3 chat template (generation from pretrained models)
# ------------------------------------------------------------------------------------------------


def image_block(num_tiles: int, tokens_per_image: int) -> str:
  """`<img>` + num_tiles*tokens_per_image `<IMG_CONTEXT>` + `</img>`."""
  return IMG_START + IMG_CONTEXT * (num_tiles * tokens_per_image) + IMG_END


def internvl_chat_prompt(
  question: str,
  *,
  tiles_per_image: Sequence[int] = (),
  tokens_per_image: int = 256,
  system_message: str | None = INTERNVL_SYSTEM_MESSAGE,
  history: Sequence[tuple[str, str]] = (),
) -> str:
  """The `internvl2_5` prompt as InternVL `chat()` builds it, ending after the assistant header.

  Args:
    question: user text; `<image>` marks where each image goes. With images but no placeholder,
      `<image>\\n` is prefixed once per image (InternVL prefixes one for its single-image case).
    tiles_per_image: number of tiles of each image, in order.
    tokens_per_image: image tokens per tile (256 for InternVL3 at 448 px).
    system_message: None drops the system block (an empty string keeps an empty one, as the
      reference does).
    history: earlier (question, answer) turns, text only.

  Returns:
    The prompt string; tokenise it with `Tokenizer.encode`.
  """
  if tiles_per_image and IMAGE_PLACEHOLDER not in question:
    question = (IMAGE_PLACEHOLDER + "\n") * len(tiles_per_image) + question
  parts = []
  if system_message is not None:
    parts.append(f"{IM_START}system\n{system_message}{IM_END}\n")
  for old_question, old_answer in history:
    parts.append(f"{IM_START}user\n{old_question}{IM_END}\n")
    parts.append(f"{IM_START}assistant\n{old_answer}{IM_END}\n")
  parts.append(f"{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n")
  prompt = "".join(parts)
  if prompt.count(IMAGE_PLACEHOLDER) != len(tiles_per_image):
    raise ValueError(
      f"the prompt has {prompt.count(IMAGE_PLACEHOLDER)} {IMAGE_PLACEHOLDER} placeholders but "
      f"{len(tiles_per_image)} images were given"
    )
  for num_tiles in tiles_per_image:
    prompt = prompt.replace(IMAGE_PLACEHOLDER, image_block(num_tiles, tokens_per_image), 1)
  return prompt


# ------------------------------------------------------------------------------------------------
# Drive-KD input construction
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
  """How samples become token sequences and pixels.

  Attributes:
    image_size: tile side in pixels (448 for InternVL3; tiny test models use less).
    tokens_per_image: image-context tokens per tile (the model's `tokens_per_image`).
    max_tiles: 1 = Drive-KD single resize; > 1 = InternVL dynamic tiling up to this many tiles.
    use_thumbnail: append the thumbnail when tiling gives more than one tile.
    system_message: None (Drive-KD code) or a system prompt placed before the user turn.
    camera_labels: when images are prefixed to a question without placeholders, write
      "CAM_FRONT: <image>\\n" per image instead of Drive-KD's bare "<image><image>...".
    family: the model family of `tokenizer.IMAGE_TOKENS` ("internvl" or "qwen2.5-vl"): its
      image tokens, normalisation and positions.
    patch_size, merge_size: Qwen2.5-VL's vision patch and spatial merge (its M-RoPE grid).
  """

  image_size: int = 448
  tokens_per_image: int = 256
  max_tiles: int = 1
  use_thumbnail: bool = True
  system_message: str | None = None
  camera_labels: bool = False
  family: str = "internvl"
  patch_size: int = 14
  merge_size: int = 2

  def __post_init__(self):
    if self.family not in IMAGE_TOKENS:
      raise ValueError(f"family={self.family!r}: expected one of {', '.join(IMAGE_TOKENS)}")
    if self.family == "qwen2.5-vl":
      factor = self.patch_size * self.merge_size
      if self.max_tiles != 1:
        raise ValueError(f"max_tiles={self.max_tiles}: Qwen2.5-VL images are not tiled (use 1)")
      if self.image_size % factor or self.tokens_per_image != (self.image_size // factor) ** 2:
        raise ValueError(
          f"Qwen2.5-VL image_size {self.image_size} must be a multiple of {factor} px with "
          f"tokens_per_image (image_size/{factor})^2, got {self.tokens_per_image}"
        )


def capability_id(capability: str | int | bytes, *, where: str = "") -> int:
  """'perception'|'reasoning'|'planning'|'other' (or 0..3) -> 0..3."""
  if isinstance(capability, bytes):
    capability = capability.decode("utf-8")
  if isinstance(capability, int | np.integer):
    if 0 <= int(capability) < len(CAPABILITIES):
      return int(capability)
  elif capability in CAPABILITY_IDS:
    return CAPABILITY_IDS[capability]
  raise ValueError(f"{where}field 'capability': {capability!r} is not one of {CAPABILITIES}")


def record_text(value: Any) -> str:
  """A record's text field as str (TFDS data sources hand text back as bytes or 0-d arrays)."""
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return record_text(value.item())
  return str(value)


def text_positions(image_mask: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
  """int32 `[B, L]`: 0..n-1 over each row's n real tokens, 0 after (InternVL's 1-D RoPE)."""
  del image_mask
  attention = np.asarray(attention_mask, bool)
  return np.where(attention, np.cumsum(attention, axis=1) - 1, 0).astype(np.int32)


def model_family(model_config) -> str:
  """The `tokenizer.IMAGE_TOKENS` family of a model config."""
  return "qwen2.5-vl" if isinstance(model_config, Qwen25VLConfig) else "internvl"


def tokenizer_for(tokenizer: Tokenizer, family: str) -> Tokenizer:
  """The tokenizer a model of `family` reads: `tokenizer` with the family's image tokens
  (appended when missing, `Tokenizer.with_special_tokens`)."""
  return tokenizer.with_special_tokens(IMAGE_TOKENS[family])


class Processor:
  """Turns chat samples (messages + images) into the processed examples the pipeline batches.

  A processed example (numpy, one sample):
    input_ids int32 `[L]`; labels int32 `[L]` (unshifted, -100 where unsupervised);
    attention_mask bool `[L]` (all True); image_mask bool `[L]` (True at the image tokens,
    `<IMG_CONTEXT>` / `<|image_pad|>`); pixel_values float32 `[M, S, S, 3]` (M tiles in order
    of appearance); capability int32 `[]`.
  """

  def __init__(self, tokenizer: Tokenizer, config: ProcessorConfig = ProcessorConfig()):
    self.tokenizer = tokenizer
    self.config = config
    self.image_start, self.image_token, self.image_end = IMAGE_TOKENS[config.family]
    # Resolved now: a tokenizer without the family's image tokens fails here, naming the token.
    self.image_token_id = tokenizer.image_token_ids(config.family)[1]

  @classmethod
  def for_model(cls, tokenizer: Tokenizer, model_config, **overrides) -> Processor:
    """A processor matching an `InternVLConfig` (tile size, tokens per tile) or a
    `Qwen25VLConfig` (square images of `overrides["image_size"]`, default 448 px), checked
    against it.

    Raises ValueError when the model's `image_token_id` is not the tokenizer's image token id
    (`<IMG_CONTEXT>` / `<|image_pad|>`) or its vocabulary is smaller than the tokenizer's.
    """
    family = model_family(model_config)
    image_token = IMAGE_TOKENS[family][1]
    token_id = tokenizer.image_token_ids(family)[1]
    if model_config.image_token_id != token_id:
      raise ValueError(
        f"model image_token_id {model_config.image_token_id} != {image_token} id "
        f"{token_id} of tokenizer {tokenizer.source}"
      )
    if model_config.text.vocab_size < tokenizer.vocab_size:
      raise ValueError(
        f"model vocab_size {model_config.text.vocab_size} < {tokenizer.vocab_size} ids of "
        f"tokenizer {tokenizer.source}"
      )
    if family == "qwen2.5-vl":
      vision = model_config.vision
      image_size = overrides.pop("image_size", QWEN25_VL_IMAGE_SIZE)
      factor = vision.patch_size * vision.spatial_merge_size
      settings = dict(
        family=family,
        image_size=image_size,
        tokens_per_image=(image_size // factor) ** 2,
        patch_size=vision.patch_size,
        merge_size=vision.spatial_merge_size,
      )
    else:
      settings = dict(
        image_size=model_config.vision.image_size, tokens_per_image=model_config.tokens_per_image
      )
    settings.update(overrides)
    return cls(tokenizer, ProcessorConfig(**settings))

  def batch_positions(self, image_mask: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """RoPE positions of a right-padded batch (bool `[B, L]` masks): int32 `[B, L]` for
    InternVL (`text_positions`), M-RoPE `[B, 3, L]` for Qwen2.5-VL, whose image slots all have
    the grid `(1, S/patch, S/patch)` (the model's `mrope_positions`, run on the host's CPU)."""
    if self.config.family == "internvl":
      return text_positions(image_mask, attention_mask)
    side = self.config.image_size // self.config.patch_size
    per_image = self.config.tokens_per_image
    most = int(np.max(np.sum(image_mask, axis=1), initial=0))
    grids = [(1, side, side)] * max(1, -(-most // per_image))
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      positions = mrope_positions(
        np.asarray(image_mask, bool),
        np.asarray(attention_mask, bool),
        grids,
        self.config.merge_size,
        per_row=True,
      )
      return np.asarray(positions, np.int32)

  # -- images -------------------------------------------------------------------------------

  def images_to_pixels(
    self, images: Sequence[ImageLike], *, where: str = ""
  ) -> tuple[np.ndarray, list[int]]:
    """Images -> (float32 `[M, S, S, 3]`, tiles per image); unreadable images name their slot."""
    size = self.config.image_size
    clip = self.config.family == "qwen2.5-vl"
    per_image = []
    for index, image in enumerate(images):
      try:
        tiles = preprocess_image(
          image,
          image_size=size,
          max_tiles=self.config.max_tiles,
          use_thumbnail=self.config.use_thumbnail,
          mean=OPENAI_CLIP_MEAN if clip else IMAGENET_MEAN,
          std=OPENAI_CLIP_STD if clip else IMAGENET_STD,
        )
      except (OSError, ValueError, TypeError) as error:  # PIL raises OSError for corrupt files
        raise ValueError(
          f"{where}field 'images'[{index}]: unreadable image: {type(error).__name__}: {error}"
        ) from None
      per_image.append(tiles)
    if not per_image:
      return np.zeros((0, size, size, 3), np.float32), []
    return np.concatenate(per_image), [len(tiles) for tiles in per_image]

  # -- text ---------------------------------------------------------------------------------

  def _encode_text(self, text: str, where: str) -> np.ndarray:
    ids = self.tokenizer.encode(text)
    if np.any(ids == self.image_token_id):
      raise ValueError(f"{where}the text contains {self.image_token}, which is reserved for images")
    return ids

  def _user_chunks(
    self, content: str, tiles: Sequence[int], where: str
  ) -> tuple[list[np.ndarray], list[bool]]:
    """Token chunks of one user turn and whether each chunk is image context."""
    pieces = content.split(IMAGE_PLACEHOLDER)
    assert len(pieces) == len(tiles) + 1
    chunks, is_image = [], []
    text = f"{IM_START}user\n"
    for piece, num_tiles in zip(pieces[:-1], tiles):
      chunks.append(self._encode_text(text + piece + self.image_start, where))
      is_image.append(False)
      chunks.append(
        np.full(num_tiles * self.config.tokens_per_image, self.image_token_id, np.int32)
      )
      is_image.append(True)
      text = self.image_end
    chunks.append(self._encode_text(text + pieces[-1] + f"{IM_END}\n", where))
    is_image.append(False)
    return chunks, is_image

  def _prefix_placeholders(self, content: str, cameras: Sequence[str] | None, count: int) -> str:
    if self.config.camera_labels and cameras is not None and len(cameras) == count:
      return "".join(f"{camera}: {IMAGE_PLACEHOLDER}\n" for camera in cameras) + content
    return IMAGE_PLACEHOLDER * count + content

  def build(
    self,
    messages: Sequence[Mapping[str, str]],
    images: Sequence[ImageLike] = (),
    *,
    capability: str | int = "other",
    cameras: Sequence[str] | None = None,
    add_generation_prompt: bool = False,
    where: str = "",
  ) -> dict[str, np.ndarray]:
    """Drive-KD input construction for one sample.

    Args:
      messages: [{"role": "user"|"assistant"|"system", "content": str}, ...]; every assistant
        turn is supervised including its header. A "system" message overrides
        `config.system_message`.
      images: one per `<image>` placeholder, in order (or prefixed when there is none).
      capability: the sample's capability (name or id).
      cameras: camera names of the images (used only with `config.camera_labels`).
      add_generation_prompt: end with `<|im_start|>assistant\\n` (unsupervised) for generation;
        the messages must then end with a user turn.
      where: prefix for error messages (file / record).

    Returns:
      The processed example (see the class docstring).
    """
    messages = [
      dict(role=record_text(m["role"]), content=record_text(m["content"])) for m in messages
    ]
    system_message = self.config.system_message
    if messages and messages[0]["role"] == "system":
      system_message = messages.pop(0)["content"]
    for index, message in enumerate(messages):
      expected = "user" if index % 2 == 0 else "assistant"
      if message["role"] != expected:
        raise ValueError(
          f"{where}field 'messages'[{index}]: role {message['role']!r}, expected {expected!r} "
          "(turns must alternate user/assistant, starting with user)"
        )
    if add_generation_prompt and messages and messages[-1]["role"] != "user":
      raise ValueError(f"{where}a generation prompt needs the messages to end with a user turn")
    if not messages:
      raise ValueError(f"{where}field 'messages' is empty")

    pixel_values, tiles = self.images_to_pixels(images, where=where)
    placeholders = sum(
      m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] == "user"
    )
    if placeholders == 0 and images:
      messages[0]["content"] = self._prefix_placeholders(
        messages[0]["content"], cameras, len(tiles)
      )
    elif placeholders != len(tiles):
      raise ValueError(
        f"{where}field 'messages': {placeholders} {IMAGE_PLACEHOLDER} placeholders but "
        f"{len(tiles)} images"
      )
    for message in messages:
      if message["role"] == "assistant" and IMAGE_PLACEHOLDER in message["content"]:
        raise ValueError(f"{where}field 'messages': an assistant turn holds {IMAGE_PLACEHOLDER}")

    ids, labels, image_mask = [], [], []

    def append(chunk: np.ndarray, supervised: bool, is_image: bool) -> None:
      ids.append(chunk)
      labels.append(chunk if supervised else np.full_like(chunk, IGNORE_INDEX))
      image_mask.append(np.full(chunk.shape, is_image))

    if system_message is not None:
      append(
        self._encode_text(f"{IM_START}system\n{system_message}{IM_END}\n", where), False, False
      )
    next_image = 0
    for message in messages:
      if message["role"] == "user":
        count = message["content"].count(IMAGE_PLACEHOLDER)
        chunks, is_image = self._user_chunks(
          message["content"], tiles[next_image : next_image + count], where
        )
        next_image += count
        for chunk, image in zip(chunks, is_image):
          append(chunk, False, image)
      else:
        text = f"{IM_START}assistant\n{message['content']}{IM_END}\n"
        append(self._encode_text(text, where), True, False)
    if add_generation_prompt:
      append(self._encode_text(f"{IM_START}assistant\n", where), False, False)

    input_ids = np.concatenate(ids).astype(np.int32)
    return {
      "input_ids": input_ids,
      "labels": np.concatenate(labels).astype(np.int32),
      "attention_mask": np.ones(input_ids.shape, bool),
      "image_mask": np.concatenate(image_mask).astype(bool),
      "pixel_values": pixel_values,
      "capability": np.asarray(capability_id(capability, where=where), np.int32),
    }

  def training_example(
    self,
    question: str,
    answer: str,
    images: Sequence[ImageLike] = (),
    *,
    capability: str | int = "other",
    cameras: Sequence[str] | None = None,
    where: str = "",
  ) -> dict[str, np.ndarray]:
    """One question/answer pair (the Drive-KD training unit) as a processed example."""
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return self.build(messages, images, capability=capability, cameras=cameras, where=where)

  def prompt_example(
    self,
    question: str,
    images: Sequence[ImageLike] = (),
    *,
    capability: str | int = "other",
    cameras: Sequence[str] | None = None,
    where: str = "",
  ) -> dict[str, np.ndarray]:
    """The same construction ending after `<|im_start|>assistant\\n`, for generation."""
    messages = [{"role": "user", "content": question}]
    return self.build(
      messages,
      images,
      capability=capability,
      cameras=cameras,
      add_generation_prompt=True,
      where=where,
    )

  # -- records ------------------------------------------------------------------------------

  def record_example(
    self, record: Mapping[str, Any], *, where: str = "", prompt_only: bool = False
  ) -> dict[str, np.ndarray]:
    """A driving record (drivekd_jax.data.records fields) -> processed example.

    Uses `question`, `answer`, `images` (encoded bytes, decoded arrays or paths), `cameras` and
    `capability`. Questions without `<image>` placeholders (DriveBench, DriveLM) get one per image
    prefixed, in camera order. With `prompt_only` the answer is left out (generation).
    """
    where = where or record_where(record)
    try:
      question = record_text(record["question"])
      images = list(record.get("images", ()))
      cameras = [record_text(c) for c in record.get("cameras", ())] or None
      capability = record.get("capability", "other")
      if prompt_only:
        return self.prompt_example(
          question, images, capability=capability, cameras=cameras, where=where
        )
      answer = record_text(record["answer"])
    except KeyError as error:
      raise KeyError(f"{where}missing field {error.args[0]!r}") from None
    return self.training_example(
      question, answer, images, capability=capability, cameras=cameras, where=where
    )


def record_where(record: Mapping[str, Any]) -> str:
  """'record record_id=... frame_token=...: ' (the identifying fields present) for errors."""
  keys = [k for k in ("record_id", "frame_token", "question_type", "id") if k in record]
  keys = [k for k in keys if record_text(record[k])]
  if not keys:
    return "record: "
  return "record " + " ".join(f"{k}={record_text(record[k])}" for k in keys) + ": "
