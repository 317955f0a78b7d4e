"""What every judge shares: the message parts, the protocol, errors and reply parsing."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
from PIL import Image

DEFAULT_TEMPERATURE = 0.1


class JudgeError(RuntimeError):
  """A judge call failed (transport, HTTP status, or a reply that is not a chat completion)."""


class JudgeReplyError(ValueError):
  """A judge replied, but the reply does not hold the JSON object that was asked for."""


@dataclasses.dataclass(frozen=True)
class ImagePart:
  """One encoded image in a judge message (bytes of a PNG or JPEG file)."""

  data: bytes
  media_type: str = "image/png"

  @classmethod
  def from_path(cls, path: str | Path) -> ImagePart:
    """Reads a file; the media type follows the official rule (.png -> png, else jpeg)."""
    path = Path(path)
    media_type = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return cls(path.read_bytes(), media_type)

  @classmethod
  def from_array(cls, pixels: np.ndarray) -> ImagePart:
    """Encodes an RGB uint8 array [H, W, 3] as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return cls(buffer.getvalue(), "image/png")

  def data_url(self) -> str:
    return f"data:{self.media_type};base64,{base64.b64encode(self.data).decode('ascii')}"

  def to_pil(self) -> Image.Image:
    return Image.open(io.BytesIO(self.data)).convert("RGB")

  def __repr__(self) -> str:  # Never dump image bytes into logs.
    return f"ImagePart({self.media_type}, {len(self.data)} bytes)"


Part = str | ImagePart


@runtime_checkable
class Judge(Protocol):
  """A chat judge: one system prompt, one user message of text and image parts, a text reply."""

  name: str

  def chat(
    self, system: str, parts: Sequence[Part], *, temperature: float = DEFAULT_TEMPERATURE
  ) -> str: ...


def outermost_json_object(text: str) -> dict:
  """Parses the outermost `{...}` of a reply (first '{' to last '}'), as the official scorer does.

  Raises:
    JudgeReplyError: no braces, invalid JSON between them, or not a JSON object.
  """
  if not isinstance(text, str):
    raise JudgeReplyError(f"judge reply is {type(text).__name__}, not text")
  start, end = text.find("{"), text.rfind("}")
  if start < 0 or end <= start:
    raise JudgeReplyError(f"no JSON object in judge reply: {text[:200]!r}")
  try:
    payload = json.loads(text[start : end + 1])
  except json.JSONDecodeError as error:
    raise JudgeReplyError(f"invalid JSON in judge reply ({error}): {text[:200]!r}") from error
  if not isinstance(payload, dict):
    raise JudgeReplyError(f"judge reply JSON is not an object: {text[:200]!r}")
  return payload


def text_of(parts: Sequence[Part]) -> str:
  """The text parts of a message, joined by newlines."""
  return "\n".join(part for part in parts if isinstance(part, str))


def images_of(parts: Sequence[Part]) -> list[ImagePart]:
  return [part for part in parts if isinstance(part, ImagePart)]
