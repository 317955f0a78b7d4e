"""Test-time scaling wrappers: each is itself a `UnifiedModel` around any `UnifiedModel`.

The paper names the three strategies but not their procedures (docs/imug_protocol.md §3); these
are our implementations. Text turns pass straight through; only image turns are changed. The
dialogue history the rollout keeps is unchanged: the wrapper's internal exchanges (plan,
verification questions, rejected candidates) are not appended, only the final image.

* `ChainOfThought`: the model first writes a plan in text (understanding mode), then generates
  the image with the plan in context.
* `SelfVerification`: generate, ask the model in understanding mode whether the image fulfils the
  instruction (YES/NO), regenerate on NO, up to `rounds` extra generations.
* `BestOfN`: N candidates in one batched call when the model offers `respond_batch` with a batch
  of N (else N calls with split keys), the best under a verifier (the model itself or a judge).

All randomness comes from the `rng` key passed to `respond` (split per internal call).
"""

from __future__ import annotations

import abc
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from imug_jax.models import protocol
from imug_jax.models.protocol import Message, Response, UnifiedModel
from imug_jax.tts.verifiers import SelfVerifier, Verifier, with_candidate

# Short on purpose: small in-process models have small context buckets.
PLAN_PROMPT = "First plan the image: what objects, colours, counts and positions must it show?"
DRAW_PROMPT = "Now draw the image following your plan."
CHECK_PROMPT = "Does your image follow the instruction exactly? Answer YES or NO."
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def split(rng: Any, count: int) -> list[Any]:
  """`count` independent keys from `rng` (None stays None for models that ignore keys)."""
  if rng is None:
    return [None] * count
  return list(jax.random.split(rng, count))


class _Wrapper(abc.ABC):
  """A `UnifiedModel` that passes text turns through and changes how image turns are made."""

  suffix = "tts"

  def __init__(self, model: UnifiedModel):
    self.model = model
    self.name = f"{model.name}+{self.suffix}"
    self.model_calls = 0

  def _call(self, history, mode, temperature, rng) -> Response:
    self.model_calls += 1
    return self.model.respond(history, mode, temperature, rng)

  def respond(
    self, history: Sequence[Message], output_mode: str, temperature: float, rng: Any = None
  ) -> Response:
    if output_mode != "image_only":
      return self._call(history, output_mode, temperature, rng)
    return self._image(list(history), temperature, rng)

  @abc.abstractmethod
  def _image(self, history: list[Message], temperature: float, rng: Any) -> Response:
    """The response to an image turn, `history` ending with its user message."""


class ChainOfThought(_Wrapper):
  """Plan in text first, then draw with the plan in context."""

  suffix = "cot"

  def __init__(
    self,
    model: UnifiedModel,
    *,
    plan_prompt: str = PLAN_PROMPT,
    draw_prompt: str = DRAW_PROMPT,
    plan_temperature: float | None = None,
  ):
    super().__init__(model)
    self.plan_prompt, self.draw_prompt = plan_prompt, draw_prompt
    self.plan_temperature = plan_temperature

  def plan_request(self, history: Sequence[Message]) -> list[Message]:
    """history (ending with the image turn's user message) + the plan question."""
    return [*history, protocol.message("user", [protocol.text_item(self.plan_prompt)])]

  def draw_request(self, history: Sequence[Message], plan: str) -> list[Message]:
    """The plan request + the plan as the assistant's answer + the draw instruction."""
    return [
      *self.plan_request(history),
      protocol.message("assistant", [protocol.text_item(plan)]),
      protocol.message("user", [protocol.text_item(self.draw_prompt)]),
    ]

  def plan(self, history: Sequence[Message], temperature: float, rng: Any) -> str:
    """The model's plan for the image turn `history` ends with."""
    plan_temperature = temperature if self.plan_temperature is None else self.plan_temperature
    return self._call(self.plan_request(history), "text_only", plan_temperature, rng).text or ""

  def _image(self, history, temperature, rng):
    plan_key, draw_key = split(rng, 2)
    plan = self.plan(history, temperature, plan_key)
    self.last_plan = plan
    return self._call(self.draw_request(history, plan), "image_only", temperature, draw_key)


class SelfVerification(_Wrapper):
  """Generate, self-check (YES/NO), regenerate on NO; at most `rounds` regenerations."""

  suffix = "verify"

  def __init__(
    self,
    model: UnifiedModel,
    *,
    rounds: int = 2,
    check_prompt: str = CHECK_PROMPT,
    check_temperature: float = 0.0,
  ):
    super().__init__(model)
    if rounds < 0:
      raise ValueError(f"rounds must be >= 0, got {rounds}")
    self.rounds, self.check_prompt, self.check_temperature = rounds, check_prompt, check_temperature
    self.regenerations = 0

  def accepts(self, history, candidate: bytes, rng) -> bool:
    reply = self._call(
      with_candidate(history, candidate, self.check_prompt),
      "text_only",
      self.check_temperature,
      rng,
    )
    match = _YES_NO.search(reply.text or "")
    return bool(match) and match.group(1).lower() == "yes"

  def _image(self, history, temperature, rng):
    keys = split(rng, 2 * (self.rounds + 1))
    response = None
    for attempt in range(self.rounds + 1):
      if attempt:
        self.regenerations += 1
      response = self._call(history, "image_only", temperature, keys[2 * attempt])
      if attempt == self.rounds or self.accepts(history, response.image, keys[2 * attempt + 1]):
        break
    return response


class BestOfN(_Wrapper):
  """N candidates (batched when possible), the best under `verifier` (default: the model)."""

  suffix = "bon"

  def __init__(self, model: UnifiedModel, *, n: int = 4, verifier: Verifier | None = None):
    super().__init__(model)
    if n < 1:
      raise ValueError(f"n must be >= 1, got {n}")
    self.n = n
    self.verifier = verifier if verifier is not None else SelfVerifier(model)
    kind = "self" if isinstance(self.verifier, SelfVerifier) else "judge"
    self.suffix = f"bon{n}-{kind}"
    self.name = f"{model.name}+{self.suffix}"
    self.batched_calls = 0
    self.last_scores: list[float] = []

  def candidates(self, history, temperature, rng) -> list[Response]:
    """N image candidates. A model with `respond_batch(history, mode, temperature, rng)` (e.g. the
    tiny model built with `num_samples=N`) decodes them as one batch per call; calls repeat with
    fresh keys only if its batch is smaller than N. Other models get N calls with split keys."""
    batch = getattr(self.model, "respond_batch", None)
    if batch is None:
      return [self._call(history, "image_only", temperature, key) for key in split(rng, self.n)]
    responses: list[Response] = []
    key = rng
    while len(responses) < self.n:
      key, call_key = split(key, 2) if key is not None else (None, None)
      self.batched_calls += 1
      self.model_calls += 1
      got = list(batch(history, "image_only", temperature, call_key))
      if not got:
        raise ValueError(f"{self.model.name}.respond_batch returned no answer")
      responses += got
    return responses[: self.n]

  def choose(self, history, temperature, rng) -> tuple[list[Response], list[float], int]:
    """(N candidates, their verifier scores, the index picked: the best, ties to the first)."""
    sample_key, verify_key = split(rng, 2)
    candidates = self.candidates(history, temperature, sample_key)
    keys = split(verify_key, self.n)
    scores = [self.verifier.score(history, c.image, k) for c, k in zip(candidates, keys)]
    return candidates, scores, int(np.argmax(scores))

  def _image(self, history, temperature, rng):
    candidates, self.last_scores, best = self.choose(history, temperature, rng)
    return candidates[best]


STRATEGIES = {"cot": ChainOfThought, "verify": SelfVerification, "bon": BestOfN}


def wrap(model: UnifiedModel, strategy: str, **kwargs) -> UnifiedModel:
  """`wrap(model, "cot" | "verify" | "bon", **options)`."""
  if strategy not in STRATEGIES:
    raise ValueError(
      f"unknown test-time scaling strategy {strategy!r}; known: {sorted(STRATEGIES)}"
    )
  return STRATEGIES[strategy](model, **kwargs)
