"""Aggregation of per-turn scores (official `summarize_results.py`).

Every scored turn is one row {model, domain, class, turn, modality, score}; `score` is a percentage:
point-mean x 20 for image turns, MCQ score x 100 for text turns. All aggregates are unweighted
micro-means over rows, rounded to 2 decimals: overall, and by domain, class and turn index, each
for "all" (text and image pooled, one weight per turn), "text" and "image". No per-sample or
macro averaging, as in the released code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from imug_jax.data.schema import class_of

MODALITIES = ("all", "text", "image")
UNASSIGNED = "Unassigned"


@dataclasses.dataclass(frozen=True)
class TurnRow:
  model: str
  domain: str
  subdomain: str
  sample_id: str
  turn: int
  modality: str
  score: float  # percent
  klass: str = ""

  def __post_init__(self):
    if self.modality not in ("text", "image"):
      raise ValueError(f"modality must be text or image, got {self.modality!r}")
    if not self.klass:
      object.__setattr__(self, "klass", class_name(self.domain))


def class_name(domain: str) -> str:
  try:
    return class_of(domain)
  except KeyError:
    return UNASSIGNED


def image_percent(point_scores: Sequence[float]) -> float:
  """Mean of the returned point scores (0-5) times 20."""
  if not point_scores:
    raise ValueError("an image turn needs at least one point score")
  return sum(float(s) for s in point_scores) / len(point_scores) * 20


def mean_entry(rows: Sequence[TurnRow]) -> dict:
  mean = round(sum(r.score for r in rows) / len(rows), 2) if rows else None
  return {"mean": mean, "count": len(rows)}


def by_modality(rows: Sequence[TurnRow]) -> dict:
  return {m: mean_entry([r for r in rows if m == "all" or r.modality == m]) for m in MODALITIES}


def grouped(rows: Sequence[TurnRow], field: str) -> dict:
  """{group value: {all|text|image: {mean, count}}}, groups sorted."""
  values = sorted({getattr(r, field) for r in rows})
  return {v: by_modality([r for r in rows if getattr(r, field) == v]) for v in values}


def summarize(rows: Iterable[TurnRow]) -> dict:
  """The official per-model result: overall, by_domain, by_class, by_turn."""
  rows = list(rows)
  return {
    "overall": by_modality(rows),
    "by_domain": grouped(rows, "domain"),
    "by_class": grouped(rows, "klass"),
    "by_turn": grouped(rows, "turn"),
  }


def summarize_models(rows: Iterable[TurnRow]) -> dict:
  """{"score_unit": "percentage", "models": {model: summarize(model rows)}}."""
  rows = list(rows)
  models = sorted({r.model for r in rows})
  return {
    "score_unit": "percentage",
    "models": {m: summarize([r for r in rows if r.model == m]) for m in models},
  }


def markdown_table(title: str, groups: dict) -> str:
  lines = [f"## {title}", "| Group | All | Text | Image |", "| --- | ---: | ---: | ---: |"]
  for name, scores in groups.items():
    cells = " | ".join(_format(scores[m]) for m in MODALITIES)
    lines.append(f"| {name} | {cells} |")
  return "\n".join(lines)


def markdown_summary(model: str, result: dict) -> str:
  return "\n\n".join(
    [
      f"# {model}",
      markdown_table("Overall", {"Overall": result["overall"]}),
      markdown_table("By Domain", result["by_domain"]),
      markdown_table("By Class", result["by_class"]),
      markdown_table("By Turn", result["by_turn"]),
    ]
  )


def _format(entry: dict) -> str:
  return "-" if entry["mean"] is None else f"{entry['mean']:.2f}"
