"""Test-time-scaling gains: scores of a wrapped run minus its baseline, overall and per turn."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from imug_jax.scoring.summary import TurnRow


def _mean(values: Sequence[float]) -> float | None:
  return round(sum(values) / len(values), 2) if values else None


def gains(
  baseline: Sequence[TurnRow],
  scaled: Sequence[TurnRow],
  *,
  num_boot: int = 1000,
  level: float = 0.95,
  seed: int = 0,
) -> dict:
  """Image and overall gains (percentage points) of `scaled` over `baseline`.

  Only turns scored in both runs count (paired on sample and turn), so a failure in one run does
  not bias the difference. Returns {"overall": {...}, "image": {...}, "text": {...},
  "by_turn": {t: {...}}}, each with baseline, scaled, gain, count and the gain's percentile
  bootstrap interval over the pairs (low, high; None without pairs).
  """
  rng = np.random.default_rng(seed)
  alpha = (1 - level) / 2

  def key(r: TurnRow):
    return (r.domain, r.subdomain, r.sample_id, r.turn)

  base = {key(r): r for r in baseline}
  pairs = [(base[key(r)], r) for r in scaled if key(r) in base]

  def entry(selected):
    b = _mean([p[0].score for p in selected])
    s = _mean([p[1].score for p in selected])
    gain = None if b is None or s is None else round(s - b, 2)
    low = high = None
    if selected:
      differences = np.array([p[1].score - p[0].score for p in selected], float)
      draws = rng.choice(differences, (num_boot, differences.size)).mean(axis=1)
      low, high = (round(float(np.quantile(draws, q)), 2) for q in (alpha, 1 - alpha))
    return {
      "baseline": b,
      "scaled": s,
      "gain": gain,
      "low": low,
      "high": high,
      "count": len(selected),
    }

  images = [p for p in pairs if p[1].modality == "image"]
  return {
    "overall": entry(pairs),
    "image": entry(images),
    "text": entry([p for p in pairs if p[1].modality == "text"]),
    "by_turn": {
      t: entry([p for p in images if p[1].turn == t]) for t in sorted({p[1].turn for p in images})
    },
  }
