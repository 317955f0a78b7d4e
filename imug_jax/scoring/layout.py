"""Where rollout outputs and score records live (the official output layout).

  <model_dir>/<domain>/<subdomain>/question_<id>/ holds
    result.json                  the rollout (the sample plus model_response per task)
    turn_<t>_output.png          the generated image of turn t
    scores/turn_<t>.json         the per-turn score record
    scores/turn_<t>.dynamic.json the resolved dynamic answer of turn t

Score records sit next to result.json so that a rerun finds and keeps what is already scored.
Every name joined here (the sample key's parts, image names read from a result.json) is checked to
be a plain path component, so nothing is read or written outside the model folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from drivekd_jax import paths
from imug_jax.data.schema import Sample, SampleKey, parse_sample

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def question_dir(model_dir: str | Path, key: SampleKey) -> Path:
  """`<model_dir>/<domain>/<subdomain>/question_<id>`; ValueError if a part is not a plain name."""
  return paths.inside(
    model_dir, key.domain, key.subdomain, f"question_{key.sample_id}", where=f"sample {key}"
  )


def score_path(model_dir: str | Path, key: SampleKey, turn: int, kind: str = "") -> Path:
  suffix = f".{kind}" if kind else ""
  return question_dir(model_dir, key) / "scores" / f"turn_{turn}{suffix}.json"


def load_result(model_dir: str | Path, key: SampleKey) -> Sample | None:
  """Reads a sample's result.json (validated like benchmark records); None if it is absent."""
  path = question_dir(model_dir, key) / "result.json"
  if not path.exists():
    return None
  try:
    raw = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as error:
    raise ValueError(f"{path}: invalid JSON: {error}") from error
  return parse_sample(raw, path=path)


def find_output_image(
  model_dir: str | Path, key: SampleKey, turn: int, result: Sample | None = None
) -> Path | None:
  """The model's image for `turn`: turn_<t>_output.png, else the file named by model_response."""
  folder = question_dir(model_dir, key)
  direct = folder / f"turn_{turn}_output.png"
  if direct.exists():
    return direct
  if result is not None:
    for task in result.tasks:
      name = task.model_response
      if (
        task.turn == turn
        and name
        and paths.path_component_problem(name) is None
        and Path(name).suffix.lower() in IMAGE_SUFFIXES
      ):
        candidate = folder / name
        if candidate.is_file():
          return candidate
  return None


def find_input_image(images_dir: str | Path, filenames: tuple[str, ...]) -> Path | None:
  """The first of a turn's input images that exists under images/ (the official rule)."""
  for name in filenames:
    candidate = paths.inside(images_dir, name, where="input image")
    if candidate.exists():
      return candidate
  return None


def read_record(path: Path) -> dict[str, Any] | None:
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError:
    return None  # A torn write from an interrupted run: score the turn again.


def write_record(path: Path, record: dict[str, Any]) -> None:
  """Writes JSON atomically (temp file + rename) so an interrupted run never leaves half a file."""
  paths.write_text_atomic(path, json.dumps(record, indent=2, ensure_ascii=False))
