"""Line charts of the report, drawn with matplotlib (Agg, no display): lines with CI bands.

`line_chart(series, path, ...)` writes a 720 x 440 PNG. Each series is a
`Series(label, xs, ys, lows, highs)`; missing values (None) break the line and its band.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Before pyplot: files only, no display.
from matplotlib import pyplot as plt

FIGURE_SIZE = (7.2, 4.4)  # Inches; at DPI 100: 720 x 440 pixels.
DPI = 100


@dataclasses.dataclass(frozen=True)
class Series:
  label: str
  xs: Sequence[float]
  ys: Sequence[float | None]
  lows: Sequence[float | None] | None = None
  highs: Sequence[float | None] | None = None


def _masked(values: Sequence[float | None] | None, count: int) -> list[float]:
  """None -> NaN, which matplotlib leaves as a gap."""
  if values is None:
    return [float("nan")] * count
  return [float("nan") if v is None else float(v) for v in values]


def line_chart(
  series: Sequence[Series],
  path: str | Path,
  *,
  title: str,
  xlabel: str,
  ylabel: str,
  y_range: tuple[float, float] | None = None,
  zero_line: bool = False,
) -> Path:
  """Draws the series (shaded bands where lows/highs are given) and saves a PNG at `path`."""
  values = [v for s in series for v in (*s.ys, *(s.lows or ()), *(s.highs or ())) if v is not None]
  xs = sorted({x for s in series for x in s.xs})
  if not values or not xs:
    raise ValueError(f"{path}: nothing to plot for {title!r}")
  figure, axes = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
  try:
    for s in series:
      order = sorted(range(len(s.xs)), key=lambda i: s.xs[i])
      x = [s.xs[i] for i in order]
      y = _masked([s.ys[i] for i in order], len(order))
      (line,) = axes.plot(x, y, marker="o", linewidth=2, label=s.label)
      if s.lows is not None and s.highs is not None:
        low = _masked([s.lows[i] for i in order], len(order))
        high = _masked([s.highs[i] for i in order], len(order))
        axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if zero_line:
      axes.axhline(0.0, color="grey", linewidth=1)
    if y_range is not None:
      axes.set_ylim(*y_range)
    axes.set_xticks(xs)
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(loc="best", fontsize="small")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI)
  finally:
    plt.close(figure)
  return path
