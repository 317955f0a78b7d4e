"""The `UnifiedModel` protocol and the official `/infer` message format.

A history is the official message list (`docs/imug_protocol.md` §2.1):

  [{"role": "system" | "user" | "assistant",
    "content": [{"type": "text", "text": str} | {"type": "image", "image": <base64 PNG/JPEG>}]}]

A model answers one turn: `respond(history, output_mode, temperature, rng) -> Response`, where
`output_mode` is "text_only" or "image_only" and the response holds text or PNG bytes. Failures
raise `ModelError`; the rollout records them as `ERROR: ...` like the official client.

A model that can hold only so much declares a `token_budget` (`TokenBudget`); the server checks a
request against it from the lengths of its texts and the number of its images alone, before any
image is decoded or any text tokenized, so a prompt that cannot fit costs no work
(`validate_request(..., budget=...)` raises `PromptTooLong`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from PIL import Image

OUTPUT_MODES = ("text_only", "image_only")
ROLES = ("system", "user", "assistant")
Message = dict[str, Any]


class ModelError(RuntimeError):
  """A model (local or remote) could not answer a turn."""


class ProtocolError(ValueError):
  """A request or reply breaks the `/infer` format; the message names the offending field."""


class PromptTooLong(ProtocolError):
  """A request that cannot fit the model's token budget (rejected before any work is done)."""


# NFC, which tokenizers apply first, can merge up to 3 code points into one (Hangul jamo).
_NFC_MAX_MERGE = 3


@dataclasses.dataclass(frozen=True)
class TokenBudget:
  """What one call of a model can hold, and a cheap lower bound of what a prompt needs.

  Attributes:
    max_tokens: prompt tokens the model can take in one call (its context less its answer).
    tokens_per_image: tokens each image item costs (at least).
    max_chars_per_token: the most characters one text token ever covers (longest vocabulary
      entry); the text of a prompt needs at least `len(text) / (3 * max_chars_per_token)` tokens.
  """

  max_tokens: int
  tokens_per_image: int
  max_chars_per_token: int

  def min_tokens(self, history: Sequence[Any]) -> int:
    """A lower bound of the prompt's tokens from text lengths and image counts (O(messages))."""
    chars = images = 0
    for msg in history:
      for item in msg.get("content", ()) if isinstance(msg, Mapping) else ():
        if not isinstance(item, Mapping):
          continue
        if isinstance(item.get("text"), str):
          chars += len(item["text"])
        elif item.get("type") == "image":
          images += 1
    per_token = _NFC_MAX_MERGE * max(1, self.max_chars_per_token)
    return math.ceil(chars / per_token) + images * self.tokens_per_image

  def check(self, history: Sequence[Any]) -> None:
    """Raises PromptTooLong when the history certainly does not fit."""
    needed = self.min_tokens(history)
    if needed > self.max_tokens:
      raise PromptTooLong(
        f"the prompt needs at least {needed} tokens; the model holds {self.max_tokens}"
      )


_OBJECT_REPR = re.compile(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>")


def describe_error(error: BaseException) -> str:
  """`Type: message` without object reprs such as `<_io.BytesIO object at 0x...>`."""
  text = _OBJECT_REPR.sub("", str(error)).strip()
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclasses.dataclass(frozen=True)
class Response:
  """One model answer: exactly one of `text` or `image` (encoded PNG bytes)."""

  text: str | None = None
  image: bytes | None = None

  def __post_init__(self):
    if (self.text is None) == (self.image is None):
      raise ValueError("a Response holds exactly one of text and image")

  def to_json(self) -> dict[str, str]:
    """The official reply body's `response` object."""
    if self.text is not None:
      return {"text": self.text}
    return {"image": encode_image(self.image)}

  @classmethod
  def from_json(cls, body: Any, *, max_image_bytes: int = 64 << 20) -> Response:
    """Parses an official reply `{"response": {...}}`; `{"error": ...}` raises ModelError."""
    if not isinstance(body, Mapping) or not isinstance(body.get("response"), Mapping):
      if isinstance(body, Mapping) and "error" in body:
        raise ModelError(f"server error: {body['error']}")
      raise ProtocolError(f"reply must be {{'response': {{...}}}}, got {_preview(body)}")
    response = body["response"]
    if "error" in response:
      raise ModelError(f"server error: {response['error']}")
    if isinstance(response.get("text"), str):
      return cls(text=response["text"])
    if isinstance(response.get("image"), str):
      return cls(
        image=decode_image(response["image"], max_bytes=max_image_bytes, field="response.image")
      )
    raise ProtocolError(f"response needs 'text' or 'image', got {_preview(response)}")


@runtime_checkable
class UnifiedModel(Protocol):
  """Anything that answers a turn of an interleaved image-text dialogue."""

  name: str

  def respond(
    self, history: Sequence[Message], output_mode: str, temperature: float, rng: Any = None
  ) -> Response:
    """Answers the last user turn of `history` in `output_mode` ("text_only"/"image_only").

    Args:
      history: the official message list, ending with the user turn to answer.
      output_mode: forces a text or an image answer.
      temperature: sampling temperature (the official client sends 0.7).
      rng: a `jax.random.key` for in-process models; remote models ignore it.

    Raises:
      ModelError: the model could not answer.
    """
    ...


def _preview(value: Any, limit: int = 120) -> str:
  """A short description of a bad value that never walks a huge or deeply nested one."""
  if isinstance(value, dict):
    fields = ", ".join(f"{str(k)[:40]!r}: {type(v).__name__}" for k, v in list(value.items())[:4])
    return "{" + fields + (", ..." if len(value) > 4 else "") + "}"
  if isinstance(value, list):
    return f"a list of {len(value)}"
  text = repr(value[: limit + 1] if isinstance(value, str) else value)
  return text if len(text) <= limit else text[:limit] + "..."


def encode_image(data: bytes) -> str:
  return base64.b64encode(data).decode("ascii")


def decode_image(text: str, *, max_bytes: int = 64 << 20, field: str = "image") -> bytes:
  """Base64 -> encoded image bytes, checked to be a readable image.

  Raises:
    ProtocolError: naming `field`, for bad base64, oversized data or a non-image payload.
  """
  if not isinstance(text, str):
    raise ProtocolError(f"{field}: base64 string expected, got {type(text).__name__}")
  if len(text) > (max_bytes * 4) // 3 + 4:
    raise ProtocolError(f"{field}: image larger than {max_bytes} bytes")
  try:
    data = base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise ProtocolError(f"{field}: invalid base64 ({e})") from None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
  except Exception as e:
    raise ProtocolError(f"{field}: not a readable image ({describe_error(e)})") from None
  return data


# ------------------------------------------------------------------------------- building history


def text_item(text: str) -> dict[str, str]:
  return {"type": "text", "text": text}


def image_item(data: bytes) -> dict[str, str]:
  return {"type": "image", "image": encode_image(data)}


def message(role: str, content: Sequence[dict[str, str]]) -> Message:
  return {"role": role, "content": list(content)}


def assistant_message(response: Response | None) -> Message:
  """The model's own output as the official client appends it; None (a failure) gives "Error"."""
  if response is None:
    return message("assistant", [text_item("Error")])
  if response.text is not None:
    return message("assistant", [text_item(response.text)])
  return message("assistant", [image_item(response.image)])


def validate_history(
  history: Any, *, max_image_bytes: int = 64 << 20, budget: TokenBudget | None = None
) -> list[Message]:
  """Checks a request's history (roles, item types, base64 images) and returns it.

  The structure is checked first, then the token budget (if given), and only then are the images
  decoded: a request that cannot fit costs no decoding.

  Raises:
    ProtocolError: naming the message index and item index of the first problem.
    PromptTooLong: the history cannot fit `budget`.
  """
  if not isinstance(history, list) or not history:
    raise ProtocolError("history must be a non-empty list of messages")
  images = []
  for i, msg in enumerate(history):
    where = f"history[{i}]"
    if not isinstance(msg, dict) or msg.get("role") not in ROLES:
      raise ProtocolError(f"{where}: a message is {{'role': {'|'.join(ROLES)}, 'content': [...]}}")
    content = msg.get("content")
    if not isinstance(content, list):
      raise ProtocolError(f"{where}.content: list expected")
    for j, item in enumerate(content):
      at = f"{where}.content[{j}]"
      kind = item.get("type") if isinstance(item, dict) else None
      if kind == "text" and isinstance(item.get("text"), str):
        continue
      if kind == "image" and isinstance(item.get("image"), str):
        images.append((f"{at}.image", item["image"]))
        continue
      raise ProtocolError(
        f"{at}: an item is {{'type': 'text', 'text': str}} or "
        f"{{'type': 'image', 'image': base64}}, got {_preview(item)}"
      )
  if history[-1]["role"] != "user":
    raise ProtocolError(f"history[{len(history) - 1}]: the last message must be the user turn")
  if budget is not None:
    budget.check(history)
  for field, text in images:
    decode_image(text, max_bytes=max_image_bytes, field=field)
  return history


def validate_request(
  body: Any, *, max_image_bytes: int = 64 << 20, budget: TokenBudget | None = None
) -> tuple[list[Message], str, float]:
  """Checks an `/infer` request body; returns (history, output_mode, temperature).

  Raises:
    ProtocolError: naming the first bad field; PromptTooLong when `budget` cannot hold it.
  """
  if not isinstance(body, dict):
    raise ProtocolError("request body must be a JSON object")
  mode = body.get("output_mode")
  if mode not in OUTPUT_MODES:
    raise ProtocolError(f"output_mode must be one of {OUTPUT_MODES}, got {_preview(mode)}")
  temperature = body.get("temperature", 0.7)
  if (
    isinstance(temperature, bool)
    or not isinstance(temperature, int | float)
    or not (0 <= temperature <= 10)
  ):
    raise ProtocolError(f"temperature must be a number in [0, 10], got {_preview(temperature)}")
  history = validate_history(body.get("history"), max_image_bytes=max_image_bytes, budget=budget)
  return history, mode, float(temperature)
