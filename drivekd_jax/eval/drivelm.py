"""DriveLM-nuScenes challenge metrics on its test format (`test_eval.json` + `output.json`).

The test file has the nesting of `v1_1_train_nus.json` (`{scene: {"key_frames": {frame: {"QA":
{perception, prediction, planning, behavior: [{"Q", "A", "tag": [k]}]}}}}}`); a prediction is
`{"id": "<scene>_<frame>_<i>", "answer": str}` with `i` the index of the QA in the frame's
perception + prediction + planning + behavior list (a list of them, or a submission dict with
`"results"`).

Per frame, in that order:

* **Graph gating.** QA #0 is always scored and sets the frame's graph: the ground-truth points
  its prediction matches (`match_points`). Every later QA is scored only if each `x.y` number
  pair of its *question* is a point of the graph; otherwise it is skipped (not scored 0).
* **tag 0 - accuracy**: exact string equality of prediction and ground truth.
* **tag 1 - chatgpt**: a judge rates the answer against the ground truth out of 100 (a system
  message and a user message, as the challenge asks it, at temperature 0.6); the reply is read
  as one number. Failed or unparseable replies are retried, then counted as failures.
* **tag 2 - language**: BLEU-1..4, ROUGE-L, CIDEr (`language.caption_metrics`), as fractions.
* **tag 3 - match**: F1 of the predicted points against the ground-truth points (greedy, L1 <
  16 px) in percent, averaged, then `match = (mean F1 + mean chatgpt of the same items) / 2`.

`final_score = 0.4 * chatgpt/100 + 0.2 * language + 0.2 * match/100 + 0.2 * accuracy` with
`language = (B1 + B2 + B3 + B4)/4/3 + ROUGE_L/3 + CIDEr/30`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

from drivekd_jax.data import records as rec
from drivekd_jax.eval import drivebench, language

STAGES = ("perception", "prediction", "planning", "behavior")
MATCH_THRESHOLD_PX = 16.0
JUDGE_TEMPERATURE = 0.6
JUDGE_SYSTEM = "You are an evaluator who rates my answer based on the correct answer."
JUDGE_PROMPT = (
  "Rate my answer based on the correct answer out of 100, with higher scores indicating that "
  "the answer is closer to the correct answer, and you should be accurate to single digits like "
  "62, 78, 41,etc. Output the number only. This is the correct answer: {GT} This is my answer: "
  "{PRED}"
)
_EPS = 1e-8
_NUMBER = re.compile(r"\d+\.\d+")


@dataclasses.dataclass(frozen=True)
class QA:
  """One test QA with its challenge id, its frame and its position in that frame."""

  id: str
  frame: str
  index: int
  question: str
  answer: str
  tag: tuple[int, ...]


def points(text: str) -> list[tuple[float, float]]:
  """The `x.y` numbers of `text` paired in order; a dangling last number is dropped."""
  numbers = [float(n) for n in _NUMBER.findall(text)]
  return list(zip(numbers[0::2], numbers[1::2]))


def match_points(
  pred: str, truth: str, threshold: float = MATCH_THRESHOLD_PX
) -> tuple[float, list[tuple[float, float]]]:
  """The challenge's point match: F1 (0-1) and the ground-truth points matched.

  Each predicted point in turn takes its nearest remaining ground-truth point by L1 distance: a
  true positive when closer than `threshold` (that point is then used up), else a false
  positive. Precision and recall carry 1e-8 in their denominators, so empty sets give 0.
  """
  remaining = points(truth)
  total = len(remaining)
  matched, true_pos, false_pos = [], 0, 0
  for px, py in points(pred):
    if remaining:
      distances = [abs(px - gx) + abs(py - gy) for gx, gy in remaining]
      nearest = min(range(len(remaining)), key=distances.__getitem__)
      if distances[nearest] < threshold:
        true_pos += 1
        matched.append(remaining.pop(nearest))
        continue
    false_pos += 1
  precision = true_pos / (true_pos + false_pos + _EPS)
  recall = true_pos / (total + _EPS)
  return 2 * precision * recall / (precision + recall + _EPS), matched


def challenge_qas(test_data: Mapping[str, Any], source: str = "test_eval.json") -> list[QA]:
  """The QAs of a DriveLM test file in challenge order, with their ids."""
  out = []
  if not isinstance(test_data, Mapping):
    raise rec.RecordError(f"expected an object, got {type(test_data).__name__}", file=source)
  for scene_token, scene in test_data.items():
    frames = scene.get("key_frames") if isinstance(scene, Mapping) else None
    if not isinstance(frames, Mapping):
      raise rec.RecordError(
        "expected an object", file=source, token=scene_token, field="key_frames"
      )
    for frame_token, frame in frames.items():
      error = rec.RecordErrorFactory(source, None, frame_token)
      qa_groups = rec.require(frame, "QA", Mapping, error=error)
      flat = [qa for stage in STAGES for qa in (qa_groups.get(stage) or [])]
      for i, qa in enumerate(flat):
        field = f"QA[{i}]"
        question = rec.require(qa, "Q", str, error=error, field=f"{field}.Q")
        answer = rec.require(qa, "A", str, error=error, field=f"{field}.A")
        tag = rec.parse_tag(
          rec.require(qa, "tag", (list, int), error=error, field=f"{field}.tag"), error=error
        )
        out.append(
          QA(f"{scene_token}_{frame_token}_{i}", frame_token, i, question, answer, tuple(tag))
        )
  return out


def predictions_by_id(predictions: Any, source: str = "output.json") -> dict[str, str]:
  """`{id: answer}` from a list of `{"id", "answer"}` or a submission dict with `"results"`."""
  if isinstance(predictions, Mapping) and "results" in predictions:
    predictions = predictions["results"]
  if not isinstance(predictions, list):
    raise rec.RecordError("expected a list of {id, answer}", file=source)
  out = {}
  for index, item in enumerate(predictions):
    error = rec.RecordErrorFactory(source, index, None)
    out[rec.require(item, "id", str, error=error)] = rec.require(item, "answer", str, error=error)
  return out


def _parse_number(reply: str) -> float | None:
  try:
    value = float(reply.strip())
  except ValueError:
    return None
  return value if 0.0 <= value <= 100.0 else None


def language_score(metrics: Mapping[str, float]) -> float:
  """The challenge's language term from fractions: mean BLEU/3 + ROUGE_L/3 + CIDEr/30."""
  bleu = sum(metrics[f"Bleu_{n}"] for n in range(1, 5)) / 4
  return bleu / 3 + metrics["ROUGE_L"] / 3 + metrics["CIDEr"] / 30


def final_score(accuracy: float, chatgpt: float, language_metrics: Mapping, match: float) -> float:
  """0.4 chatgpt/100 + 0.2 language + 0.2 match/100 + 0.2 accuracy (accuracy a fraction)."""
  return (
    0.4 * chatgpt / 100
    + 0.2 * language_score(language_metrics)
    + 0.2 * match / 100
    + 0.2 * accuracy
  )


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def evaluate(
  test_data: Mapping[str, Any],
  predictions: Any,
  *,
  judge: drivebench.ChatJudge | None = None,
  attempts: int = 3,
  temperature: float = JUDGE_TEMPERATURE,
  tokenizer: str = "simple",
  source: str = "test_eval.json",
) -> dict[str, Any]:
  """The challenge metrics (module docstring).

  Args:
    test_data: the parsed test file.
    predictions: the parsed `output.json` (or submission dict).
    judge: rates tag-1 and tag-3 answers; None leaves chatgpt, match and the final score null.
    attempts, temperature: judge retries and temperature (the challenge's 0.6).
    tokenizer: for the language metrics.
    source: the test file's name for errors.

  Returns:
    `{"accuracy" (fraction), "chatgpt" (0-100), "language" {Bleu_1.. fractions}, "match"
    (0-100), "match_f1" (0-100), "final_score", "counts", "judge"}`; a metric with no scored
    item is null, and so is the final score then.
  """
  qas = challenge_qas(test_data, source)
  preds = predictions_by_id(predictions)
  missing = [qa.id for qa in qas if qa.id not in preds]
  if missing:
    raise rec.RecordError(
      f"{len(missing)} test QAs have no prediction, e.g. {missing[:3]}", file="predictions"
    )
  scored, skipped = [], 0
  graph: set[tuple[float, float]] = set()
  for qa in qas:
    if qa.index == 0:
      graph = set(match_points(preds[qa.id], qa.answer)[1])
    elif not all(p in graph for p in points(qa.question)):
      skipped += 1
      continue
    scored.append(qa)

  accuracy = _mean([float(preds[qa.id] == qa.answer) for qa in scored if 0 in qa.tag])
  lang_items = [qa for qa in scored if 2 in qa.tag]
  language_metrics = language.caption_metrics(
    [preds[qa.id] for qa in lang_items], [qa.answer for qa in lang_items], tokenizer=tokenizer
  )
  match_items = [qa for qa in scored if 3 in qa.tag]
  match_f1 = _mean([100 * match_points(preds[qa.id], qa.answer)[0] for qa in match_items])

  judged = [qa for qa in scored if 1 in qa.tag or 3 in qa.tag]
  scores: dict[str, float] = {}
  failures = []
  if judge is not None:
    for qa in judged:
      judgment = drivebench.judge_one(
        judge,
        qa.id,
        "DRIVELM",
        JUDGE_PROMPT.format(GT=qa.answer, PRED=preds[qa.id]),
        attempts=attempts,
        temperature=temperature,
        system=JUDGE_SYSTEM,
        parse=_parse_number,
      )
      if judgment.score is None:
        failures.append({"id": qa.id, "error": judgment.error})
      else:
        scores[qa.id] = judgment.score
  chatgpt = _mean([scores[qa.id] for qa in scored if 1 in qa.tag and qa.id in scores])
  match_gpt = _mean([scores[qa.id] for qa in match_items if qa.id in scores])
  match = None if match_f1 is None or match_gpt is None else (match_f1 + match_gpt) / 2
  parts = (accuracy, chatgpt, match)
  final = (
    None
    if None in parts or not language_metrics
    else final_score(accuracy, chatgpt, language_metrics, match)
  )
  return {
    "accuracy": accuracy,
    "chatgpt": chatgpt,
    "language": language_metrics,
    "match": match,
    "match_f1": match_f1,
    "final_score": final,
    "counts": {
      "qas": len(qas),
      "scored": len(scored),
      "skipped_by_graph": skipped,
      "frames": len({qa.frame for qa in qas}),
    },
    "judge": {
      "name": getattr(judge, "name", None),
      "scored": len(scores),
      "failed": len(failures),
      "failures": failures,
    },
  }
