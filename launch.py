r"""Entry point for every job: `python launch.py --config=configs/<x>.py[:arg] --workdir=DIR`.

The config's `task` field picks the job; `--config.key=value` overrides any field. The logic
lives in the libraries (each task is a function `run(config, workdir)`), so this file stays short.
"""

import importlib
import os

from absl import app, flags, logging
from ml_collections import config_flags

# task name -> "module:function"; each function takes (config, workdir).
TASKS = {
  "drivekd.generate": "drivekd_jax.models.demo:run",
  "drivekd.train": "drivekd_jax.train.trainer:run",
  "drivekd.eval": "drivekd_jax.eval.driving:run",
  "imug.eval": "imug_jax.run:run",
}

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")


def resolve_task(name: str):
  """Returns the function registered for a task name."""
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known tasks: {sorted(TASKS)}")
  module_name, fn_name = TASKS[name].split(":")
  return getattr(importlib.import_module(module_name), fn_name)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(workdir, exist_ok=True)
  if config.get("jax_distributed", False):
    from drivekd_jax.train import distributed

    distributed.initialize(config)
  logging.info("task %s, workdir %s", config.task, workdir)
  resolve_task(config.task)(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
