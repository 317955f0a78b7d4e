"""The DriveBench report: Table 1 in markdown and the scores across settings as a PNG.

`write_report(out_dir, models)` writes `<out_dir>/report.md` and `<out_dir>/settings.png` from a
list of `ModelResult`s (a name, the `scores.json` dicts per setting and, when measured, the
`efficiency.Efficiency`). Table 1 has one row per model: P / R / Pl / Avg on the headline
setting (clean when present, else the first), memory (GB), decode tokens/s and first-token
latency (s); a second table lists every setting with both accuracies and the judge counts. The
plot has four panels (P, R, Pl, Avg), one line per model, over the settings in the order clean,
no_image, then the corruptions grouped as the DriveBench paper groups them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from drivekd_jax.eval.efficiency import Efficiency

SETTING_ORDER = (
  "clean",
  "no_image",
  # weather
  "bright",
  "lowlight",
  "snow",
  "fog",
  "rain",
  # external
  "lens",
  "water",
  # sensor
  "cameracrash",
  "framelost",
  "saturate",
  # motion
  "motion",
  "zoom",
  # transmission
  "biterror",
  "colorquant",
  "h256",
)
PANELS = (("perception", "P"), ("reasoning", "R"), ("planning", "Pl"), ("average", "Avg"))


@dataclasses.dataclass(frozen=True)
class ModelResult:
  """One evaluated model: its scores per setting (`scores.json` dicts) and its efficiency.

  A model measured for efficiency only (e.g. a random-init preset) has no scores."""

  name: str
  scores: Mapping[str, Mapping[str, Any]]
  efficiency: Efficiency | None = None

  @property
  def headline_setting(self) -> str | None:
    if not self.scores:
      return None
    return "clean" if "clean" in self.scores else next(iter(self.scores))


def ordered_settings(settings) -> list[str]:
  """Settings in `SETTING_ORDER`, unknown ones after, in their given order."""
  known = [s for s in SETTING_ORDER if s in settings]
  return known + [s for s in settings if s not in SETTING_ORDER]


def _number(value, digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def table1_markdown(models: Sequence[ModelResult]) -> str:
  """Table 1: model, P / R / Pl / Avg (%), Mem (GB), tok/s, 1st token (s)."""
  lines = [
    "| Model | Setting | P | R | Pl | Avg | Mem (GB) | tok/s | 1st token (s) |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for model in models:
    setting = model.headline_setting
    scores = model.scores[setting] if setting else {}
    eff = model.efficiency
    memory = "-"
    if eff is not None:
      memory = f"{eff.memory_gb:.3g}" + ("*" if eff.memory_source == "live_arrays" else "")
    cells = [
      model.name,
      setting or "-",
      *(_number(scores.get(key)) for key, _ in PANELS),
      memory,
      _number(eff and eff.tokens_per_s, 1),
      _number(eff and eff.first_token_latency_s, 3),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def settings_markdown(models: Sequence[ModelResult]) -> str:
  """Every setting of every model: P / R / Pl / Avg, both accuracies, judge scored/failed."""
  lines = [
    "| Model | Setting | P | R | Pl | Avg | Acc (toolkit) | Acc (strict) | judged | failed |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for model in models:
    for setting in ordered_settings(model.scores):
      scores = model.scores[setting]
      accuracy, judge = scores.get("accuracy", {}), scores.get("judge", {})
      cells = [
        model.name,
        setting,
        *(_number(scores.get(key)) for key, _ in PANELS),
        _number(accuracy.get("official")),
        _number(accuracy.get("strict")),
        str(judge.get("scored", "-")),
        str(judge.get("failed", "-")),
      ]
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def settings_plot(models: Sequence[ModelResult], path: str | Path) -> Path:
  """Four panels (P, R, Pl, Avg) of the scores over the settings, one line per model."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  settings = ordered_settings(list(dict.fromkeys(s for m in models for s in m.scores)))
  figure, axes = plt.subplots(2, 2, figsize=(12, 7), sharex=True)
  for axis, (key, label) in zip(axes.flat, PANELS):
    for model in models:
      ys = [model.scores.get(s, {}).get(key) for s in settings]
      ys = [float("nan") if y is None else y for y in ys]
      axis.plot(range(len(settings)), ys, marker="o", label=model.name)
    axis.set_title(label)
    axis.set_ylabel("score (%)")
    axis.grid(alpha=0.3)
  for axis in axes[-1]:
    axis.set_xticks(range(len(settings)), settings, rotation=60, ha="right")
  axes.flat[0].legend(fontsize="small")
  figure.suptitle("DriveBench judged scores across image settings")
  figure.tight_layout()
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=100)
  plt.close(figure)
  return path


def write_report(
  out_dir: str | Path,
  models: Sequence[ModelResult],
  *,
  judge_name: str | None = None,
  notes: Sequence[str] = (),
) -> Path:
  """Writes `report.md` (Table 1, the per-setting table, the plot) and `settings.png`."""
  if not models:
    raise ValueError("write_report needs at least one model")
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  plot = settings_plot(models, out / "settings.png")
  efficiency_lines = [
    f"- {m.name}: {m.efficiency.devices}, batch {m.efficiency.batch_size}, "
    f"{m.efficiency.prompt_tokens} prompt tokens, {m.efficiency.new_tokens} new tokens, "
    f"median of {m.efficiency.repeats}; memory from {m.efficiency.memory_source}"
    for m in models
    if m.efficiency is not None
  ]
  parts = [
    "# DriveBench evaluation",
    "",
    f"Judge: `{judge_name or 'none'}` (scores from different judges are not comparable).",
    "P / R / Pl / Avg: mean judged score (0-100) of the perception, reasoning (prediction +"
    " behavior) and planning questions, and their mean.",
    "",
    "## Table 1",
    "",
    table1_markdown(models),
    "",
    "Mem marked * is the bytes of live arrays (the backend reports no peak memory).",
    *efficiency_lines,
    "",
    "## Every setting",
    "",
    settings_markdown(models),
    "",
    f"![scores across settings]({plot.name})",
  ]
  if notes:
    parts += ["", "## Notes", "", *(f"- {note}" for note in notes)]
  path = out / "report.md"
  path.write_text("\n".join(parts) + "\n", encoding="utf-8")
  return path
