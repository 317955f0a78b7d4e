"""Append-only, resumable JSONL files of per-item records (answers, judgments).

One JSON object per line, keyed by a field (`record_id` by default). Each record is written and
flushed (and, with `durable=True`, fsynced) as soon as it is appended, so a killed run loses at
most the line it was writing. Reopening a file resumes it: a torn last line (no newline) is cut
off, every complete line is read back, its key marked done; appending a key that is already
there is an error, so nothing is duplicated. A complete line that is not a JSON object with the
key is an error naming the file, the line and the field (never skipped silently).

DriveBench answers (`answers_path(workdir, setting)`) are the release record plus the model's
prediction, `{scene_token, frame_token, question_type, question, answer, tag, image_path, ...,
"pred": str, "record_id": str}`: what the DriveBench toolkit's evaluator reads.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from absl import logging

from drivekd_jax.data import records as rec


class JsonlRecords:
  """A resumable append-only JSONL file of records keyed by `key_field` (module docstring).

  Example:
    with JsonlRecords(path) as out:
      for record_id, item in items:
        if record_id not in out:
          out.append({**item, "record_id": record_id, "pred": answer(item)})
  """

  def __init__(self, path: str | os.PathLike, *, key_field: str = "record_id", durable=False):
    self.path = Path(path)
    self.key_field = key_field
    self.durable = durable
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._keys: set[str] = set()
    self._lock = threading.Lock()
    self.dropped_bytes = self._repair_and_load()
    self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

  def _repair_and_load(self) -> int:
    if not self.path.exists():
      return 0
    data = self.path.read_bytes()
    complete = data.rfind(b"\n") + 1
    dropped = len(data) - complete
    if dropped:
      logging.warning("%s: cut a torn last line of %d bytes (a killed write)", self.path, dropped)
      with open(self.path, "r+b") as f:
        f.truncate(complete)
    for number, line in enumerate(data[:complete].decode("utf-8").splitlines(), start=1):
      if not line.strip():
        continue
      key = self._key_of(_parse_line(line, self.path, number, self.key_field), number)
      if key in self._keys:
        raise rec.RecordError(
          f"duplicate {self.key_field} {key!r}", file=self.path, index=number, field=self.key_field
        )
      self._keys.add(key)
    return dropped

  def _key_of(self, record: Mapping[str, Any], number: int | None = None) -> str:
    key = record.get(self.key_field)
    if not isinstance(key, str) or not key:
      raise rec.RecordError(
        f"expected a non-empty string {self.key_field}, got {key!r}",
        file=self.path,
        index=number,
        field=self.key_field,
      )
    return key

  def __contains__(self, key: str) -> bool:
    return key in self._keys

  def __len__(self) -> int:
    return len(self._keys)

  @property
  def keys(self) -> frozenset[str]:
    return frozenset(self._keys)

  def append(self, record: Mapping[str, Any]) -> None:
    """Writes one record and flushes it; its key must be new. Thread-safe."""
    key = self._key_of(record)
    line = json.dumps(record, ensure_ascii=False) + "\n"
    with self._lock:
      if key in self._keys:
        raise ValueError(f"{self.path}: {self.key_field} {key!r} is already written")
      self._file.write(line)
      self._file.flush()
      if self.durable:
        os.fsync(self._file.fileno())
      self._keys.add(key)

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> JsonlRecords:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _parse_line(line: str, path: Path, number: int, key_field: str) -> dict[str, Any]:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise rec.RecordError(f"malformed JSON line: {e.msg}", file=path, index=number) from None
  if not isinstance(record, dict):
    raise rec.RecordError(
      f"expected a JSON object, got {type(record).__name__}", file=path, index=number
    )
  return record


def read_jsonl(path: str | os.PathLike, *, key_field: str = "record_id") -> list[dict[str, Any]]:
  """The complete records of a JSONL file, in file order (a torn last line is ignored)."""
  path = Path(path)
  if not path.exists():
    raise rec.RecordError("file not found", file=path, kind="missing_file")
  text = path.read_bytes().decode("utf-8")
  complete = text[: text.rfind("\n") + 1]
  out = []
  for number, line in enumerate(complete.splitlines(), start=1):
    if line.strip():
      record = _parse_line(line, path, number, key_field)
      if key_field not in record:
        raise rec.RecordError("missing field", file=path, index=number, field=key_field)
      out.append(record)
  return out


def answers_path(workdir: str | os.PathLike, setting: str) -> Path:
  """`<workdir>/drivebench/<setting>/answers.jsonl`."""
  return Path(workdir) / "drivebench" / setting / "answers.jsonl"


def release_items(json_path: str | os.PathLike) -> list[tuple[str, dict[str, Any]]]:
  """The items of a DriveBench release JSON with their record ids, in file order.

  The id is `<scene_token>_<frame_token>_<i>`, `i` the item's index within its frame, as the
  DriveBench TFDS builder numbers its records.
  """
  data = rec.load_json(json_path)
  if not isinstance(data, list):
    raise rec.RecordError(f"expected a JSON list of QAs, got {type(data).__name__}", file=json_path)
  out, seen = [], {}
  for index, item in enumerate(data):
    error = rec.RecordErrorFactory(json_path, index, None)
    scene = rec.require(item, "scene_token", str, error=error)
    frame = rec.require(item, "frame_token", str, error=error)
    i = seen.get(frame, 0)
    seen[frame] = i + 1
    out.append((f"{scene}_{frame}_{i}", item))
  return out


def answer_record(record_id: str, item: Mapping[str, Any], pred: str) -> dict[str, Any]:
  """The answers-file line of one item: the release record, its id and the prediction."""
  if not isinstance(pred, str):
    raise TypeError(f"{record_id}: pred must be a str, got {type(pred).__name__}")
  return {**item, "record_id": record_id, "pred": pred}


def pending(
  items: Iterable[tuple[str, Mapping[str, Any]]], done: JsonlRecords
) -> list[tuple[str, Mapping[str, Any]]]:
  """The (record_id, item) pairs not yet in `done`, in order."""
  return [(record_id, item) for record_id, item in items if record_id not in done]
