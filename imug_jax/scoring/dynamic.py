"""Dynamic MCQ answers: resolve `<DYNAMIC>` / `X+<DYNAMIC>` from what the model generated.

Official `resolve_dynamic_answers.py` context, reproduced exactly. For each referenced turn r
(sorted ascending) the text gets a line

  Turn r: Q: <input[0].text of turn r> | AI Resp: <R>

where R is `[IMAGE_RESPONSE: See Image_k]` if the model saved an image for turn r (the image is
attached as the k-th image), and otherwise the benchmark's gold answer of turn r (not the model's
text; "[Text Response]" if the turn has none). Then:

  ### TARGET QUESTION (Turn t) ###
  Question: <input[0].text of turn t>
  Type: MULTIPLE-CHOICE   (only Botany/natural_growth; SINGLE-CHOICE otherwise)
  Identify the correct options based on the images provided.

The text comes first, the images after it. The resolved answer is the sorted union of the fixed
letters (before `<DYNAMIC>`) and the judge's `determined_answer` letters, joined without a
separator (e.g. "BCD"), which the official MCQ parser then reads as no letter at all.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from imug_jax.data.schema import DYNAMIC, Sample, Turn
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

_LETTER = re.compile(r"[A-G]")


def choice_type(domain: str, subdomain: str) -> str:
  if domain == "Botany" and subdomain == "natural_growth":
    return "MULTIPLE-CHOICE"
  return "SINGLE-CHOICE"


def build_request(
  sample: Sample,
  task: Turn,
  reference_turns: Sequence[int],
  *,
  model_dir: str | Path,
) -> list[Part]:
  """The user message parts (text first, then the referenced images of the model)."""
  lines = ["### REFERENCE CONTEXT PROVIDED ###\n"]
  images: list[Part] = []
  turns = {t.turn: t for t in sample.tasks}
  for reference_turn in sorted(reference_turns):
    reference = turns.get(reference_turn)
    if reference is None:
      continue
    path = layout.find_output_image(model_dir, sample.key, reference_turn)
    if path is not None:
      images.append(ImagePart(path.read_bytes(), "image/png"))
      response = f"[IMAGE_RESPONSE: See Image_{len(images)}]"
    else:
      response = reference.answer if reference.answer is not None else "[Text Response]"
    lines.append(f"Turn {reference_turn}: Q: {reference.instruction} | AI Resp: {response}\n")
  text = (
    "".join(lines)
    + f"\n### TARGET QUESTION (Turn {task.turn}) ###\n"
    + f"Question: {task.instruction}\n"
    + f"Type: {choice_type(sample.domain, sample.subdomain)}\n"
    + "Identify the correct options based on the images provided."
  )
  return [text, *images]


def combine(raw_answer: str, determined_answer: object) -> str:
  """Sorted union of the fixed letters and the judge's letters, no separator (official)."""
  fixed = set(_LETTER.findall(raw_answer.split(DYNAMIC)[0]))
  dynamic = set(_LETTER.findall(str(determined_answer).upper()))
  return "".join(sorted(fixed | dynamic))


def parse_determined_answer(reply: str) -> str:
  """The `determined_answer` field of a reply ("" when absent, as the official code reads it)."""
  return str(outermost_json_object(reply).get("determined_answer", ""))


def resolve_turn(
  judge: Judge,
  system_prompt: str,
  sample: Sample,
  task: Turn,
  reference_turns: Sequence[int],
  *,
  model_dir: str | Path,
  retries: int = 2,
  temperature: float = DEFAULT_TEMPERATURE,
) -> dict:
  """Resolves one dynamic turn; returns {"status", "answer" | "error", "determined", ...}."""
  if not task.is_dynamic:
    raise ValueError(f"sample {sample.key} turn {task.turn}: answer {task.answer!r} is not dynamic")
  parts = build_request(sample, task, reference_turns, model_dir=model_dir)
  record = {
    "raw_answer": task.answer,
    "reference_turns": sorted(reference_turns),
    "judge": judge.name,
  }
  error = ""
  for attempt in range(1, retries + 2):
    try:
      reply = judge.chat(system_prompt, parts, temperature=temperature)
    except JudgeError as failure:
      return {**record, "status": "failed", "error": str(failure)}
    try:
      determined = parse_determined_answer(reply)
    except JudgeReplyError as failure:
      error = str(failure)
      logging.warning(
        "judge %s: unparseable dynamic reply (try %d): %s", judge.name, attempt, error
      )
      continue
    return {
      **record,
      "status": "ok",
      "determined": determined,
      "attempts": attempt,
      "answer": combine(task.answer, determined),
    }
  return {**record, "status": "failed", "error": error, "attempts": retries + 1}
