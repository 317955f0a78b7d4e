"""Verifiers for test-time scaling: score a candidate image for the current user turn.

* `SelfVerifier`: the unified model itself, in understanding mode, rates the candidate 0-5
  (reads the first digit of its reply; no digit counts as 0).
* `JudgeVerifier`: any `Judge` (the benchmark judge, a local model judge...) scores the candidate
  with the image rubric, the instruction of the turn as the single evaluation point, and the
  images of that user turn as references. It never sees the benchmark's evaluation points.

A verifier that fails (model or judge error, unparseable reply) scores the candidate 0 and logs a
warning, so best-of-N goes on with the other candidates.
"""

from __future__ import annotations

import base64
import logging
import re
from collections.abc import Sequence
from typing import Any, Protocol

from imug_jax.judges.base import ImagePart, Judge, JudgeError
from imug_jax.judges.prompts import PromptSet
from imug_jax.models import protocol
from imug_jax.models.protocol import Message, ModelError, UnifiedModel
from imug_jax.scoring import image_points

RATE_PROMPT = "How well does your image follow the instruction? One digit, 0 to 5."
_DIGIT = re.compile(r"[0-5]")


class Verifier(Protocol):
  name: str

  def score(self, history: Sequence[Message], candidate: bytes, rng: Any = None) -> float:
    """A score in [0, 5] for `candidate` (PNG bytes) as the answer to history's last user turn."""
    ...


def last_user_turn(history: Sequence[Message]) -> Message:
  if not history or history[-1].get("role") != "user":
    raise ValueError("history must end with the user turn being answered")
  return history[-1]


def instruction_text(history: Sequence[Message]) -> str:
  items = last_user_turn(history)["content"]
  return "\n".join(item["text"] for item in items if item.get("type") == "text")


def with_candidate(history: Sequence[Message], candidate: bytes, question: str) -> list[Message]:
  """history + the candidate as the assistant's answer + a follow-up user question."""
  return [
    *history,
    protocol.message("assistant", [protocol.image_item(candidate)]),
    protocol.message("user", [protocol.text_item(question)]),
  ]


class SelfVerifier:
  """The model rates its own candidate (understanding mode)."""

  def __init__(self, model: UnifiedModel, *, temperature: float = 0.0, prompt: str = RATE_PROMPT):
    self.model, self.temperature, self.prompt = model, temperature, prompt
    self.name = f"self:{model.name}"

  def score(self, history: Sequence[Message], candidate: bytes, rng: Any = None) -> float:
    try:
      reply = self.model.respond(
        with_candidate(history, candidate, self.prompt), "text_only", self.temperature, rng
      )
    except ModelError as error:
      logging.warning("verifier %s failed, candidate scored 0: %s", self.name, error)
      return 0.0
    match = _DIGIT.search(reply.text or "")
    return float(match.group()) if match else 0.0


class JudgeVerifier:
  """A judge scores the candidate against the turn's instruction (one evaluation point)."""

  def __init__(self, judge: Judge, *, prompts: PromptSet | None = None, retries: int = 1):
    self.judge, self.prompts, self.retries = judge, prompts or PromptSet.ours(), retries
    self.name = f"judge:{judge.name}"

  def score(self, history: Sequence[Message], candidate: bytes, rng: Any = None) -> float:
    del rng
    references = [
      ImagePart(base64.b64decode(item["image"]), _media_type(item["image"]))
      for item in last_user_turn(history)["content"]
      if item.get("type") == "image"
    ]
    labels = [f"- Image_{i + 1} (Turn input image)\n" for i in range(len(references))]
    labels.append(f"- Image_{len(references) + 1} (Target Image)\n")
    instruction = instruction_text(history)
    text = (
      "Sequence description:\n"
      + "".join(labels)
      + f"\n[Task Instruction Recap]:\n{instruction}\n\n"
      f"[Evaluation Points List]:\n1. The image carries out the instruction: {instruction}\n\n"
      "Please output JSON results."
    )
    parts = [*references, ImagePart(candidate, "image/png"), text]
    try:
      outcome = image_points.ask_for_points(
        self.judge, self.prompts.image, parts, retries=self.retries
      )
    except JudgeError as error:
      logging.warning("verifier %s failed, candidate scored 0: %s", self.name, error)
      return 0.0
    if outcome.error is not None or not outcome.points:
      logging.warning(
        "verifier %s: no usable points, candidate scored 0: %s", self.name, outcome.error
      )
      return 0.0
    return sum(p.score for p in outcome.points) / len(outcome.points)


def _media_type(encoded: str) -> str:
  return "image/png" if encoded.startswith("iVBOR") else "image/jpeg"
