"""Small line charts drawn with PIL (no plotting library needed): lines, CI bands, bars.

`line_chart(series, path, ...)` writes a PNG. Each series is a `Series(label, xs, ys, lows, highs)`;
missing values (None) break the line. Colours cycle through a fixed, colour-blind-friendly palette.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = (
  (0, 114, 178),
  (213, 94, 0),
  (0, 158, 115),
  (204, 121, 167),
  (86, 180, 233),
  (230, 159, 0),
  (120, 120, 120),
)
_W, _H = 720, 440
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 190, 40, 50


@dataclasses.dataclass(frozen=True)
class Series:
  label: str
  xs: Sequence[float]
  ys: Sequence[float | None]
  lows: Sequence[float | None] | None = None
  highs: Sequence[float | None] | None = None


def _font():
  return ImageFont.load_default()


def _nice_range(values: list[float], *, include_zero: bool) -> tuple[float, float]:
  low, high = min(values), max(values)
  if include_zero:
    low, high = min(low, 0.0), max(high, 0.0)
  if math.isclose(low, high):
    low, high = low - 1.0, high + 1.0
  pad = (high - low) * 0.08
  return low - pad, high + pad


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
  raw = (high - low) / count
  magnitude = 10 ** math.floor(math.log10(raw))
  step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
  first = math.ceil(low / step) * step
  return [first + i * step for i in range(int((high - first) / step) + 1)]


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
  """Draws the series (with shaded bands where lows/highs are given) and saves a PNG."""
  values = [v for s in series for v in (*s.ys, *(s.lows or ()), *(s.highs or ())) if v is not None]
  xs = [x for s in series for x in s.xs]
  if not values or not xs:
    raise ValueError(f"{path}: nothing to plot for {title!r}")
  y0, y1 = y_range or _nice_range(values, include_zero=zero_line)
  x0, x1 = min(xs), max(xs)
  if x0 == x1:
    x0, x1 = x0 - 0.5, x1 + 0.5
  plot_w, plot_h = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

  def px(x: float, y: float) -> tuple[float, float]:
    return (_LEFT + (x - x0) / (x1 - x0) * plot_w, _TOP + (1 - (y - y0) / (y1 - y0)) * plot_h)

  image = Image.new("RGB", (_W, _H), "white")
  bands = Image.new("RGBA", (_W, _H), (0, 0, 0, 0))
  band_draw = ImageDraw.Draw(bands)
  draw = ImageDraw.Draw(image)
  font = _font()
  for tick in _ticks(y0, y1):
    _, ty = px(x0, tick)
    draw.line([(_LEFT, ty), (_LEFT + plot_w, ty)], fill=(232, 232, 232))
    draw.text((_LEFT - 8, ty), f"{tick:g}", fill="black", font=font, anchor="rm")
  for x in sorted(set(xs)):
    tx, _ = px(x, y0)
    draw.text((tx, _TOP + plot_h + 6), f"{x:g}", fill="black", font=font, anchor="mt")
  if zero_line and y0 < 0 < y1:
    _, zy = px(x0, 0.0)
    draw.line([(_LEFT, zy), (_LEFT + plot_w, zy)], fill=(120, 120, 120), width=1)
  for index, s in enumerate(series):
    colour = PALETTE[index % len(PALETTE)]
    if s.lows is not None and s.highs is not None:
      for run in _runs(s.xs, s.lows, s.highs):
        upper = [px(x, h) for x, _, h in run]
        lower = [px(x, lo) for x, lo, _ in reversed(run)]
        if len(run) == 1:
          (cx, top), (_, bottom) = upper[0], lower[0]
          band_draw.rectangle([cx - 4, top, cx + 4, bottom], fill=(*colour, 60))
        else:
          band_draw.polygon(upper + lower, fill=(*colour, 60))
  image.paste(bands, (0, 0), bands)
  draw = ImageDraw.Draw(image)
  for index, s in enumerate(series):
    colour = PALETTE[index % len(PALETTE)]
    for run in _runs(s.xs, s.ys):
      points = [px(x, y) for x, y in run]
      if len(points) > 1:
        draw.line(points, fill=colour, width=3)
      for cx, cy in points:
        draw.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
    ly = _TOP + 10 + index * 18
    draw.rectangle([_W - _RIGHT + 14, ly - 5, _W - _RIGHT + 30, ly + 5], fill=colour)
    draw.text((_W - _RIGHT + 36, ly), s.label[:24], fill="black", font=font, anchor="lm")
  draw.rectangle([_LEFT, _TOP, _LEFT + plot_w, _TOP + plot_h], outline="black")
  draw.text((_W / 2, 14), title, fill="black", font=font, anchor="mm")
  draw.text((_LEFT + plot_w / 2, _H - 14), xlabel, fill="black", font=font, anchor="mm")
  draw.text((8, _TOP - 22), ylabel, fill="black", font=font, anchor="lm")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, format="PNG")
  return path


def _runs(xs: Sequence[float], *columns: Sequence[float | None]) -> list[list[tuple]]:
  """Splits aligned columns into runs without None, sorted by x."""
  runs, current = [], []
  for row in sorted(zip(xs, *columns, strict=True), key=lambda r: r[0]):
    if any(v is None for v in row[1:]):
      if current:
        runs.append(current)
      current = []
    else:
      current.append(row)
  if current:
    runs.append(current)
  return runs
