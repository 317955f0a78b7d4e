"""Task "drivekd.heldout": the held-out evaluation of the student in a training workdir.

    python launch.py --config=configs/drivekd/demo.py:eval --workdir=DIR

(or any training config with `--config.task=drivekd.heldout`). Rebuilds the data and the student
from the config (teachers are not needed), restores the student's parameters from the latest
checkpoint in `<workdir>/checkpoints` (or `eval.checkpoint_dir`), answers the held-out questions
and writes `eval_summary.json` and `eval/answers.jsonl`. A workdir without a checkpoint is an
error: nothing is trained here.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging

from drivekd_jax.data import sources
from drivekd_jax.eval import heldout
from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import experiment as experiment_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.settings import RunSettings


def run(config: Any, workdir: str) -> dict:
  """Evaluates the student of the latest checkpoint; returns the summary."""
  workdir = os.path.abspath(workdir)
  settings = RunSettings.from_config(config)
  directory = os.path.abspath(settings.eval.checkpoint_dir or os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(
      f"no checkpoints folder {directory}: train first (task drivekd.train), or point "
      "--config.eval.checkpoint_dir at a training run's checkpoints"
    )
  ckpt_lib.quiet_orbax_info_logs()
  mesh = sharding_lib.make_mesh(settings.mesh)
  rules = sharding_lib.rules_from_config(settings.sharding_rules)
  data = sources.prepare_data(settings.data, workdir)
  student, student_cfg = experiment_lib.build_model(
    settings.student, data.tokenizer, mesh, rules, settings.seed
  )
  model, step = experiment_lib.restore_student(settings, student, directory)
  logging.info("evaluating the student of checkpoint step %d in %s", step, directory)
  return heldout.evaluate(
    model,
    experiment_lib.processor_for(settings, data.tokenizer, student_cfg),
    data.tokenizer,
    data.test_source,
    workdir,
    batch_size=settings.eval.batch_size,
    buckets=data.pipeline_config.buckets,
    max_images=data.pipeline_config.max_images,
    max_new_tokens=settings.eval.max_new_tokens,
    max_examples=settings.eval.max_examples,
    source_name=data.test_name,
    facts={"checkpoint_step": step, "checkpoint_dir": directory},
  )
