"""DriveBench scores as the toolkit computes them, and Drive-KD's capability scores.

From an answers file (`answers.JsonlRecords` of release records plus `pred`) this computes:

* **accuracy** of the MCQ items (perception/0, behavior/0) with two parsers: `"official"`, the
  toolkit's `preprocess_answer` (the first of A-D, in that order, found as a word or as
  "option x" in the lower-cased text; so the article "a" anywhere reads as option A, and two
  answers that both parse to nothing count as equal), and `"strict"` (`parse_choice_strict`: a
  `Final: X` or a leading option letter, upper case; an answer with no letter is wrong);
* the **judged score** of every routed item (`rubrics.route`): the filled rubric is sent as one
  user message (empty system message) to a `ChatJudge` at temperature 0; `Total Score: N` is
  parsed; a failed call or an unparseable reply is retried (`attempts` in all) and then
  recorded as a failure, which is counted and listed, never scored. Scored judgments are
  appended to a resumable JSONL file keyed by the record and a hash of (judge, rubric, message),
  so a re-run asks only for what is missing and never reuses a judgment of another prediction;
* **language** metrics (BLEU-1..4, ROUGE-L, CIDEr via `language.caption_metrics`) of the VQA
  items (perception/2, prediction/3, planning/1);
* Drive-KD's **capability scores**: the mean judged score of the items of each capability
  (perception; reasoning = prediction + behavior; planning: `records.capability_of`, our reading
  of the Drive-KD notes) and their average (of all three; null when one is missing);
* the toolkit's own per-task breakdown (`"toolkit"`: perception MCQ/VQA, prediction VQA,
  planning VQA, behavior MCQ, each with `gpt_score` and `accuracy` or `language_metrics`).

Everything is in percent (judge totals are already 0-100; accuracy and the language metrics
are multiplied by 100, CIDEr included). `write_scores` puts them in
`<workdir>/drivebench/<setting>/scores.json`; `write_summary` gathers settings into
`<workdir>/drivebench/summary.json` with the mean over the corruption settings present.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from drivekd_jax.data import records as rec
from drivekd_jax.data.drivebench import CORRUPTIONS
from drivekd_jax.eval import language, rubrics
from drivekd_jax.eval.answers import JsonlRecords, read_jsonl
from drivekd_jax.eval.judge_client import JudgeError

CAPABILITIES = ("perception", "reasoning", "planning")
JUDGE_TEMPERATURE = 0.0
_TOOLKIT_GROUPS = {
  "PERCEPTION_MCQ": ("perception", "MCQ"),
  "PERCEPTION_VQA": ("perception", "VQA"),
  "PREDICTION_VQA": ("prediction", "VQA"),
  "PLANNING_VQA": ("planning", "VQA"),
  "BEHAVIOR_MCQ": ("behavior", "MCQ"),
}
_REQUIRED_TEXT = ("scene_token", "frame_token", "question_type", "question", "answer", "pred")


class ChatJudge(Protocol):
  """What scoring needs of a judge (`judge_client.OpenAIChatJudge` is one): a name, and one
  system + user message in, the reply text out (raising `JudgeError` on failure)."""

  name: str

  def chat(self, system: str, parts: Sequence[str], *, temperature: float) -> str: ...


# ---------------------------------------------------------------------------------------------
# Parsers


def parse_choice_official(text: str) -> str:
  """The toolkit's MCQ parser: the first of A, B, C, D (in that order) present in the lower-cased
  text as a word or as "option x"; "" if none. The word "a" reads as A (kept: it changes
  scores)."""
  text = text.strip().lower()
  for letter in "abcd":
    if re.search(rf"\b({letter}|option {letter})\b", text):
      return letter.upper()
  return ""


_FINAL = re.compile(r"\bFinal\s*:\s*[{(\[]?\s*([A-D])\b", re.IGNORECASE)
_LEADING = re.compile(r"^\W*(?:option\s+)?([A-D])(?:[.):,]|\s|$)", re.IGNORECASE)


def parse_choice_strict(text: str) -> str:
  """A stricter MCQ parser: the letter after `Final:` if present, else an option letter that
  opens the answer (`"B"`, `"B. Turn left."`, `"(C)"`, `"Option D"`); upper case only for a
  bare leading letter, so "a car ..." is not A; "" if neither."""
  match = _FINAL.search(text)
  if match:
    return match.group(1).upper()
  match = _LEADING.match(text.strip())
  if match and (match.group(1).isupper() or text.strip().lower().startswith("option")):
    return match.group(1).upper()
  return ""


# ---------------------------------------------------------------------------------------------
# Judging


@dataclasses.dataclass(frozen=True)
class Judgment:
  """One item's judged outcome: a score, or a failure (score None, error set)."""

  record_id: str
  template: str
  score: float | None
  reply: str | None
  error: str | None
  attempts: int


def judge_one(
  judge: ChatJudge,
  record_id: str,
  template: str,
  message: str,
  *,
  attempts: int = 3,
  temperature: float = JUDGE_TEMPERATURE,
  system: str = "",
  parse: Callable[[str], float | None] = rubrics.parse_total_score,
) -> Judgment:
  """Asks `judge` (system + one user message) up to `attempts` times until `parse` finds a
  score in the reply (DriveBench: `Total Score: N`)."""
  if attempts < 1:
    raise ValueError(f"attempts must be >= 1, got {attempts}")
  error, reply = None, None
  for attempt in range(1, attempts + 1):
    try:
      reply = judge.chat(system, [message], temperature=temperature)
    except JudgeError as e:
      error, reply = f"judge call failed: {e}", None
      continue
    score = parse(reply)
    if score is not None:
      return Judgment(record_id, template, score, reply, None, attempt)
    error = f"reply has no score ({parse.__name__})"
  return Judgment(record_id, template, None, reply, error, attempts)


# ---------------------------------------------------------------------------------------------
# Answers


@dataclasses.dataclass(frozen=True)
class Answer:
  """One validated answers-file record."""

  record_id: str
  item: dict[str, Any]
  tag: list[int]
  pred: str

  @property
  def question_type(self) -> str:
    return self.item["question_type"]

  @property
  def route(self) -> rubrics.Route | None:
    return rubrics.route(self.question_type, self.tag)


def validate_answers(records: Sequence[Mapping[str, Any]], source: str) -> list[Answer]:
  """Checks each record has the fields scoring reads; errors name `source`, record and field."""
  out, seen = [], set()
  for index, record in enumerate(records):
    error = rec.RecordErrorFactory(source, index, record.get("frame_token"))
    record_id = rec.require(record, "record_id", str, error=error)
    if record_id in seen:
      raise error(f"duplicate record_id {record_id!r}", field="record_id")
    seen.add(record_id)
    for name in _REQUIRED_TEXT:
      rec.require(record, name, str, error=error)
    tag = rec.parse_tag(rec.require(record, "tag", (list, int), error=error), error=error)
    out.append(Answer(record_id, dict(record), tag, record["pred"]))
  return out


def _mean(values: Sequence[float]) -> float | None:
  return sum(values) / len(values) if values else None


def _percent(value: float | None) -> float | None:
  return None if value is None else 100.0 * value


def _language_percent(pairs: Sequence[tuple[str, str]], tokenizer: str) -> dict[str, Any]:
  metrics = language.caption_metrics(
    [p for p, _ in pairs], [g for _, g in pairs], tokenizer=tokenizer
  )
  return {**{k: 100.0 * v for k, v in metrics.items()}, "items": len(pairs)}


def _accuracy(answers: Sequence[Answer]) -> dict[str, Any]:
  official = [
    parse_choice_official(a.item["answer"]) == parse_choice_official(a.pred) for a in answers
  ]
  strict = []
  for a in answers:
    truth = parse_choice_strict(a.item["answer"])
    strict.append(bool(truth) and truth == parse_choice_strict(a.pred))
  return {
    "official": _percent(_mean(official)),
    "strict": _percent(_mean(strict)),
    "items": len(answers),
  }


def score_answers(
  answers: Sequence[Answer],
  *,
  judge: ChatJudge | None = None,
  templates: Mapping[str, str] | None = None,
  rubric_name: str = "ours",
  descriptions: Mapping[str, Any] | None = None,
  judged_path: str | os.PathLike | None = None,
  attempts: int = 3,
  temperature: float = JUDGE_TEMPERATURE,
  workers: int | None = None,
  tokenizer: str = "simple",
) -> dict[str, Any]:
  """The scores of one setting's answers (module docstring); `judge=None` skips judging.

  Args:
    answers: from `validate_answers` (or `load_answers`).
    judge: the judge; None leaves the judged scores null.
    templates: rubric name -> template (default `rubrics.OUR_TEMPLATES`).
    rubric_name: what `templates` are ("ours", or "official:<dir>"), recorded with every
      judgment.
    descriptions: `visual_description.json` content for the `{DESC}` of PERCEPTION_MCQ and
      PLANNING_VQA; without it (or when an item's object is missing) DESC is "None" and the
      item is counted in `judge.without_description`.
    judged_path: resumable JSONL of the scored judgments; a re-run reuses those asked with the
      same message (same prediction, rubric and judge) and asks the others.
    attempts: judge calls per item before it is recorded as failed.
    temperature: judge sampling temperature (the toolkit's 0).
    workers: items judged concurrently (default: the judge's `concurrency`, else 1).
    tokenizer: for the language metrics ("simple" or "ptb").

  Returns:
    The scores dict written by `write_scores`.
  """
  templates = dict(templates or rubrics.OUR_TEMPLATES)
  routed = [a for a in answers if a.route is not None]
  counts = collections.Counter(rubrics.route_key(a.question_type, a.tag) for a in answers)
  routed_keys = {rubrics.route_key(a.question_type, a.tag) for a in routed}
  scores: dict[str, Any] = {
    "items": len(answers),
    "routed": {k: n for k, n in sorted(counts.items()) if k in routed_keys},
    "skipped": {k: n for k, n in sorted(counts.items()) if k not in routed_keys},
  }

  mcq = [a for a in routed if a.route.accuracy]
  vqa = [a for a in routed if a.route.language]
  scores["accuracy"] = _accuracy(mcq)
  scores["language"] = _language_percent([(a.pred, a.item["answer"]) for a in vqa], tokenizer)

  judgments = (
    _judge_all(
      routed,
      judge,
      templates,
      rubric_name,
      descriptions,
      judged_path,
      attempts,
      temperature,
      workers,
    )
    if judge is not None
    else {}
  )
  without_description = sum(1 for j in judgments.values() if j.get("without_description"))
  scored = {rid: j["score"] for rid, j in judgments.items() if j["score"] is not None}
  failures = [
    {"record_id": rid, "error": j["error"]} for rid, j in judgments.items() if j["score"] is None
  ]
  for capability in CAPABILITIES:
    values = [
      scored[a.record_id]
      for a in routed
      if a.record_id in scored and rec.capability_of(a.question_type) == capability
    ]
    scores[capability] = _mean(values)
  present = [scores[c] for c in CAPABILITIES]
  scores["average"] = None if None in present else sum(present) / len(present)
  scores["judge"] = {
    "name": getattr(judge, "name", None),
    "rubric": rubric_name if judge is not None else None,
    "temperature": temperature if judge is not None else None,
    "attempts": attempts,
    "scored": len(scored),
    "failed": len(failures),
    "failures": failures,
    "without_description": without_description,
  }
  toolkit: dict[str, dict[str, Any]] = {}
  for template, (task, kind) in _TOOLKIT_GROUPS.items():
    group = [a for a in routed if a.route.template == template]
    if not group:
      continue
    entry = {
      "gpt_score": _mean([scored[a.record_id] for a in group if a.record_id in scored]),
      "items": len(group),
    }
    if kind == "MCQ":
      entry["accuracy"] = _accuracy(group)["official"]
    else:
      entry["language_metrics"] = _language_percent(
        [(a.pred, a.item["answer"]) for a in group], tokenizer
      )
    toolkit.setdefault(task, {})[kind] = entry
  scores["toolkit"] = toolkit
  return scores


def _judge_all(
  routed, judge, templates, rubric_name, descriptions, judged_path, attempts, temperature, workers
) -> dict[str, dict[str, Any]]:
  """Judgments by record id: those of `judged_path` asked with the same message of the same
  judge and rubric (key: record id + hash of the three), plus the newly asked ones."""
  jobs = []
  for answer in routed:
    desc, missing = None, False
    if answer.route.needs_description:
      try:
        desc = rubrics.visual_description(answer.item, descriptions)
      except KeyError:
        missing = True
    message = rubrics.judge_message(
      templates[answer.route.template], answer.item, answer.pred, desc
    )
    digest = hashlib.sha256(f"{judge.name}\n{rubric_name}\n{message}".encode()).hexdigest()
    jobs.append((answer, message, missing, f"{answer.record_id}:{digest[:16]}"))
  done: dict[str, dict[str, Any]] = {}
  log = None
  if judged_path is not None:
    if Path(judged_path).exists():
      done = {old["key"]: old for old in read_jsonl(judged_path, key_field="key")}
    log = JsonlRecords(judged_path, key_field="key")
  results = {answer.record_id: done[key] for answer, _, _, key in jobs if key in done}
  todo = [job for job in jobs if job[3] not in done]

  def ask(job) -> tuple[Judgment, bool, str]:
    answer, message, missing, key = job
    judgment = judge_one(
      judge,
      answer.record_id,
      answer.route.template,
      message,
      attempts=attempts,
      temperature=temperature,
    )
    return judgment, missing, key

  workers = workers or getattr(judge, "concurrency", 1)
  try:
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
      for judgment, missing, key in pool.map(ask, todo):
        entry = {
          "key": key,
          "record_id": judgment.record_id,
          "template": judgment.template,
          "score": judgment.score,
          "reply": judgment.reply,
          "error": judgment.error,
          "attempts": judgment.attempts,
          "judge": judge.name,
          "rubric": rubric_name,
          "without_description": missing,
        }
        results[judgment.record_id] = entry
        if log is not None and judgment.score is not None:
          log.append(entry)
  finally:
    if log is not None:
      log.close()
  return results


# ---------------------------------------------------------------------------------------------
# Files


def load_answers(path: str | os.PathLike) -> list[Answer]:
  """The validated records of an answers JSONL file."""
  return validate_answers(read_jsonl(path), str(path))


def load_descriptions(path: str | os.PathLike) -> dict[str, Any]:
  """`visual_description.json`: `{scene_token: {"key_frames": {frame_token: {...}}}}`."""
  data = rec.load_json(path)
  if not isinstance(data, dict):
    raise rec.RecordError(f"expected an object, got {type(data).__name__}", file=path)
  return data


def scores_path(workdir: str | os.PathLike, setting: str) -> Path:
  """`<workdir>/drivebench/<setting>/scores.json`."""
  return Path(workdir) / "drivebench" / setting / "scores.json"


def _write_json(path: Path, data: Any) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(data, indent=2, sort_keys=True), encoding="utf-8")
  os.replace(tmp, path)
  return path


def judged_path(workdir: str | os.PathLike, setting: str) -> Path:
  """`<workdir>/drivebench/<setting>/judged.jsonl`."""
  return Path(workdir) / "drivebench" / setting / "judged.jsonl"


def rubric_templates(official_templates_dir: str | os.PathLike | None) -> tuple[dict, str]:
  """(templates, rubric name): ours, or the official ones read from a toolkit checkout."""
  if not official_templates_dir:
    return dict(rubrics.OUR_TEMPLATES), "ours"
  path = Path(official_templates_dir)
  return rubrics.official_templates(path), f"official:{path.name}"


def score_setting(
  workdir: str | os.PathLike, setting: str, **options: Any
) -> tuple[dict[str, Any], Path]:
  """Scores `answers_path(workdir, setting)` (judgments kept in `judged_path`) and writes
  `scores_path`; `options` are `score_answers`'s. Returns (scores, path written)."""
  from drivekd_jax.eval.answers import answers_path

  answers = load_answers(answers_path(workdir, setting))
  scores = score_answers(answers, judged_path=judged_path(workdir, setting), **options)
  return scores, write_scores(workdir, setting, scores)


def write_scores(workdir: str | os.PathLike, setting: str, scores: Mapping[str, Any]) -> Path:
  """Writes `scores` (from `score_answers`) with its setting to `scores_path`."""
  return _write_json(scores_path(workdir, setting), {**scores, "setting": setting})


SUMMARY_KEYS = ("perception", "reasoning", "planning", "average")


def summarize(scores_by_setting: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  """One row per setting (capability scores, accuracies, judge counts) and the mean over the
  corruption settings present (`drivebench.CORRUPTIONS`)."""
  rows = {}
  for setting, scores in scores_by_setting.items():
    rows[setting] = {
      **{k: scores.get(k) for k in SUMMARY_KEYS},
      "accuracy_official": scores["accuracy"]["official"],
      "accuracy_strict": scores["accuracy"]["strict"],
      "judge_scored": scores["judge"]["scored"],
      "judge_failed": scores["judge"]["failed"],
    }
  corrupted = [rows[s] for s in rows if s in CORRUPTIONS]
  mean = None
  if corrupted:
    mean = {}
    for key in (*SUMMARY_KEYS, "accuracy_official", "accuracy_strict"):
      values = [row[key] for row in corrupted if row[key] is not None]
      mean[key] = _mean(values)
    mean["settings"] = len(corrupted)
  return {"settings": rows, "corruption_mean": mean}


def write_summary(workdir: str | os.PathLike, settings: Sequence[str]) -> Path:
  """Reads each setting's scores.json and writes `<workdir>/drivebench/summary.json`."""
  scores = {}
  for setting in settings:
    path = scores_path(workdir, setting)
    data = rec.load_json(path)
    if not isinstance(data, dict):
      raise rec.RecordError("expected a JSON object", file=path)
    scores[setting] = data
  return _write_json(Path(workdir) / "drivebench" / "summary.json", summarize(scores))
