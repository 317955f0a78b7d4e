"""The Drive-KD comparison at toy scale: arms, their summary over seeds, and its plots.

Arms (every one trains the same student on the same data, steps and seeds; they differ only in
the distillation losses switched on, `arm_overrides`):

  sft                  supervised fine-tuning only (CE; no capability loss, nothing to combine)
  single/<capability>  CE + that capability's attention loss from its teacher
  multi/sum            CE + the three capability losses, gradients summed (official --no-agp)
  multi/agp            CE + the three capability losses, combined by AGP (the official mode)

`summarize(answers, scalars)` turns the held-out answer rows of every (arm, seed) into one row per
arm with the mean accuracy over seeds and a 95% percentile bootstrap interval over questions
(every seed answers the same questions; one resample of the questions is applied to all
seeds, so the interval covers question sampling, and the mean over seeds averages out the
seeds), and the AGP diagnostics (`agp/*` scalars) into curves averaged over seeds.
`plot_accuracy` and `plot_agp` draw them with matplotlib.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from drivekd_jax.eval import results as results_lib

CAPABILITIES = results_lib.CAPABILITIES
ARMS = (
  "sft",
  "single/perception",
  "single/reasoning",
  "single/planning",
  "multi/sum",
  "multi/agp",
)


def arm_overrides(arm: str) -> dict[str, Any]:
  """The `config.distill` fields of an arm (module docstring); everything else is shared."""
  if arm == "sft":
    # With no capability loss the combiner sees the CE gradient alone and leaves it as it is;
    # "pcgrad" keeps a [1] order state where "agp" would keep a [0] one, which Orbax refuses
    # to checkpoint ("Cannot save arrays with zero size").
    return {"capabilities": (), "agp_mode": "pcgrad"}
  kind, _, detail = arm.partition("/")
  if kind == "single" and detail in CAPABILITIES:
    return {"capabilities": (detail,)}
  if kind == "multi" and detail in ("sum", "agp"):
    return {"capabilities": CAPABILITIES, "agp_mode": detail}
  raise ValueError(f"unknown arm {arm!r}; known: {', '.join(ARMS)}")


def summarize(
  answers: Mapping[str, Sequence[Sequence[Mapping[str, Any]]]],
  *,
  num_samples: int = 2000,
  seed: int = 0,
) -> list[dict]:
  """One row per model: mean accuracy over seeds, bootstrap interval, per-seed accuracies.

  Args:
    answers: {model name: [answer rows of one seed, ...]}; within a model every seed answered
      the same questions in the same order.

  Returns:
    Rows {"model", perception, reasoning, planning, "average" (means over seeds), "ci":
    {capability or "average": [low, high]}, "per_seed": [accuracy row, ...], "seeds": n}.
  """
  out = []
  for model, per_seed in answers.items():
    seed_rows = [results_lib.accuracy_row(model, rows) for rows in per_seed]
    marks: dict[str, list[np.ndarray]] = {}
    for rows in per_seed:
      for capability, values in results_lib.correctness(rows).items():
        if capability in CAPABILITIES:
          marks.setdefault(capability, []).append(values)
    sizes = {c: {m.size for m in v} for c, v in marks.items()}
    for capability, found in sizes.items():
      if len(found) != 1 or len(marks[capability]) != len(per_seed):
        raise ValueError(
          f"{model}: the seeds answered different {capability} questions (counts {sorted(found)})"
        )
    interval = results_lib.bootstrap_interval(marks, num_samples=num_samples, seed=seed)
    row: dict[str, Any] = {"model": model}
    for key in (*CAPABILITIES, "average"):
      values = [r[key] for r in seed_rows if r[key] is not None]
      row[key] = float(np.mean(values)) if values else None
    row["ci"] = {k: list(v) for k, v in interval.items()}
    row["seeds"] = len(per_seed)
    row["per_seed"] = seed_rows
    out.append(row)
  return out


def agp_curves(
  scalars_per_seed: Sequence[Mapping[str, Sequence[tuple[int, float]]]],
) -> dict[str, list[tuple[int, float]]]:
  """{agp/* tag: [(step, mean over seeds)]} of the steps every seed logged."""
  tags = sorted(
    set.intersection(*(set(t for t in s if t.startswith("agp/")) for s in scalars_per_seed))
    if scalars_per_seed
    else set()
  )
  curves = {}
  for tag in tags:
    per_seed = [dict(s[tag]) for s in scalars_per_seed]
    steps = sorted(set.intersection(*(set(p) for p in per_seed)))
    curves[tag] = [(int(step), float(np.mean([p[step] for p in per_seed]))) for step in steps]
  return curves


def agp_totals(curves: Mapping[str, Sequence[tuple[int, float]]]) -> dict[str, float]:
  """Per tag: the sum over logged steps for conflict counts, the mean for everything else."""
  out = {}
  for tag, points in curves.items():
    values = [v for _, v in points]
    out[tag] = float(np.sum(values) if "conflict" in tag else np.mean(values))
  return out


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Rows for `results.markdown_table`: "mean [low, high]" (percent) per capability and average,
  and the number of seeds."""
  out = []
  for row in rows:
    flat: dict[str, Any] = {"model": row["model"], "seeds": row.get("seeds")}
    for key in (*CAPABILITIES, "average"):
      value, interval = row.get(key), row.get("ci", {}).get(key)
      if value is None:
        flat[key] = None
      elif interval is None:
        flat[key] = f"{100 * value:.1f}"
      else:
        flat[key] = f"{100 * value:.1f} [{100 * interval[0]:.1f}, {100 * interval[1]:.1f}]"
    out.append(flat)
  return out


def plot_accuracy(rows: Sequence[Mapping[str, Any]], path: str, *, title: str) -> str:
  """Grouped bars: accuracy per capability (and average) per model, with the intervals."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = (*CAPABILITIES, "average")
  width = 0.8 / max(1, len(rows))
  fig, ax = plt.subplots(figsize=(2.2 * len(keys) + 2, 4.2))
  for i, row in enumerate(rows):
    means = [100 * (row.get(k) or 0.0) for k in keys]
    ci = row.get("ci", {})
    low = [means[j] - 100 * ci[k][0] if k in ci else 0.0 for j, k in enumerate(keys)]
    high = [100 * ci[k][1] - means[j] if k in ci else 0.0 for j, k in enumerate(keys)]
    xs = np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width
    ax.bar(xs, means, width, yerr=[low, high], capsize=2, label=row["model"])
  ax.set_xticks(np.arange(len(keys)), keys)
  ax.set_ylabel("held-out accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(title)
  ax.legend(fontsize=7, ncol=2, loc="lower right")
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_agp(curves: Mapping[str, Sequence[tuple[int, float]]], path: str, *, title: str) -> str:
  """Two panels over training steps: conflict counts, and gradient cosines."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
  for tag, points in sorted(curves.items()):
    if not points:
      continue
    steps, values = zip(*points)
    axis = left if "conflict" in tag else right
    axis.plot(steps, values, label=tag.removeprefix("agp/"), lw=1.2)
  left.set_title("conflicts per logged step")
  right.set_title("gradient cosines")
  right.axhline(0.0, color="gray", lw=0.6)
  for axis in (left, right):
    axis.set_xlabel("training step")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
      axis.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
