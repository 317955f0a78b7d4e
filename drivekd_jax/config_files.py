"""Config files (`get_config(arg)`) loaded by path, as `launch.py --config=FILE[:ARG]` does.

    config = load_config("configs/drivekd/reproduce.py:small")

For notebooks and tests that run a task in process; relative paths are taken from the current
folder.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any


def load_config(spec: str) -> Any:
  """The `get_config(arg)` of `FILE[:ARG]` (without ARG: `get_config()`)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {os.path.abspath(path)} does not exist")
  module_spec = importlib.util.spec_from_file_location(
    "config_" + os.path.splitext(os.path.basename(path))[0], path
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path} defines no get_config()")
  return module.get_config(arg) if arg else module.get_config()
