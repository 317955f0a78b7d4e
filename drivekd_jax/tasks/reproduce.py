"""Task "drivekd.reproduce": the Drive-KD comparison at toy scale (`eval.comparison`).

    python launch.py --config=configs/drivekd/reproduce.py --workdir=DIR

`config.run` is one drivekd.train config (the demo's); for every seed of `config.seeds` and
every arm of `config.arms` it runs task drivekd.train in `<workdir>/seed<s>/<arm>` with that
seed (student and teacher initialisation, data order) and the arm's distillation fields, all
else equal. The data (synthetic files, TFDS builds, tokenizer) is prepared once under
`<workdir>/data`; within a seed the arms share `<workdir>/seed<s>/teachers` (warmed once, then
reused; their held-out answers are taken once, by the first arm, unless `run.eval.teachers`
is False) and `student_before` (the initial student's
answers). Finished arms are skipped on a relaunch. Compiled steps are cached in
`<workdir>/jax_cache`, so each kind of arm compiles once for all seeds.

Writes `<workdir>/results.json` and `results.md` (one row per teacher and per arm: mean accuracy
over seeds with 95% bootstrap intervals over questions; the AGP diagnostics of the multi-teacher
arms), and `accuracy.png`, `agp.png`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from drivekd_jax.data import sources
from drivekd_jax.eval import comparison
from drivekd_jax.eval import results as results_lib
from drivekd_jax.tasks import train as train_task
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train.settings import RunSettings

SHARED = ("teachers", "student_before")


def arm_config(run: Any, arm: str, seed: int, data_root: str, *, teachers: bool) -> Any:
  """`run` with the seed, the shared data and the arm's distillation fields."""
  config = ml_collections.ConfigDict(run.to_dict())
  config.task = "drivekd.train"
  config.seed = seed
  config.data.shuffle_seed = seed
  config.data.synthetic.dir = os.path.join(data_root, "synthetic")
  config.data.tfds_dir = os.path.join(data_root, "tfds")
  config.data.tokenizer = os.path.join(data_root, "tokenizer", "tokenizer.json")
  config.eval.teachers = teachers
  for key, value in comparison.arm_overrides(arm).items():
    config.distill[key] = value
  return config


def prepare_shared_data(run: Any, workdir: str) -> str:
  """Writes and builds the data and trains the tokenizer once; returns `<workdir>/data`."""
  settings = RunSettings.from_config(run).data
  sources.prepare_data(settings, workdir)
  return os.path.join(workdir, "data")


def _link_shared(seed_dir: str, arm_dir: str) -> None:
  os.makedirs(arm_dir, exist_ok=True)
  for name in SHARED:
    target, link = os.path.join(seed_dir, name), os.path.join(arm_dir, name)
    os.makedirs(target, exist_ok=True)
    if not os.path.lexists(link):
      os.symlink(target, link)


def _persistent_compilation_cache(folder: str) -> None:
  """Arms of one kind differ only in values, so each step compiles once for all seeds (the
  cache only takes effect if nothing was compiled yet in this process)."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def run(config: Any, workdir: str) -> dict:
  """Runs every (seed, arm) not yet finished, then summarises and plots them all."""
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _persistent_compilation_cache(os.path.join(workdir, "jax_cache"))
  run_config = config.run
  teacher_names = RunSettings.from_config(run_config).teacher_order
  data_root = prepare_shared_data(run_config, workdir)
  wall: dict[str, float] = {}
  for seed in config.seeds:
    seed_dir = os.path.join(workdir, f"seed{seed}")
    for index, arm in enumerate(config.arms):
      arm_dir = os.path.join(seed_dir, arm.replace("/", "_"))
      if os.path.exists(os.path.join(arm_dir, "results.json")):
        logging.info("reproduce: seed %d arm %s already done (%s)", seed, arm, arm_dir)
        continue
      _link_shared(seed_dir, arm_dir)
      started = time.time()
      logging.info("reproduce: seed %d arm %s in %s", seed, arm, arm_dir)
      out = train_task.run(
        arm_config(
          run_config, arm, seed, data_root, teachers=index == 0 and run_config.eval.teachers
        ),
        arm_dir,
      )
      if out["preempted"]:
        return {"preempted": True}
      wall[f"seed{seed}/{arm}"] = round(time.time() - started, 1)
  return summarize(config, workdir, teacher_names, wall)


def summarize(config: Any, workdir: str, teacher_names, wall: dict | None = None) -> dict:
  """Reads the answers and scalars of every finished (seed, arm); writes results and plots.

  A model's row averages the seeds it finished (its "seeds" field says how many). `wall` maps
  "seed<s>/<arm>" to seconds; arms missing from it are read from their eval summaries (the wall
  time of the arm's launch before its evaluation).
  """
  seeds, arms = list(config.seeds), list(config.arms)
  wall = dict(wall or {})

  def arm_dir(seed, arm):
    return os.path.join(workdir, f"seed{seed}", arm.replace("/", "_"))

  def finished(paths):
    return [results_lib.read_answers(p) for p in paths if os.path.exists(p)]

  answers: dict[str, list] = {}
  for name in teacher_names:
    answers[f"teacher/{name}"] = finished(
      os.path.join(workdir, f"seed{s}", "teachers", name, "eval", "answers.jsonl") for s in seeds
    )
  answers["student/before"] = finished(
    os.path.join(workdir, f"seed{s}", "student_before", "eval", "answers.jsonl") for s in seeds
  )
  curves, curves_seeds = {}, []
  for arm in arms:
    done = [s for s in seeds if os.path.exists(os.path.join(arm_dir(s, arm), "results.json"))]
    answers[f"student/{arm}"] = finished(
      os.path.join(arm_dir(s, arm), "eval", "answers.jsonl") for s in done
    )
    if arm.startswith("multi/") and done:
      scalars = [
        metrics_lib.read_scalars(os.path.join(arm_dir(s, arm), "tensorboard")) for s in done
      ]
      curves[arm] = comparison.agp_curves(scalars)
      if arm == "multi/agp":
        curves_seeds = done
  for seed in seeds:  # the arms' own record, so a summary-only launch still reports them
    for arm in arms:
      summary_path = os.path.join(arm_dir(seed, arm), "eval_summary.json")
      if f"seed{seed}/{arm}" not in wall and os.path.exists(summary_path):
        with open(summary_path) as f:
          seconds = json.load(f).get("wall_seconds_before_eval")
        if seconds is not None:
          wall[f"seed{seed}/{arm}"] = seconds
  missing = [model for model, runs in answers.items() if not runs]
  if missing:
    logging.warning("reproduce: nothing finished yet for %s", ", ".join(missing))
  answers = {model: runs for model, runs in answers.items() if runs}
  rows = comparison.summarize(answers)
  plots = {
    "accuracy": comparison.plot_accuracy(
      [r for r in rows if r["model"] != "student/before"],
      os.path.join(workdir, "accuracy.png"),
      title=f"Drive-KD at toy scale: held-out accuracy, mean of up to {len(seeds)} seeds",
    )
  }
  if "multi/agp" in curves:
    plots["agp"] = comparison.plot_agp(
      curves["multi/agp"],
      os.path.join(workdir, "agp.png"),
      title=f"AGP diagnostics of multi/agp over training (mean of {len(curves_seeds)} seeds)",
    )
  totals = {arm: comparison.agp_totals(c) for arm, c in curves.items()}
  agp_note = "\n".join(
    [
      "AGP diagnostics (conflict counts summed over logged steps, cosines averaged; mean of"
      " seeds):",
      "",
      *(
        f"- {arm}: " + ", ".join(f"{k.removeprefix('agp/')}={v:.3g}" for k, v in sorted(t.items()))
        for arm, t in totals.items()
      ),
    ]
  )
  text = results_lib.write_results(
    workdir,
    comparison.table_rows(rows),
    title="Drive-KD toy reproduction: held-out accuracy (%), mean [95% CI] over seeds",
    notes=[
      results_lib.SCORING_NOTE,
      "Mean over seeds; 95% CI: percentile bootstrap over questions (2000 resamples, the same"
      " resample applied to every seed).",
      agp_note,
    ],
    columns=("model", *results_lib.CAPABILITIES, "average", "seeds"),
    extra={
      "summary": rows,
      "agp_curves": curves,
      "agp_totals": totals,
      "plots": plots,
      "seeds": seeds,
      "arms": arms,
      "wall_seconds": wall,
    },
  )
  if jax.process_index() == 0:
    print(text, flush=True)
  return {"preempted": False, "rows": rows, "plots": plots, "agp_totals": totals}


def load_results(workdir: str) -> dict:
  """The `results.json` a run left in `workdir`."""
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)
