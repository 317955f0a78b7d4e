"""The checkout under test, for tests that start Python in a subprocess.

A subprocess started from another folder (or as `python tests/x.py`, which puts `tests/` first on
`sys.path`) imports the installed package, not this checkout's code; `checkout_env` puts the
repository root first on `PYTHONPATH`, and callers run with `cwd=REPO`.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def checkout_env(**extra: str) -> dict[str, str]:
  """The current environment with the repository root first on `PYTHONPATH`, plus `extra`."""
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
  env["PYTHONPATH"] = os.pathsep.join(
    [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  )
  return env
