"""Exposure bias on the generation side: image score against turn index.

The official code and the available text define no statistic (docs/imug_protocol.md §2.6); what
the benchmark shows is the image column of the by-turn table under the autoregressive rollout.
This module measures it (our own extension, marked as such in reports):

  * per turn index, overall and per class: mean image score (percent) with a percentile
    bootstrap CI over the turn records of that index;
  * the least-squares slope of score on turn index (points per turn) and the drop from the first
    to the last turn index that has data, each with a cluster bootstrap CI that resamples whole
    samples (turns of one dialogue are correlated);
  * with a reference-history control run (earlier turns given ground-truth images instead of the
    model's own), the own - reference gap per turn (a paired bootstrap when both runs hold the
    same turns) and the slope difference. A gap that grows with
    the turn index is exposure bias; a slope shared by both runs is turn difficulty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from imug_jax.scoring.summary import TurnRow

OVERALL = "overall"


@dataclasses.dataclass(frozen=True)
class Estimate:
  value: float | None
  low: float | None
  high: float | None

  def to_json(self) -> dict:
    return {"value": _round(self.value), "low": _round(self.low), "high": _round(self.high)}


def _round(x: float | None) -> float | None:
  return None if x is None or not np.isfinite(x) else round(float(x), 3)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float | None, float | None]:
  draws = draws[np.isfinite(draws)]
  if draws.size == 0:
    return None, None
  alpha = (1 - level) / 2
  return float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))


def _slope(turns: np.ndarray, scores: np.ndarray) -> float:
  if turns.size < 2 or np.ptp(turns) == 0:
    return float("nan")
  centred = turns - turns.mean()
  return float((centred * (scores - scores.mean())).sum() / (centred**2).sum())


def _drop(turns: np.ndarray, scores: np.ndarray) -> float:
  if turns.size == 0 or np.ptp(turns) == 0:
    return float("nan")
  first, last = turns.min(), turns.max()
  return float(scores[turns == first].mean() - scores[turns == last].mean())


def image_rows(rows: Sequence[TurnRow], group: str = OVERALL) -> list[TurnRow]:
  return [r for r in rows if r.modality == "image" and group in (OVERALL, r.klass)]


def by_turn(
  rows: Sequence[TurnRow], *, num_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[int, dict]:
  """{turn: {"mean": Estimate, "count": n}} over image rows, percentile bootstrap per turn."""
  rng = np.random.default_rng(seed)
  table = {}
  for turn in sorted({r.turn for r in rows}):
    scores = np.array([r.score for r in rows if r.turn == turn], float)
    draws = rng.choice(scores, size=(num_boot, scores.size), replace=True).mean(axis=1)
    low, high = _percentiles(draws, level)
    table[turn] = {"mean": Estimate(float(scores.mean()), low, high), "count": int(scores.size)}
  return table


def trend(
  rows: Sequence[TurnRow], *, num_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Estimate]:
  """Slope (points per turn) and first->last drop, with a bootstrap over samples."""
  turns = np.array([r.turn for r in rows], float)
  scores = np.array([r.score for r in rows], float)
  clusters = [(r.model, r.domain, r.subdomain, r.sample_id) for r in rows]
  ids = {c: i for i, c in enumerate(dict.fromkeys(clusters))}
  cluster_of = np.array([ids[c] for c in clusters], int)
  members = [np.flatnonzero(cluster_of == i) for i in range(len(ids))]
  rng = np.random.default_rng(seed)
  slopes, drops = np.full(num_boot, np.nan), np.full(num_boot, np.nan)
  if members:
    for b in range(num_boot):
      picked = rng.integers(0, len(members), len(members))
      index = np.concatenate([members[i] for i in picked])
      slopes[b], drops[b] = _slope(turns[index], scores[index]), _drop(turns[index], scores[index])
  slope, drop = _slope(turns, scores), _drop(turns, scores)
  return {
    "slope": Estimate(slope if np.isfinite(slope) else None, *_percentiles(slopes, level)),
    "drop_first_to_last": Estimate(
      drop if np.isfinite(drop) else None, *_percentiles(drops, level)
    ),
  }


def analyse(
  own: Sequence[TurnRow],
  reference: Sequence[TurnRow] | None = None,
  *,
  num_boot: int = 1000,
  level: float = 0.95,
  seed: int = 0,
) -> dict:
  """Exposure-bias report for `own` rows, optionally against a reference-history run.

  Returns a JSON-ready dict: {"groups": {overall|class: {"by_turn", "slope",
  "drop_first_to_last"}}, "gap": {...} (only with `reference`), "settings"}.
  """
  classes = sorted({r.klass for r in own if r.modality == "image"})
  kw = dict(num_boot=num_boot, level=level, seed=seed)
  report: dict = {"groups": {}, "settings": {"num_boot": num_boot, "level": level, "seed": seed}}
  for group in (OVERALL, *classes):
    rows = image_rows(own, group)
    if not rows:
      continue
    report["groups"][group] = _group_json(rows, kw)
  if reference is not None:
    report["reference_groups"] = {}
    report["gap"] = {}
    for group in (OVERALL, *classes):
      rows, ref_rows = image_rows(own, group), image_rows(reference, group)
      if not rows or not ref_rows:
        continue
      report["reference_groups"][group] = _group_json(ref_rows, kw)
      report["gap"][group] = _gap(rows, ref_rows, **kw)
  return report


def _group_json(rows: Sequence[TurnRow], kw: dict) -> dict:
  table = by_turn(rows, **kw)
  return {
    "by_turn": {t: {"mean": e["mean"].to_json(), "count": e["count"]} for t, e in table.items()},
    **{name: est.to_json() for name, est in trend(rows, **kw).items()},
  }


def _turn_key(row: TurnRow) -> tuple:
  return (row.domain, row.subdomain, row.sample_id, row.turn)


def _gap(
  own: Sequence[TurnRow], reference: Sequence[TurnRow], *, num_boot: int, level: float, seed: int
) -> dict:
  """Own - reference mean per turn and the slope difference.

  Where every turn record of one run has its partner in the other (same sample and turn, as in
  a reference-history control of the same samples) the bootstrap resamples the paired
  differences; otherwise the two runs are resampled independently.
  """
  rng = np.random.default_rng(seed + 1)
  per_turn = {}
  for turn in sorted({r.turn for r in own} & {r.turn for r in reference}):
    mine = {_turn_key(r): r.score for r in own if r.turn == turn}
    theirs = {_turn_key(r): r.score for r in reference if r.turn == turn}
    a, b = np.array(list(mine.values()), float), np.array(list(theirs.values()), float)
    if mine.keys() == theirs.keys():
      differences = np.array([mine[k] - theirs[k] for k in mine], float)
      draws = rng.choice(differences, (num_boot, differences.size)).mean(axis=1)
    else:
      draws = rng.choice(a, (num_boot, a.size)).mean(axis=1) - rng.choice(
        b, (num_boot, b.size)
      ).mean(axis=1)
    per_turn[turn] = Estimate(float(a.mean() - b.mean()), *_percentiles(draws, level)).to_json()
  own_slope = trend(own, num_boot=num_boot, level=level, seed=seed)["slope"]
  ref_slope = trend(reference, num_boot=num_boot, level=level, seed=seed)["slope"]
  difference = (
    None
    if own_slope.value is None or ref_slope.value is None
    else own_slope.value - ref_slope.value
  )
  return {"by_turn": per_turn, "slope_difference": _round(difference)}
