"""The smoke-test judge: seeded random replies in the official smoke-test format.

Image requests get one score per evaluation point drawn from 0..5 with weights (1, 2, 4, 5, 4, 2);
dynamic requests (system prompt naming the Dynamic Answer Determination Assistant) get one random
letter A-G. Each reply is a pure function of (seed, request), like the official smoke test: the
generator is seeded with seed XOR the first 8 bytes of SHA-256 of the request.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence

from imug_jax.judges.base import DEFAULT_TEMPERATURE, ImagePart, Part, text_of
from imug_jax.judges.prompts import DYNAMIC_ROLE

SCORE_WEIGHTS = (1, 2, 4, 5, 4, 2)
_POINT_LINE = re.compile(r"(?m)^\d+\.\s")


class RandomJudge:
  """Seeded random judge (default seed 2026, as the official `--smoke-test`)."""

  def __init__(self, seed: int = 2026):
    self.seed = seed
    self.name = f"random:{seed}"
    self.calls = 0

  def chat(
    self, system: str, parts: Sequence[Part], *, temperature: float = DEFAULT_TEMPERATURE
  ) -> str:
    self.calls += 1
    generator = random.Random(self.seed ^ _request_digest(system, parts, temperature))
    if DYNAMIC_ROLE in system:
      return json.dumps(
        {
          "determined_answer": generator.choice("ABCDEFG"),
          "reasoning": "Random smoke-test response.",
        }
      )
    points_text = text_of(parts).split("[Evaluation Points List]:", 1)[-1]
    num_points = len(_POINT_LINE.findall(points_text))
    results = [
      {"point_id": index + 1, "score": generator.choices(range(6), weights=SCORE_WEIGHTS, k=1)[0]}
      for index in range(num_points)
    ]
    return json.dumps({"evaluation_results": results})


def _request_digest(system: str, parts: Sequence[Part], temperature: float) -> int:
  hasher = hashlib.sha256()
  hasher.update(json.dumps([system, temperature]).encode("utf-8"))
  for part in parts:
    if isinstance(part, ImagePart):
      hasher.update(b"\x01" + part.data)
    else:
      hasher.update(b"\x00" + part.encode("utf-8"))
  return int.from_bytes(hasher.digest()[:8], "big")
