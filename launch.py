r"""Entry point for every job: `python launch.py --config=configs/<x>.py[:arg] --workdir=DIR`.

The config's `task` field picks the job; `--config.key=value` overrides any field. The logic
lives in the libraries (each task is a function `run(config, workdir)` in `drivekd_jax.tasks`
or `imug_jax.run`), so this file stays short. A run stopped by SIGTERM saves its progress and
exits with status 143, so a scheduler can tell it from a finished one.
"""

import ast
import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from drivekd_jax.train.checkpoint import PREEMPTED_EXIT_CODE

# task name -> "module:function"; each function takes (config, workdir).
TASKS = {
  "drivekd.generate": "drivekd_jax.tasks.generate:run",
  "drivekd.train": "drivekd_jax.tasks.train:run",
  "drivekd.heldout": "drivekd_jax.tasks.evaluate:run",
  "drivekd.eval": "drivekd_jax.tasks.eval_drivebench:run",
  "drivekd.reproduce": "drivekd_jax.tasks.reproduce:run",
  "imug.eval": "imug_jax.run:run",
}

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Experiment config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and outputs.")


def resolve_task(name: str):
  """Returns the function registered for a task name."""
  if name not in TASKS:
    raise app.UsageError(f"config.task={name!r} is not a task; known tasks: {sorted(TASKS)}")
  module_name, fn_name = TASKS[name].split(":")
  return getattr(importlib.import_module(module_name), fn_name)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a bad config file, key or value reported in one line (exit 2)."""
  try:
    remaining = flags.FLAGS(argv)
    config = _CONFIG.value
    if config is not None:
      from drivekd_jax.train.settings import check_config

      check_config(config)
  except (flags.Error, AttributeError, KeyError, OSError, TypeError, ValueError) as error:
    text = str(error)
    if text[:1] in "'\"" and text[-1:] == text[:1]:  # ml_collections quotes its messages
      text = ast.literal_eval(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):  # an error inside the config file
      lines = [lines[0].split(": Error whilst")[0] + ":", lines[-1]]
    message = " ".join(lines)
    if isinstance(error, AttributeError | KeyError):
      message = f"no config key {message}"
    sys.stderr.write(f"launch.py: bad configuration: {message}\n")
    sys.exit(2)
  return remaining


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config is None or _WORKDIR.value is None:
    raise app.UsageError("--config and --workdir are required")
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(workdir, exist_ok=True)
  task = resolve_task(config.task)
  if config.get("jax_distributed", False):
    from drivekd_jax.train import distributed

    distributed.initialize(config)
  logging.info("task %s, workdir %s", config.task, workdir)
  result = task(config, workdir)
  if isinstance(result, dict) and result.get("preempted"):
    sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
