"""A judge backed by an in-process unified model (any `UnifiedModel`, in understanding mode).

Two modes:
  * raw (`structured=False`): the judge's system prompt and user message go to the model as one
    dialogue; its text reply is returned as is (a capable local model answers the JSON rubric).
  * structured (default): built for small models. An image-rubric request becomes one short
    question per evaluation point ("reply with one digit 0-5"), shown with the last `max_images`
    images (the target is last; default 1, for small context windows); the first digit of each
    reply is that point's score. A dynamic-answer request is reduced to its target question and
    the last `max_images` referenced images, and the option letters are read from the reply.
    The judge assembles the official JSON itself. A point whose reply holds no digit is left out;
    if no point has one, the raw replies are returned, which the scorers treat as unparseable
    (retried, then recorded as a failure, never as a score).

Every model call is real. Each call's key is `fold_in(key(seed), hash of the request)`: the same
request gets the same judgement in any run and in any order (reruns and paired runs agree).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence

import jax

from imug_jax.judges.base import DEFAULT_TEMPERATURE, ImagePart, JudgeError, Part, text_of
from imug_jax.judges.prompts import DYNAMIC_ROLE
from imug_jax.models import protocol
from imug_jax.models.protocol import ModelError, UnifiedModel

POINTS_HEADER = "[Evaluation Points List]:"
COMPACT_RUBRIC = "Rate the image for the requirement, 0 (no) to 5 (perfect). One digit."
COMPACT_DYNAMIC = "Answer with option letters only."
TARGET_HEADER = "### TARGET QUESTION"
_POINT = re.compile(r"(?m)^(\d+)\.\s+(.*)$")
_DIGIT = re.compile(r"[0-5]")
_LETTERS = re.compile(r"\b([A-G]+)\b")


class LocalModelJudge:
  """Judge calls answered by `model.respond(history, "text_only", temperature, key)`."""

  def __init__(
    self, model: UnifiedModel, *, structured: bool = True, seed: int = 0, max_images: int = 1
  ):
    self.model, self.structured, self.max_images = model, structured, max_images
    self.name = f"local:{model.name}{'' if structured else ':raw'}"
    self._key = jax.random.key(seed)
    self.calls = 0

  def _ask(self, system: str, images: Sequence[ImagePart], text: str, temperature: float) -> str:
    content = (
      [protocol.text_item(text)]
      if not images
      else [*(protocol.image_item(image.data) for image in images), protocol.text_item(text)]
    )
    history = [
      protocol.message("system", [protocol.text_item(system)]),
      protocol.message("user", content),
    ]
    key = jax.random.fold_in(self._key, _digest(system, images, text))
    self.calls += 1
    try:
      reply = self.model.respond(history, "text_only", temperature, key)
    except ModelError as error:
      raise JudgeError(f"{self.name}: {error}") from error
    return reply.text or ""

  def chat(
    self, system: str, parts: Sequence[Part], *, temperature: float = DEFAULT_TEMPERATURE
  ) -> str:
    images = [p for p in parts if isinstance(p, ImagePart)]
    text = text_of(parts)
    if not self.structured:
      return self._ask(system, images, text, temperature)
    if DYNAMIC_ROLE in system:
      # Small context: the target question and the most recent referenced images only.
      question = text.split(TARGET_HEADER, 1)[-1].split("\n", 1)[-1]
      shown = images[-self.max_images :] if self.max_images > 0 else []
      reply = self._ask(COMPACT_DYNAMIC, shown, question, temperature)
      letters = sorted({letter for run in _LETTERS.findall(reply) for letter in run})
      return json.dumps({"determined_answer": "".join(letters), "reasoning": reply})
    if POINTS_HEADER not in text:
      return self._ask(system, images, text, temperature)
    images = images[-self.max_images :] if self.max_images > 0 else []  # the target is last
    head, points_text = text.split(POINTS_HEADER, 1)
    recap = head.split("[Task Instruction Recap]:", 1)[-1].strip()
    results, replies = [], []
    for number, point in _POINT.findall(points_text):
      question = f"{recap}\nRequirement: {point}\nScore:"
      reply = self._ask(COMPACT_RUBRIC, images, question, temperature)
      replies.append(reply)
      match = _DIGIT.search(reply)
      if match:
        results.append({"point_id": int(number), "score": int(match.group()), "reason": reply})
    if not results:
      return "\n".join(replies)
    return json.dumps({"evaluation_results": results})


def _digest(system: str, images: Sequence[ImagePart], text: str) -> int:
  hasher = hashlib.sha256(system.encode("utf-8"))
  for image in images:
    hasher.update(b"\x01" + image.data)
  hasher.update(b"\x00" + text.encode("utf-8"))
  return int.from_bytes(hasher.digest()[:4], "big") & 0x7FFFFFFF
