"""Per-capability accuracy of held-out answers, and the results files of a run.

A held-out answer (a row of `eval/answers.jsonl`, written by `eval.heldout.evaluate`) is correct
when:

- the reference opens with an option letter (a multiple-choice question, `heldout.mcq_letter`):
  the prediction opens with the same letter;
- otherwise (a short open answer, e.g. the synthetic planning "Stop."): the prediction equals
  the reference after lower-casing, dropping punctuation and collapsing spaces.

So this scores the synthetic "grounded" question set exactly (`drivekd_jax.data.synthetic`);
long free-form answers (DriveLM's sentences) almost never match exactly and are the judge's job.

`write_results(folder, rows, ...)` writes `results.json` (`{"rows": [{"model", "perception",
"reasoning", "planning", "average", ...}], ...}`) and `results.md` (the same rows as a table).
Accuracies are fractions in [0, 1]; a capability without questions is None and left out of the
average.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from drivekd_jax.eval.heldout import mcq_letter

CAPABILITIES = ("perception", "reasoning", "planning")
_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_answer(text: str) -> str:
  """Lower case, punctuation dropped, single spaces: "Keep going." -> "keep going"."""
  return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def is_correct(reference: str, prediction: str) -> bool:
  """Letter match for multiple-choice references, normalised exact match otherwise."""
  gold = mcq_letter(reference)
  if gold is not None:
    return mcq_letter(prediction) == gold
  return normalize_answer(prediction) == normalize_answer(reference)


def read_answers(path: str) -> list[dict]:
  """The rows of an `answers.jsonl` (each with capability, reference, prediction)."""
  rows = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      row = json.loads(line)
      for field in ("capability", "reference", "prediction"):
        if field not in row:
          raise ValueError(f"{path}: line {number} has no field {field!r}")
      rows.append(row)
  return rows


def correctness(rows: Iterable[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """{capability: bool [questions]} of the answer rows (capabilities without rows absent)."""
  out: dict[str, list[bool]] = {}
  for row in rows:
    out.setdefault(row["capability"], []).append(is_correct(row["reference"], row["prediction"]))
  return {k: np.asarray(v, bool) for k, v in out.items()}


def accuracy_row(model: str, rows: Iterable[Mapping[str, Any]]) -> dict:
  """{"model", perception, reasoning, planning, "average", "questions": {capability: n}}."""
  marks = correctness(rows)
  row: dict[str, Any] = {"model": model}
  for capability in CAPABILITIES:
    values = marks.get(capability)
    row[capability] = float(values.mean()) if values is not None and values.size else None
  row["average"] = _mean([row[c] for c in CAPABILITIES])
  row["questions"] = {c: int(marks[c].size) for c in CAPABILITIES if c in marks}
  return row


def _mean(values: Sequence[float | None]) -> float | None:
  present = [v for v in values if v is not None]
  return float(np.mean(present)) if present else None


def bootstrap_interval(
  marks: Mapping[str, Sequence[np.ndarray]],
  *,
  num_samples: int = 2000,
  level: float = 0.95,
  seed: int = 0,
) -> dict[str, tuple[float, float]]:
  """Percentile bootstrap over questions of the mean accuracy across seeds.

  Args:
    marks: {capability: [bool [questions] per seed]}; every seed answered the same questions in
      the same order, so one resample of question indices is applied to all seeds.
    num_samples, level, seed: bootstrap resamples, interval coverage, resampling seed.

  Returns:
    {capability: (low, high)} and "average" (of the capabilities' resampled means).
  """
  rng = np.random.default_rng(seed)
  lows = (1 - level) / 2
  per_capability = {}
  for capability, per_seed in marks.items():
    stacked = np.stack([np.asarray(m, float) for m in per_seed])  # [seeds, questions]
    picks = rng.integers(0, stacked.shape[1], (num_samples, stacked.shape[1]))
    per_capability[capability] = stacked[:, picks].mean(axis=(0, 2))  # [num_samples]
  out = {
    c: (float(np.quantile(v, lows)), float(np.quantile(v, 1 - lows)))
    for c, v in per_capability.items()
  }
  if per_capability:
    average = np.mean(np.stack(list(per_capability.values())), axis=0)
    out["average"] = (float(np.quantile(average, lows)), float(np.quantile(average, 1 - lows)))
  return out


def _cell(value: Any) -> str:
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{100 * value:.1f}"
  if isinstance(value, list | tuple) and len(value) == 2:
    return f"[{100 * value[0]:.1f}, {100 * value[1]:.1f}]"
  return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  """A Markdown table of result rows; accuracies as percentages, intervals as [low, high]."""
  columns = list(columns or ("model", *CAPABILITIES, "average"))
  lines = [
    "| " + " | ".join(columns) + " |",
    "|" + "|".join(["---"] + ["---:"] * (len(columns) - 1)) + "|",
  ]
  for row in rows:
    lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
  return "\n".join(lines)


def write_results(
  folder: str,
  rows: Sequence[Mapping[str, Any]],
  *,
  title: str,
  notes: Sequence[str] = (),
  columns: Sequence[str] | None = None,
  extra: Mapping[str, Any] | None = None,
) -> str:
  """Writes `<folder>/results.json` ({"rows": rows, **extra}) and `<folder>/results.md`.

  Returns:
    The Markdown text written.
  """
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "results.json"), "w") as f:
    json.dump({"rows": list(rows), **dict(extra or {})}, f, indent=2)
  text = "\n\n".join([f"# {title}", markdown_table(rows, columns), *notes]).rstrip() + "\n"
  with open(os.path.join(folder, "results.md"), "w") as f:
    f.write(text)
  return text


def rows_from_answer_files(files: Mapping[str, str]) -> list[dict]:
  """{model name: answers.jsonl path} -> one accuracy row per existing file, in order."""
  return [
    accuracy_row(name, read_answers(path)) for name, path in files.items() if os.path.exists(path)
  ]


def run_answer_files(workdir: str, teacher_names: Sequence[str]) -> dict[str, str]:
  """Where task drivekd.train leaves the answers of its teachers, the student before
  distillation and the student after (see `tasks.train`)."""
  files = {
    f"teacher/{name}": os.path.join(workdir, "teachers", name, "eval", "answers.jsonl")
    for name in teacher_names
  }
  files["student/before"] = os.path.join(workdir, "student_before", "eval", "answers.jsonl")
  files["student/after"] = os.path.join(workdir, "eval", "answers.jsonl")
  return files


SCORING_NOTE = (
  "Accuracy = share of held-out questions answered correctly: multiple-choice by the option"
  " letter the answer opens with, short open answers by exact match after lower-casing and"
  " dropping punctuation (drivekd_jax.eval.results)."
)
