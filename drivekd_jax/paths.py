"""Paths built from untrusted names, files written whole, and folders built whole.

Every identifier that becomes a path (a benchmark's domain, subdomain or sample id, an image
name, a model name, a setting, a checkpoint's `weight_map` entry) must be a plain path component:
one non-empty name, not `.` or `..`, without `/`, `\\`, NUL or a drive prefix, so that joining it
to an output folder can never leave that folder.

Files are written through a temporary file and a rename; folders that are expensive to make
(a generated benchmark) are built in a temporary sibling, marked complete, and renamed into place,
so an interrupted first start leaves nothing that a later start takes for finished.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

COMPLETE_MARKER = ".complete"
_DRIVE = re.compile(r"^[A-Za-z]:")


def path_component_problem(name: object) -> str | None:
  """Why `name` is not a plain path component, or None when it is one."""
  if not isinstance(name, str):
    return f"must be a string, got {type(name).__name__}"
  if name in ("", ".", ".."):
    return f"must be a plain name, got {name!r}"
  for bad in ("/", "\\", "\0"):
    if bad in name:
      return f"must be a plain name without {bad!r}, got {name!r}"
  if _DRIVE.match(name):
    return f"must be a plain name without a drive prefix, got {name!r}"
  return None


def check_path_component(name: object, where: str) -> str:
  """Returns `name` if it is a plain path component; else ValueError naming `where`."""
  problem = path_component_problem(name)
  if problem is not None:
    raise ValueError(f"{where}: {problem}")
  return name  # type: ignore[return-value]


def inside(root: str | os.PathLike, *components: str, where: str = "path") -> Path:
  """`root / c1 / c2 ...` after checking each component, and that the result stays in `root`."""
  for component in components:
    check_path_component(component, where)
  base = Path(os.path.abspath(root))
  path = base.joinpath(*components)
  if os.path.commonpath([base, os.path.abspath(path)]) != str(base):
    raise ValueError(f"{where}: {path} is outside {base}")
  return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
  """Writes a file via a temp file in the same folder and a rename: all of it or nothing."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(handle, "wb") as file:
      file.write(data)
    os.replace(temp, path)
  except BaseException:
    Path(temp).unlink(missing_ok=True)
    raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def is_complete(folder: str | os.PathLike) -> bool:
  """Whether `folder` was finished by `build_folder` (it holds the completion marker)."""
  return (Path(folder) / COMPLETE_MARKER).is_file()


def build_folder(target: str | os.PathLike, build: Callable[[Path], object]) -> Path:
  """Makes `target` with `build(temp_folder)` unless it is already complete; returns `target`.

  `build` writes into an empty temporary sibling; the marker is added and the folder renamed into
  place only after `build` returns, so `target` exists only when complete. A `target` without the
  marker (an older layout, or a folder someone else wrote) is moved aside to
  `<target>.incomplete-<time>`, never deleted, and built again.
  """
  target = Path(os.path.abspath(target))
  if is_complete(target):
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
  try:
    build(temp)
    (temp / COMPLETE_MARKER).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
    if target.exists():
      aside = target.with_name(f"{target.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
      logging.warning("%s has no completion marker; moving it to %s and rebuilding", target, aside)
      os.replace(target, aside)
    os.replace(temp, target)
  except BaseException:
    shutil.rmtree(temp, ignore_errors=True)
    raise
  return target


def default_workdir(task: str) -> Path:
  """A fresh folder for one run of `task`, private to this user: `<tmp>/<task>-<user>-<random>`."""
  check_path_component(task, "task")
  try:
    user = getpass.getuser()
  except (KeyError, OSError):  # No name for this uid (some containers).
    user = str(os.getuid()) if hasattr(os, "getuid") else "user"
  if path_component_problem(user) is not None:
    user = "user"
  return Path(tempfile.mkdtemp(prefix=f"{task}-{user}-"))
