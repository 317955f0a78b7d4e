"""Judge scoring of image turns: an integer 0-5 per evaluation point (official `score_image.py`).

The user message holds the reference images of `image_references.jsonl` for the turn, in listed
order (an "input" reference is the first existing input image of that turn, an "output" reference
is the evaluated model's own image of that turn), then the target image last, then the text:

  Sequence description:
  - Image_1 (Turn 1 input image)
  - Image_2 (Target Image)

  [Task Instruction Recap]:
  <input[0].text of the turn>

  [Evaluation Points List]:
  1. <point 1>
  ...

  Please output JSON results.

Parity detail kept: a reference whose file is missing is skipped but keeps its number, so the
labels follow the reference list, while the target is numbered after the images actually shown.
The reply's outermost {...} is parsed; the turn score is mean(returned point scores) / 5 (the
summary shows it x20). A reply that cannot be parsed is asked again up to `retries` times and
then recorded as a failure, never as a score.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from imug_jax.data.schema import ImageRef, Sample, Turn
from imug_jax.judges.base import (
  DEFAULT_TEMPERATURE,
  ImagePart,
  Judge,
  JudgeError,
  JudgeReplyError,
  Part,
  outermost_json_object,
)
from imug_jax.scoring import layout


@dataclasses.dataclass(frozen=True)
class PointScore:
  point_id: int
  score: int
  reason: str = ""


@dataclasses.dataclass(frozen=True)
class JudgeOutcome:
  """Points from a parsed reply, or `error` (points empty) after the retries ran out."""

  points: tuple[PointScore, ...]
  attempts: int
  error: str | None = None
  reply: str = ""


def build_request(
  sample: Sample,
  task: Turn,
  references: Sequence[ImageRef],
  *,
  model_dir: str | Path,
  images_dir: str | Path,
  result: Sample | None,
) -> tuple[list[Part], Path | None]:
  """Returns (user message parts: images then text, target image path or None)."""
  shown: list[tuple[Path, str]] = []
  for index, reference in enumerate(references):
    ref_task = sample.task(reference.ref_turn)
    if reference.ref_type == "input":
      path = layout.find_input_image(images_dir, ref_task.input_images)
    else:
      path = layout.find_output_image(model_dir, sample.key, reference.ref_turn, result)
    if path is not None:
      label = f"Image_{index + 1} (Turn {reference.ref_turn} {reference.ref_type} image)"
      shown.append((path, label))
  target = layout.find_output_image(model_dir, sample.key, task.turn, result)
  if target is not None:
    shown.append((target, f"Image_{len(shown) + 1} (Target Image)"))
  points = "\n".join(f"{i + 1}. {point}" for i, point in enumerate(task.evaluation_points or ()))
  description = "Sequence description:\n" + "".join(f"- {label}\n" for _, label in shown)
  text = (
    f"{description}\n[Task Instruction Recap]:\n{task.instruction}\n\n"
    f"[Evaluation Points List]:\n{points}\n\nPlease output JSON results."
  )
  parts: list[Part] = [ImagePart.from_path(path) for path, _ in shown]
  parts.append(text)
  return parts, target


def parse_point_scores(reply: str) -> tuple[PointScore, ...]:
  """Reads `evaluation_results` from a reply; integer scores 0-5 (numeric strings accepted).

  Raises:
    JudgeReplyError: no JSON object, no non-empty `evaluation_results` list, or a point whose
      id or score is not an integer in range.
  """
  payload = outermost_json_object(reply)
  results = payload.get("evaluation_results")
  if not isinstance(results, list) or not results:
    raise JudgeReplyError(f"reply has no evaluation_results list: {reply[:200]!r}")
  points = []
  for index, entry in enumerate(results):
    if not isinstance(entry, dict):
      raise JudgeReplyError(f"evaluation_results[{index}] is not an object: {entry!r}")
    point_id = _as_int(entry.get("point_id"), f"evaluation_results[{index}].point_id")
    score = _as_int(entry.get("score"), f"evaluation_results[{index}].score")
    if not 0 <= score <= 5:
      raise JudgeReplyError(f"evaluation_results[{index}].score {score} is outside 0..5")
    points.append(PointScore(point_id, score, str(entry.get("reason", ""))))
  return tuple(points)


def ask_for_points(
  judge: Judge,
  system: str,
  parts: Sequence[Part],
  *,
  retries: int = 2,
  temperature: float = DEFAULT_TEMPERATURE,
) -> JudgeOutcome:
  """Calls the judge until a reply parses (1 + `retries` tries); transport errors propagate."""
  last_error, reply = "", ""
  for attempt in range(1, retries + 2):
    reply = judge.chat(system, parts, temperature=temperature)
    try:
      return JudgeOutcome(parse_point_scores(reply), attempt, None, reply)
    except JudgeReplyError as error:
      last_error = str(error)
      logging.warning("judge %s: unparseable reply (try %d): %s", judge.name, attempt, error)
  return JudgeOutcome((), retries + 1, last_error, reply)


def score_turn(
  judge: Judge,
  system_prompt: str,
  sample: Sample,
  task: Turn,
  references: Sequence[ImageRef],
  *,
  model_dir: str | Path,
  images_dir: str | Path,
  result: Sample | None,
  retries: int = 2,
  missing_output: str = "zero",
) -> dict:
  """Scores one image turn with the judge and returns its record (see `pipeline`).

  `missing_output`: what to do when the model has no image for this turn. "zero" (default, ours)
  records every point as 0 without calling the judge; "judge" sends the request without a target
  as the official script does (its strict mode would instead abort the run).
  """
  if missing_output not in ("zero", "judge"):
    raise ValueError(f"missing_output must be 'zero' or 'judge', got {missing_output!r}")
  parts, target = build_request(
    sample, task, references, model_dir=model_dir, images_dir=images_dir, result=result
  )
  record = {"method": "judge", "judge": judge.name, "missing_output": target is None}
  if target is None and missing_output == "zero":
    num_points = len(task.evaluation_points or ())
    points = [
      {"point_id": i + 1, "score": 0, "reason": "no image output"} for i in range(num_points)
    ]
    return {**record, "status": "ok", "points": points}
  try:
    outcome = ask_for_points(judge, system_prompt, parts, retries=retries)
  except JudgeError as error:
    return {**record, "status": "failed", "error": str(error), "points": []}
  if outcome.error is not None:
    return {
      **record,
      "status": "failed",
      "error": outcome.error,
      "points": [],
      "reply": outcome.reply,
      "attempts": outcome.attempts,
    }
  points = [dataclasses.asdict(point) for point in outcome.points]
  return {**record, "status": "ok", "points": points, "attempts": outcome.attempts}


def _as_int(value: object, field: str) -> int:
  if isinstance(value, bool):
    raise JudgeReplyError(f"{field} is a boolean")
  if isinstance(value, int):
    return value
  if isinstance(value, float) and value.is_integer():
    return int(value)
  if isinstance(value, str) and value.strip().lstrip("-").isdigit():
    return int(value.strip())
  raise JudgeReplyError(f"{field} must be an integer, got {value!r}")
