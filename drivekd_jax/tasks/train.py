"""Task "drivekd.train": distil (or resume distilling) the configured student, then evaluate it.

    python launch.py --config=configs/drivekd/demo.py --workdir=DIR

Builds the experiment (`train.experiment`: data, student, teachers warmed if asked, step), runs
`train.loop.train_loop` until `num_steps` or a stop request, then answers the held-out questions
with the student (and every teacher when `eval.teachers`) and writes `eval_summary.json`.
With `export_dir` set the trained student is also written there in the HF layout.
A fresh run (no checkpoint yet) first answers them with the untrained student
(`<workdir>/student_before/`). Last it prints the per-capability accuracy of every model
answered (`eval.results`: teachers, student before, student after) and writes it to
`<workdir>/results.json` and `results.md`.
A stop request (SIGTERM) saves and returns `{"preempted": True}`; `launch.py` then exits 143.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging

from drivekd_jax.data import pipeline as pipeline_lib
from drivekd_jax.eval import heldout
from drivekd_jax.eval import results as results_lib
from drivekd_jax.models import save_pretrained
from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import experiment as experiment_lib
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train.loop import LoopSettings, train_loop
from drivekd_jax.train.settings import RunSettings
from drivekd_jax.train.warmup import Preempted


def evaluate_model(
  exp: experiment_lib.Experiment,
  model: Any,
  processor: Any,
  out_dir: str,
  facts: Mapping[str, Any] | None = None,
) -> dict:
  """Answers and scores the test split with `model`; writes the summary files into `out_dir`."""
  ev = exp.settings.eval
  pipeline_config = exp.data.pipeline_config
  return heldout.evaluate(
    model,
    processor,
    exp.data.tokenizer,
    exp.data.test_source,
    out_dir,
    batch_size=ev.batch_size,
    buckets=pipeline_config.buckets,
    max_images=pipeline_config.max_images,
    max_new_tokens=ev.max_new_tokens,
    max_examples=ev.max_examples,
    source_name=exp.data.test_name,
    facts=facts,
  )


def evaluate_teachers(exp: experiment_lib.Experiment, workdir: str) -> dict:
  """Scores every teacher like the student; summaries go to `<workdir>/teachers/<name>/`.

  Returns:
    {teacher name: its "overall" scores}.
  """
  out = {}
  for i, name in enumerate(exp.settings.teacher_order):
    processor = experiment_lib.processor_for(
      exp.settings, exp.data.tokenizer, exp.distillation.teacher_configs[i]
    )
    facts = {"teacher": name, "warmed_up": name in exp.warmed_teachers}
    folder = os.path.join(workdir, "teachers", name)
    summary = evaluate_model(exp, exp.teacher(i), processor, folder, facts)
    out[name] = summary["by_capability"]["overall"]
  return out


def _write_config(config: Any, workdir: str) -> None:
  if jax.process_index() == 0:
    text = (
      config.to_json_best_effort(indent=2)
      if hasattr(config, "to_json_best_effort")
      else json.dumps(config, indent=2, default=str)
    )
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(text)


def run(config: Any, workdir: str) -> dict:
  """Trains (or resumes) the configured Drive-KD student, then evaluates it.

  Returns:
    {"step", "preempted", "resumed_from", "nonfinite_total", "eval" (summary or None)}.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.quiet_orbax_info_logs()
  started = time.time()
  settings = RunSettings.from_config(config)
  try:
    exp = experiment_lib.build_experiment(settings, workdir)
  except Preempted as stop:
    logging.warning("%s", stop)
    return {"step": 0, "preempted": True, "resumed_from": None, "nonfinite_total": 0, "eval": None}
  _write_config(config, workdir)
  if settings.eval.after_training:
    _evaluate_before(exp, workdir)
  result = _distil(exp, workdir)
  if settings.export_dir and not result.preempted:
    export_student(exp, result.state, settings.export_dir, workdir)
  out = {
    "step": result.step,
    "preempted": result.preempted,
    "resumed_from": result.resumed_from,
    "nonfinite_total": result.nonfinite_total,
    "eval": None,
  }
  if result.preempted or not settings.eval.after_training:
    return out
  teacher_scores = {"teachers": evaluate_teachers(exp, workdir)} if settings.eval.teachers else {}
  out["eval"] = evaluate_model(
    exp,
    exp.student(result.state),
    exp.processor,
    workdir,
    facts={
      **teacher_scores,
      "checkpoint_step": result.step,
      "train_source": exp.data.train_name,
      "student": settings.student.checkpoint or settings.student.preset,
      "nonfinite_total": result.nonfinite_total,
      "wall_seconds_before_eval": round(time.time() - started, 1),
    },
  )
  if jax.process_index() == 0:
    files = results_lib.run_answer_files(workdir, settings.teacher_order)
    rows = results_lib.rows_from_answer_files(files)
    text = results_lib.write_results(
      workdir,
      rows,
      title="Held-out accuracy (%) by capability",
      notes=[results_lib.SCORING_NOTE, f"{len(exp.data.test_source)} test questions; {workdir}"],
    )
    print(text, flush=True)
    out["results"] = rows
  return out


def _evaluate_before(exp: experiment_lib.Experiment, workdir: str) -> None:
  """Answers the test questions with the initial student, once, before any checkpoint."""
  folder = os.path.join(workdir, "student_before")
  if os.path.exists(os.path.join(folder, "eval_summary.json")):
    return
  checkpoints = os.path.join(workdir, "checkpoints")
  if os.path.isdir(checkpoints) and any(p.isdigit() for p in os.listdir(checkpoints)):
    return  # resumed: the initial student is gone
  state = exp.distillation.state
  evaluate_model(exp, exp.student(state), exp.processor, folder, facts={"checkpoint_step": 0})


def export_student(exp: experiment_lib.Experiment, state: Any, path: str, workdir: str) -> str:
  """Writes the student of `state` in the HF layout (`models.save_pretrained`), with the
  tokenizer files of the student's checkpoint, of `data.tokenizer`, or the run's own BPE."""
  settings = exp.settings
  tokenizer = settings.student.checkpoint or settings.data.tokenizer
  tokenizer_dir = tokenizer or os.path.join(workdir, "data", "tokenizer")
  if os.path.isfile(tokenizer_dir):
    tokenizer_dir = os.path.dirname(tokenizer_dir)
  if jax.process_index() == 0:
    save_pretrained(exp.student(state), path, tokenizer_dir=tokenizer_dir)
    logging.info("exported the student to %s", path)
  return path


def _distil(exp: experiment_lib.Experiment, workdir: str):
  """The distillation loop of an experiment (resumes from `<workdir>/checkpoints`)."""
  settings, data, distillation = exp.settings, exp.data, exp.distillation
  num_losses = 1 + len(settings.distill.active)
  micro_per_step = data.pipeline_config.batch_size * jax.process_count()
  micro_per_step //= settings.distill.microbatch_size

  def flops_fn(host_batch):
    batch, length = host_batch["input_ids"].shape
    return metrics_lib.train_step_flops(
      distillation.student_config,
      distillation.teacher_configs,
      batch_size=batch * jax.process_count(),
      seq_len=length,
      images_per_example=host_batch["pixel_values"].shape[1],
      num_cotangents=num_losses,
      image_size=host_batch["pixel_values"].shape[2],
    )

  def host_scalars(step):
    # The learning rate of the most recent optimizer update (updates every grad_accum_steps).
    updates = max(0, step * micro_per_step // settings.distill.grad_accum_steps - 1)
    return {"learning_rate": float(exp.schedule(updates))}

  logging.info(
    "training: %d steps of %d examples from %s; %d teachers; capabilities %s",
    settings.num_steps,
    data.pipeline_config.batch_size * jax.process_count(),
    data.train_name,
    len(distillation.teacher_configs),
    settings.distill.active,
  )
  pipeline = pipeline_lib.TrainingPipeline(
    data.train_source, exp.processor, data.pipeline_config, source_name=data.train_name
  )
  return train_loop(
    settings=LoopSettings.of_run(settings),
    workdir=workdir,
    mesh=exp.mesh,
    rules=exp.rules,
    state=distillation.state,
    state_shardings=distillation.state_shardings,
    step_fn=distillation.step_fn,
    data=pipeline.iterator(),
    rng=jax.random.key(settings.seed + 7),
    extra=(distillation.teacher_states,),
    extra_shardings=(distillation.teacher_shardings,),
    flops_fn=flops_fn,
    pad_id=data.tokenizer.pad_id,
    metadata={"train_source": data.train_name},
    check_state=False,  # the Drive-KD step skips non-finite micro-steps itself
    host_scalars=host_scalars,
  )
