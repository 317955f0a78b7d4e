"""Several seeds of the IMUG demo side by side: each per-turn figure of the report, over seeds.

`python -m imug_jax.seeds --workdirs W0 W1 W2 --out DIR` reads `<W>/report/summary.json` of each
demo run (`configs/imug/demo.py`, one seed each: model.seed, model.train.seed, rollout.seed) and
writes into DIR:

  seeds.md                  per turn: the image score with own and with reference history and
                            their gap (exposure bias); the image-score gain of each
                            test-time-scaling run; the strategies' diagnostics
  seeds.json                the same numbers
  own_vs_reference.png      image score by turn, own vs reference history
  tts_gains.png             image-score gain by turn of each strategy

Every figure is the mean over seeds, shown with the lowest and highest seed's value; the runs
share the held-out samples, so a turn has the same image turns in every seed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imug_jax.scoring import plots


def _spread(values: Sequence[float | None]) -> dict[str, Any]:
  """Mean, lowest and highest of the seeds' values (None when a seed lacks it)."""
  present = [v for v in values if v is not None]
  if not present:
    return {"mean": None, "low": None, "high": None, "seeds": list(values)}
  return {
    "mean": round(float(np.mean(present)), 2),
    "low": round(min(present), 2),
    "high": round(max(present), 2),
    "seeds": list(values),
  }


def _load(workdir: str | Path) -> dict:
  path = Path(workdir) / "report" / "summary.json"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no report; run configs/imug/demo.py into {workdir} first")
  return json.loads(path.read_text(encoding="utf-8"))


def _mean_leaves(trees: Sequence[Any]) -> Any:
  """The element-wise mean of the numbers in equally shaped JSON trees; a leaf that is not a
  number in every tree is kept where all trees agree, else None (e.g. a correlation undefined in
  one seed)."""
  first = trees[0]
  if isinstance(first, dict):
    return {k: _mean_leaves([t.get(k) for t in trees]) for k in first}
  numbers = [t for t in trees if isinstance(t, int | float) and not isinstance(t, bool)]
  if numbers and len(numbers) == len(trees):
    mean = float(np.mean(numbers))
    return (
      int(mean)
      if all(isinstance(t, int) for t in numbers) and mean.is_integer()
      else round(mean, 4)
    )
  return first if all(t == first for t in trees) else None


def combine(workdirs: Sequence[str | Path]) -> dict[str, Any]:
  """The per-turn figures of the demo runs in `workdirs` over seeds (module docstring)."""
  payloads = [_load(w) for w in workdirs]
  model = payloads[0]["runs"]["baselines"][0]
  exposure = [p["exposure"][model] for p in payloads]
  turns = sorted({int(t) for e in exposure for t in e["groups"]["overall"]["by_turn"]})

  def per_turn(groups_key: str, turn: int) -> list[float | None]:
    values = []
    for e in exposure:
      entry = (e.get(groups_key) or {}).get("overall", {}).get("by_turn", {}).get(str(turn))
      values.append(entry["mean"]["value"] if entry else None)
    return values

  history = {}
  for turn in turns:
    own, reference = per_turn("groups", turn), per_turn("reference_groups", turn)
    gap = [None if o is None or r is None else o - r for o, r in zip(own, reference)]
    counts = [e["groups"]["overall"]["by_turn"].get(str(turn), {}).get("count") for e in exposure]
    history[turn] = {
      "own": _spread(own),
      "reference": _spread(reference),
      "gap": _spread(gap),
      "image_turns": counts[0],
    }
  image = [p["models"][model]["overall"]["image"]["mean"] for p in payloads]
  runs = sorted({r for p in payloads for r in p["tts"]})
  tts = {}
  for run in runs:
    gains = [p["tts"].get(run) for p in payloads]
    tts[run] = {
      "image": _spread([g["image"]["gain"] if g else None for g in gains]),
      "scaled": _spread([g["image"]["scaled"] if g else None for g in gains]),
      "by_turn": {
        turn: _spread(
          [(g["by_turn"].get(str(turn)) or {}).get("gain") if g else None for g in gains]
        )
        for turn in turns
      },
    }
  diagnostics = [p["tts_diagnostics"] for p in payloads if p.get("tts_diagnostics")]
  return {
    "model": model,
    "seeds": len(payloads),
    "workdirs": [str(w) for w in workdirs],
    "image_score": _spread(image),
    "history": history,
    "tts": tts,
    "diagnostics": _mean_leaves(diagnostics) if diagnostics else None,
  }


def _cell(entry: dict[str, Any]) -> str:
  if entry["mean"] is None:
    return "-"
  return f"{entry['mean']:.2f} [{entry['low']:.2f}, {entry['high']:.2f}]"


def markdown(result: dict[str, Any]) -> str:
  """seeds.md: the tables of `combine`'s result."""
  turns = sorted(result["history"])
  lines = [
    f"# IMUG demo over {result['seeds']} seeds ({result['model']})",
    "",
    "Each cell: mean over seeds [lowest seed, highest seed]. Image scores in %, gains in points.",
    "",
    f"Image score (own history, all image turns): {_cell(result['image_score'])}.",
    "",
    "| Turn | Own history | Reference history | Own - reference | Image turns |",
    "| ---: | --- | --- | --- | ---: |",
  ]
  for turn in turns:
    h = result["history"][turn]
    lines.append(
      f"| {turn} | {_cell(h['own'])} | {_cell(h['reference'])} | {_cell(h['gap'])} | "
      f"{h['image_turns']} |"
    )
  if result["tts"]:
    lines += [
      "",
      "| Strategy | Image score | Image gain | "
      + " | ".join(f"gain turn {t}" for t in turns)
      + " |",
      "| --- " * (len(turns) + 3) + "|",
    ]
    for run, g in result["tts"].items():
      cells = " | ".join(_cell(g["by_turn"][t]) for t in turns)
      lines.append(f"| {run} | {_cell(g['scaled'])} | {_cell(g['image'])} | {cells} |")
  if result["diagnostics"]:
    from imug_jax.tts import diagnostics

    lines += [
      line.replace("## Test-time scaling diagnostics", "## Diagnostics, mean over seeds")
      for line in diagnostics.markdown(result["diagnostics"])
    ]
  return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: str | Path) -> list[Path]:
  """seeds.md, seeds.json and the two plots under `out`; returns the plot paths."""
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "seeds.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
  (out / "seeds.md").write_text(markdown(result), encoding="utf-8")
  turns = sorted(result["history"])

  def series(label: str, entries: Sequence[dict[str, Any]], xs: Sequence[int]) -> plots.Series:
    return plots.Series(
      label,
      list(xs),
      [e["mean"] for e in entries],
      [e["low"] for e in entries],
      [e["high"] for e in entries],
    )

  seeds = result["seeds"]
  figures = [
    plots.line_chart(
      [
        series(f"{name} history", [result["history"][t][key] for t in turns], turns)
        for name, key in (("own", "own"), ("reference", "reference"))
      ],
      out / "own_vs_reference.png",
      title=f"{result['model']}: image score by turn, {seeds} seeds (band: lowest-highest seed)",
      xlabel="turn",
      ylabel="image score (%)",
      y_range=(0, 100),
    )
  ]
  if result["tts"]:
    figures.append(
      plots.line_chart(
        [series(run, [g["by_turn"][t] for t in turns], turns) for run, g in result["tts"].items()],
        out / "tts_gains.png",
        title=f"Test-time scaling: image-score gain by turn, {seeds} seeds",
        xlabel="turn",
        ylabel="gain (points)",
        zero_line=True,
      )
    )
  return figures


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdirs", nargs="+", required=True, help="demo workdirs, one per seed")
  parser.add_argument("--out", required=True, help="output folder")
  args = parser.parse_args(argv)
  result = combine(args.workdirs)
  write(result, args.out)
  print(markdown(result))


if __name__ == "__main__":
  main()
