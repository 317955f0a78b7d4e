"""What every judge shares: the message parts, the protocol, errors and reply parsing."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

# The message parts, the transport error and the default temperature are the project-wide judge
# client's (drivekd_jax.eval.judge_client), so that every judge speaks the same types.
from drivekd_jax.eval.judge_client import DEFAULT_TEMPERATURE, ImagePart, JudgeError, Part

__all__ = [
  "DEFAULT_TEMPERATURE",
  "ImagePart",
  "Judge",
  "JudgeError",
  "JudgeReplyError",
  "Part",
  "images_of",
  "outermost_json_object",
  "text_of",
]


class JudgeReplyError(ValueError):
  """A judge replied, but the reply does not hold the JSON object that was asked for."""


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
