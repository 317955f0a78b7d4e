"""The common driving-QA record: schema, tag parsing, image paths, errors, bad-record accounting.

Every TFDS builder of this package (`drivebench.DriveBench`, `drivelm.DriveLM`,
`drivekd_qa.DriveKDQA`) writes one record per question-answer pair with the features of
`record_features()`, stored as `array_record` without TensorFlow. Read back through
`builder.as_data_source(split)` (or `tfds.data_source(...)`) a record is a dict:

- `record_id` (bytes): stable id, `<scene>_<frame>_<i>` (DriveLM, DriveBench; i = the QA's
  index within its frame) or the item's `id` / `<file stem>_<index>` (Drive-KD).
- `source_index` (int; stored int64): position of the QA in the source file, flattened.
- `scene_token`, `frame_token` (bytes): nuScenes tokens; b"" where the source has none.
- `question_type` (bytes): as released (DriveBench/DriveLM: perception, prediction, planning,
  behavior; Drive-KD: perception, reasoning, planning after alias normalisation); unknown types
  are kept verbatim.
- `capability` (bytes): perception, reasoning, planning or other (`capability_of`).
- `capability_id` (int; stored int32): 0 perception, 1 reasoning, 2 planning, 3 other.
- `question`, `answer` (bytes, UTF-8): the text as released. Drive-KD questions keep their
  `<image>` slots (as many as images); the other sources have none.
- `tag` (list of np.int32): DriveLM/DriveBench metric tags (0 accuracy, 1 GPT, 2 language,
  3 match); [] where absent.
- `cameras` (list of bytes): the camera of each image, in image order.
- `images` (list of bytes): the encoded images (JPEG/PNG file bytes), in `cameras` order.
- `image_paths` (list of bytes): where each image was read, relative to the image root.
- `objects` (dict of equal-length lists): the `<cK,CAM,x,y>` refs of question and answer, first
  mention first: `ref` bytes, `index` np.int32 (K), `camera` bytes, `x`, `y` np.float32 as
  written, `x_norm`, `y_norm` np.float32 normalised to [0, 1] (DriveLM pixels / (1600, 900)).
- `key_objects` (dict of equal-length lists): DriveLM `key_object_infos` (DriveBench: from
  `visual_description.json`): `ref`, `category`, `status`, `visual_description` bytes, `bbox`
  np.float32 [4] in pixels (NaN where absent).
- `scene_description` (bytes): DriveLM scene description; b"" where absent.

`decode_image(bytes) -> uint8 [H, W, 3]` decodes one image with Pillow (no TensorFlow).

Images are stored encoded, not as `tfds.features.Image`: the contract with the input pipeline is
"encoded image bytes" and the processor resizes every view to 448x448 anyway. (We verified that
`Sequence(Image(shape=(None, None, 3)))` also reads back TF-free, as decoded arrays; and that
`tfds.decode.SkipDecoding` does not work with data sources, so bytes could not be had from an
`Image` feature at read time.)

Capability mapping (`capability_of`) is **our inference**, in `docs/drivekd_method.md` §1
(Drive-KD's Fig. 13 grades the behavior MCQ as Reasoning): perception -> perception; prediction
and behavior -> reasoning; planning -> planning; Drive-KD's own reasoning -> reasoning; anything
else (e.g. DriveBench's corruption "robustness" questions) -> other. Unknown types are kept.

Bad input raises `RecordError`, which names the file, the record (index and token) and the field.
Builders given `skip_bad_records=True` skip such records instead, count them in a
`BadRecordLog` and report the counts and the first messages in `builder.info.metadata`
(key `"bad_records"`, one entry per split) and in the log; nothing is dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

CAMERAS = (
  "CAM_FRONT",
  "CAM_FRONT_LEFT",
  "CAM_FRONT_RIGHT",
  "CAM_BACK",
  "CAM_BACK_LEFT",
  "CAM_BACK_RIGHT",
)
"""nuScenes cameras in the order DriveBench's system prompt states them."""

CAPABILITIES = ("perception", "reasoning", "planning", "other")

_CAPABILITY_OF_TYPE = {
  "perception": "perception",
  "prediction": "reasoning",
  "behavior": "reasoning",
  "reasoning": "reasoning",
  "planning": "planning",
}

NUSCENES_IMAGE_WIDTH = 1600.0
NUSCENES_IMAGE_HEIGHT = 900.0

# The official DriveBench camera filter (toolkit tools/preprocess.py): the camera of every tag.
TAG_CAMERA_PATTERN = re.compile(r"<[^,]+,([^,]+),[^>]+>")
# A full object tag `<cK,CAM,x,y>` with numeric coordinates.
OBJECT_TAG_PATTERN = re.compile(
  r"<c(\d+),([A-Za-z0-9_]+),\s*(-?\d+(?:\.\d+)?),\s*(-?\d+(?:\.\d+)?)>"
)
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class RecordError(ValueError):
  """A bad input record. Names the file, the record (index and token) and the field."""

  def __init__(
    self,
    reason: str,
    *,
    file: str | os.PathLike | None,
    index: int | None = None,
    token: str | None = None,
    field: str | None = None,
    kind: str = "invalid",
  ):
    self.reason = reason
    self.file = str(file) if file is not None else None
    self.index = index
    self.token = token
    self.field = field
    self.kind = kind
    where = [f"file {self.file}" if self.file else "unknown file"]
    if index is not None:
      where.append(f"record {index}")
    if token:
      where.append(f"token {token}")
    if field:
      where.append(f"field {field!r}")
    super().__init__(f"{', '.join(where)}: {reason}")


def capability_of(question_type: str) -> str:
  """Maps a question type to a Drive-KD capability (our inference; see the module docstring)."""
  return _CAPABILITY_OF_TYPE.get(question_type.strip().lower(), "other")


def capability_id(capability: str) -> int:
  """Index of a capability in `CAPABILITIES` (the processor's int32 `capability`)."""
  return CAPABILITIES.index(capability)


def tagged_cameras(question: str) -> list[str]:
  """Cameras named by tags in `question`, as the official regex finds them, first mention first."""
  return list(dict.fromkeys(c.strip() for c in TAG_CAMERA_PATTERN.findall(question)))


def filter_cameras(question: str, available: Sequence[str]) -> list[str]:
  """The official DriveBench filter: the tagged cameras, else all; in `CAMERAS` order.

  Args:
    question: the question text.
    available: the cameras the record has images for.

  Returns:
    The cameras to keep, ordered as in `CAMERAS`.

  Raises:
    KeyError: naming the first tagged camera the record has no image for.
  """
  tagged = tagged_cameras(question)
  if not tagged:
    return [c for c in CAMERAS if c in available]
  for camera in tagged:
    if camera not in available:
      raise KeyError(camera)
  return [c for c in CAMERAS if c in tagged]


@dataclasses.dataclass(frozen=True)
class ObjectRef:
  """One parsed `<cK,CAM,x,y>` reference."""

  ref: str
  index: int
  camera: str
  x: float
  y: float
  x_norm: float
  y_norm: float


def parse_object_refs(text: str, *, pixel_coordinates: bool) -> list[ObjectRef]:
  """Parses the `<cK,CAM,x,y>` tags of `text` (unique, first mention first).

  Args:
    text: question or answer text.
    pixel_coordinates: True if x, y are nuScenes pixels (DriveLM): the normalised values are
      x / 1600 and y / 900. False if they are already normalised (DriveBench, Drive-KD).

  Returns:
    The references; unknown camera names are returned as written (see `check_cameras`).
  """
  refs = {}
  for match in OBJECT_TAG_PATTERN.finditer(text):
    ref = match.group(0)
    if ref in refs:
      continue
    x, y = float(match.group(3)), float(match.group(4))
    if pixel_coordinates:
      x_norm, y_norm = x / NUSCENES_IMAGE_WIDTH, y / NUSCENES_IMAGE_HEIGHT
    else:
      x_norm, y_norm = x, y
    refs[ref] = ObjectRef(
      ref=ref,
      index=int(match.group(1)),
      camera=match.group(2),
      x=x,
      y=y,
      x_norm=round(x_norm, 4),
      y_norm=round(y_norm, 4),
    )
  return list(refs.values())


def select_cameras(
  question: str, image_paths: Mapping[str, Any], *, error: RecordErrorFactory, field: str
) -> list[str]:
  """`filter_cameras` for a record: a tagged camera missing from `image_paths` is a `RecordError`
  on `field` (kind `missing_field`)."""
  try:
    return filter_cameras(question, list(image_paths))
  except KeyError as e:
    raise error(
      f"the question tags camera {e.args[0]} but {field} has no such view",
      field=field,
      kind="missing_field",
    ) from None


def check_cameras(names: Iterable[str], *, error: RecordErrorFactory, field: str) -> None:
  """Raises a `RecordError` for the first camera name that is not a nuScenes camera."""
  for name in names:
    if name not in CAMERAS:
      raise error(f"unknown camera {name!r} (known: {', '.join(CAMERAS)})", field=field)


class RecordErrorFactory:
  """Makes `RecordError`s for one record: `error(reason, field=...)`."""

  def __init__(self, file, index: int | None, token: str | None):
    self.file, self.index, self.token = file, index, token

  def __call__(self, reason: str, *, field: str | None = None, kind: str = "invalid"):
    return RecordError(
      reason, file=self.file, index=self.index, token=self.token, field=field, kind=kind
    )


def split_paths_from(
  json_path: str | os.PathLike | None, split_paths: Mapping[str, str | os.PathLike] | None
) -> dict[str, Path] | None:
  """The builders' `json_path=` (the `train` file) or `split_paths=` as absolute paths per split;
  None when neither is given (the builder then looks in its manual dir)."""
  if json_path is not None and split_paths is not None:
    raise ValueError("pass json_path or split_paths, not both")
  if split_paths is not None:
    return {split: Path(path).absolute() for split, path in split_paths.items()}
  return {"train": Path(json_path).absolute()} if json_path is not None else None


def load_json(path: str | os.PathLike) -> Any:
  """Reads a JSON file; a missing or malformed file raises `RecordError` naming it."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8")
  except FileNotFoundError:
    raise RecordError("file not found", file=path, kind="missing_file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise RecordError(f"cannot read: {e}", file=path, kind="unreadable_file") from None
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise RecordError(
      f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}",
      file=path,
      kind="malformed_json",
    ) from None


def require(item: Mapping[str, Any], key: str, types, *, error: RecordErrorFactory, field=None):
  """`item[key]`, checked to exist and to be of `types`, else a `RecordError` naming the field."""
  field = field or key
  if not isinstance(item, Mapping):
    raise error(f"expected a JSON object, got {type(item).__name__}", field=None)
  if key not in item:
    raise error("missing field", field=field, kind="missing_field")
  value = item[key]
  if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
    names = "/".join(t.__name__ for t in _as_tuple(types))
    raise error(f"expected {names}, got {type(value).__name__}", field=field, kind="wrong_type")
  return value


def _as_tuple(types) -> tuple:
  return types if isinstance(types, tuple) else (types,)


def parse_tag(value: Any, *, error: RecordErrorFactory, field: str = "tag") -> list[int]:
  """A DriveLM/DriveBench `tag`: a list of ints (a bare int is accepted as a one-element list)."""
  if isinstance(value, int) and not isinstance(value, bool):
    return [value]
  if not isinstance(value, list) or not all(
    isinstance(v, int) and not isinstance(v, bool) for v in value
  ):
    raise error(f"expected a list of ints, got {value!r}", field=field, kind="wrong_type")
  return list(value)


# ----------------------------------------------------------------------------------------------
# Image paths.


def _split_parts(raw: str) -> list[str]:
  return [p for p in raw.replace("\\", "/").split("/") if p]


def reroot_nuscenes_path(
  raw: str, *, camera: str | None = None, corruption_folder: str | None = None
) -> list[str] | None:
  """Re-roots a nuScenes camera image path on `samples/<CAM>/`.

  Whatever prefix the JSON carries (`data/nuscenes/`, `../nuscenes/`, `.../`, an absolute path),
  the path is cut at its first `samples/<CAM>/` (or `corruption/<Folder>/<CAM>/`) component.

  Args:
    raw: the path as released.
    camera: if given, the camera component must be this one.
    corruption_folder: if given, the result is `corruption/<Folder>/<CAM>/<rest>` instead.

  Returns:
    Candidate relative paths (POSIX strings), in the order to try, or None if the path has no
    such component.
  """
  parts = _split_parts(raw)
  for i in range(len(parts) - 2):
    if parts[i] == "samples" and parts[i + 1] in CAMERAS:
      start = i + 1
    elif parts[i] == "corruption" and i + 2 < len(parts) - 1 and parts[i + 2] in CAMERAS:
      start = i + 2
    else:
      continue
    if camera is not None and parts[start] != camera:
      continue
    rest = parts[start:]
    if corruption_folder is not None:
      return [posixpath.join("corruption", corruption_folder, *rest)]
    return [posixpath.join("samples", *rest), posixpath.join("nuscenes", "samples", *rest)]
  return None


def strip_relative_prefix(raw: str) -> str:
  """Drops leading `/`, `.`, `..`, `...` parts: `.../100k/train/x.jpg` -> `100k/train/x.jpg`."""
  parts = _split_parts(raw)
  while parts and set(parts[0]) <= {"."}:
    parts.pop(0)
  return posixpath.join(*parts) if parts else ""


def resolve_under_root(
  root: Path, candidates: Sequence[str], *, error: RecordErrorFactory, field: str
) -> tuple[Path, str]:
  """The first candidate that exists under `root`, checked not to escape it.

  The check is lexical (`..` components), so an image root that is a symlink farm still works.

  Returns:
    (absolute path, path relative to the root).

  Raises:
    RecordError: a candidate escapes the root (kind `path_escape`), or none exists
      (kind `missing_image`).
  """
  root_norm = os.path.normpath(os.path.abspath(root))
  for rel in candidates:
    full = os.path.normpath(os.path.join(root_norm, rel))
    if os.path.commonpath([root_norm, full]) != root_norm or not rel:
      raise error(
        f"image path {rel!r} escapes the data root {root_norm}", field=field, kind="path_escape"
      )
  for rel in candidates:
    full = os.path.normpath(os.path.join(root_norm, rel))
    if os.path.isfile(full):
      return Path(full), os.path.relpath(full, root_norm)
  tried = ", ".join(os.path.join(root_norm, c) for c in candidates)
  raise error(f"image not found (tried {tried})", field=field, kind="missing_image")


def camera_from_path(raw: str) -> str | None:
  """The camera of a nuScenes image path (`.../samples/<CAM>/...`), or None."""
  parts = _split_parts(raw)
  for i, part in enumerate(parts[:-1]):
    if part in ("samples", "sweeps") and parts[i + 1] in CAMERAS:
      return parts[i + 1]
  for part in parts[:-1]:
    if part.startswith("CAM_"):
      return part
  return None


# ----------------------------------------------------------------------------------------------
# Image bytes.


class ImageReader:
  """Reads, checks and (optionally) resizes images, caching the last few by path.

  Args:
    image_size: None keeps the file bytes unchanged; an int stores every image resized (bicubic)
      to `image_size x image_size`, re-encoded as PNG, which is what the processor would do to a
      448 view anyway and keeps large datasets (DriveLM: ~80 QAs per frame share 6 views) small.
    cache_size: how many recent images to keep (QAs of one frame share images).
  """

  def __init__(self, image_size: int | None = None, cache_size: int = 64):
    self.image_size = image_size
    self._cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
    self._cache_size = cache_size

  def read(self, path: Path, *, error: RecordErrorFactory, field: str) -> bytes:
    key = str(path)
    if key in self._cache:
      self._cache.move_to_end(key)
      return self._cache[key]
    try:
      data = path.read_bytes()
    except OSError as e:
      raise error(f"cannot read image {path}: {e}", field=field, kind="unreadable_image") from None
    data = self._check_and_convert(data, path=path, error=error, field=field)
    self._cache[key] = data
    if len(self._cache) > self._cache_size:
      self._cache.popitem(last=False)
    return data

  def _check_and_convert(self, data: bytes, *, path, error, field) -> bytes:
    import PIL.Image

    try:
      with PIL.Image.open(io.BytesIO(data)) as image:
        image.load()
        if self.image_size is None:
          return data
        rgb = image.convert("RGB").resize(
          (self.image_size, self.image_size), PIL.Image.Resampling.BICUBIC
        )
    except Exception as e:  # Pillow raises many types for bad files.
      detail = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))
      raise error(
        f"unreadable image {path}: {type(e).__name__}: {detail}",
        field=field,
        kind="unreadable_image",
      ) from None
    return encode_png(np.asarray(rgb))


def encode_png(array: np.ndarray) -> bytes:
  """PNG bytes of a uint8 [H, W, 3] array."""
  import PIL.Image

  buffer = io.BytesIO()
  PIL.Image.fromarray(np.asarray(array, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
  """Decodes encoded image bytes to uint8 [H, W, 3] RGB (Pillow; no TensorFlow)."""
  import PIL.Image

  with PIL.Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


def black_image(size: int = 224) -> bytes:
  """DriveBench's `NoImage` view: a black `size x size` image, PNG-encoded."""
  return encode_png(np.zeros((size, size, 3), np.uint8))


# ----------------------------------------------------------------------------------------------
# Records and the TFDS schema.


def record_features() -> tfds.features.FeaturesDict:
  """The `tfds.features.FeaturesDict` shared by all driving builders (see the module docstring)."""
  text = tfds.features.Text
  return tfds.features.FeaturesDict(
    {
      "record_id": text(),
      "source_index": np.int64,
      "scene_token": text(),
      "frame_token": text(),
      "question_type": text(),
      "capability": text(),
      "capability_id": np.int32,
      "question": text(),
      "answer": text(),
      "tag": tfds.features.Sequence(np.int32),
      "cameras": tfds.features.Sequence(text()),
      "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
      "image_paths": tfds.features.Sequence(text()),
      "objects": tfds.features.Sequence(
        {
          "ref": text(),
          "index": np.int32,
          "camera": text(),
          "x": np.float32,
          "y": np.float32,
          "x_norm": np.float32,
          "y_norm": np.float32,
        }
      ),
      "key_objects": tfds.features.Sequence(
        {
          "ref": text(),
          "category": text(),
          "status": text(),
          "visual_description": text(),
          "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
        }
      ),
      "scene_description": text(),
    }
  )


def make_record(
  *,
  record_id: str,
  source_index: int,
  scene_token: str,
  frame_token: str,
  question_type: str,
  question: str,
  answer: str,
  tag: Sequence[int],
  cameras: Sequence[str],
  images: Sequence[bytes],
  image_paths: Sequence[str],
  pixel_coordinates: bool,
  key_objects: Sequence[Mapping[str, Any]] = (),
  scene_description: str = "",
) -> dict[str, Any]:
  """Assembles one record in the `record_features()` layout (objects parsed from Q and A)."""
  capability = capability_of(question_type)
  refs = parse_object_refs(question + "\n" + answer, pixel_coordinates=pixel_coordinates)
  return {
    "record_id": record_id,
    "source_index": source_index,
    "scene_token": scene_token,
    "frame_token": frame_token,
    "question_type": question_type,
    "capability": capability,
    "capability_id": capability_id(capability),
    "question": question,
    "answer": answer,
    "tag": list(tag),
    "cameras": list(cameras),
    "images": list(images),
    "image_paths": list(image_paths),
    "objects": [dataclasses.asdict(r) for r in refs],
    "key_objects": list(key_objects),
    "scene_description": scene_description,
  }


def parse_key_object_infos(infos: Any, *, error: RecordErrorFactory) -> list[dict[str, Any]]:
  """DriveLM `key_object_infos` ({tag: {Category, Status, Visual_description, 2d_bbox}}) as rows."""
  if infos is None:
    return []
  if not isinstance(infos, Mapping):
    raise error("expected an object", field="key_object_infos", kind="wrong_type")
  rows = []
  for ref, info in infos.items():
    field = f"key_object_infos[{ref}]"
    if not isinstance(info, Mapping):
      raise error("expected an object", field=field, kind="wrong_type")
    bbox = info.get("2d_bbox")
    if bbox is None:
      bbox_array = np.full((4,), np.nan, np.float32)
    else:
      try:
        bbox_array = np.asarray(bbox, np.float32).reshape(4)
      except (TypeError, ValueError):
        raise error(f"expected 4 numbers, got {bbox!r}", field=field + ".2d_bbox") from None
    rows.append(
      {
        "ref": ref,
        "category": str(info.get("Category") or ""),
        "status": str(info.get("Status") or ""),
        "visual_description": str(info.get("Visual_description") or ""),
        "bbox": bbox_array,
      }
    )
  return rows


# ----------------------------------------------------------------------------------------------
# Bad-record accounting.


class BadRecordLog:
  """Skips and counts bad records when asked to; otherwise re-raises.

  Use `with log.guard(): ...` around the work for one record; the guard swallows a
  `RecordError` only if `skip` is True, counting it by kind and keeping the first messages.
  """

  def __init__(self, skip: bool, *, max_messages: int = 20):
    self.skip = skip
    self.max_messages = max_messages
    self.num_skipped = 0
    self.by_kind: collections.Counter[str] = collections.Counter()
    self.messages: list[str] = []

  def guard(self):
    return _Guard(self)

  def add(self, error: RecordError) -> None:
    self.num_skipped += 1
    self.by_kind[error.kind] += 1
    if len(self.messages) < self.max_messages:
      self.messages.append(str(error))
    logging.warning("Skipping bad record: %s", error)

  def summary(self) -> dict[str, Any]:
    return {
      "skip_bad_records": self.skip,
      "num_skipped": self.num_skipped,
      "by_kind": dict(sorted(self.by_kind.items())),
      "first_messages": list(self.messages),
    }


class _Guard:
  def __init__(self, log: BadRecordLog):
    self.log = log
    self.failed = False

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and issubclass(exc_type, RecordError) and self.log.skip:
      self.log.add(exc)
      self.failed = True
      return True
    return False


def report_to_info(builder, split: str, log: BadRecordLog, **extra: Any) -> None:
  """Writes a split's bad-record summary (and extra counts) into `builder.info.metadata`.

  `metadata["bad_records"][split]` holds `BadRecordLog.summary()`; `extra` goes to
  `metadata["counts"][split]`. A split left without records (TFDS cannot write one) raises a
  `RecordError` that carries the skip counts. TFDS saves the metadata with the dataset
  (metadata.json), so `tfds.builder_from_directory(...).info.metadata` shows it later.
  """
  metadata = builder.info.metadata
  bad = dict(metadata.get("bad_records", {}))
  bad[split] = log.summary()
  metadata["bad_records"] = bad
  if extra:
    counts = dict(metadata.get("counts", {}))
    counts[split] = {k: v for k, v in extra.items()}
    metadata["counts"] = counts
  if extra.get("num_records") == 0:
    raise RecordError(
      f"split {split!r} has no records left ({log.num_skipped} bad records skipped:"
      f" {dict(log.by_kind)}; first: {log.messages[:1]})",
      file=extra.get("source_file"),
      kind="empty_split",
    )
  if log.num_skipped:
    logging.warning(
      "%s/%s: skipped %d bad records: %s",
      builder.name,
      split,
      log.num_skipped,
      dict(log.by_kind),
    )


class DrivingBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared plumbing of the driving builders: array_record, paths, options, bad-record reports.

  Args (keyword-only, besides the usual `data_dir`, `config`, `version`):
    manual_dir: the folder with the released files. Defaults to the TFDS manual dir
      (`DownloadConfig(manual_dir=...)`, else `<data_dir>/downloads/manual`).
    skip_bad_records: skip and count bad records instead of raising `RecordError`.
    image_size: None stores the image files' bytes; N stores N x N bicubic-resized PNGs.
    file_format: must stay "array_record" (random access, no TensorFlow).
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = ""

  def __init__(
    self,
    *,
    manual_dir: str | os.PathLike | None = None,
    skip_bad_records: bool = False,
    image_size: int | None = None,
    file_format: str = "array_record",
    **kwargs,
  ):
    self._manual_dir_override = Path(manual_dir).absolute() if manual_dir else None
    self.skip_bad_records = skip_bad_records
    self.image_reader = ImageReader(image_size)
    self._resolved: dict[tuple[str, tuple[str, ...]], tuple[Path, str]] = {}
    super().__init__(file_format=file_format, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=record_features(),
      metadata=tfds.core.MetadataDict(),
    )

  def resolve_manual_dir(self, dl_manager) -> Path:
    if self._manual_dir_override is not None:
      if not self._manual_dir_override.is_dir():
        raise RecordError("manual dir does not exist", file=self._manual_dir_override)
      return self._manual_dir_override
    return Path(os.fspath(dl_manager.manual_dir))

  def bad_record_log(self) -> BadRecordLog:
    return BadRecordLog(self.skip_bad_records)

  def read_camera_images(
    self,
    root: Path,
    image_paths: Mapping[str, Any],
    cameras: Sequence[str],
    *,
    error: RecordErrorFactory,
    field: str,
    corruption_folder: str | None = None,
    blank_size: int | None = None,
  ) -> tuple[list[bytes], list[str]]:
    """(images, paths relative to `root`) of `image_paths[camera]` for each of `cameras`.

    Each path is re-rooted on `samples/<CAM>/` (`reroot_nuscenes_path`; `corruption_folder`
    reads the corrupted copy instead). With `blank_size` the paths are still checked but every
    view is a black `blank_size`^2 image with path "" (DriveBench NoImage).

    Raises:
      RecordError: on `<field>.<camera>`: not a string, no `samples/<CAM>/` component, or the
        image is missing or unreadable.
    """
    images, paths = [], []
    for camera in cameras:
      camera_field = f"{field}.{camera}"
      raw = image_paths[camera]
      if not isinstance(raw, str):
        raise error(
          f"expected str, got {type(raw).__name__}", field=camera_field, kind="wrong_type"
        )
      candidates = reroot_nuscenes_path(raw, corruption_folder=corruption_folder)
      if candidates is None:
        raise error(f"no samples/<CAM>/ component in {raw!r}", field=camera_field, kind="bad_path")
      if blank_size is not None:
        images.append(black_image(blank_size))
        paths.append("")
        continue
      image, relative = self.read_image(root, candidates, error=error, field=camera_field)
      images.append(image)
      paths.append(relative)
    return images, paths

  def read_image(
    self, root: Path, candidates: Sequence[str], *, error: RecordErrorFactory, field: str
  ) -> tuple[bytes, str]:
    """(image bytes, path relative to `root`) of the first existing candidate (see
    `resolve_under_root`); QAs of one frame share views, so resolutions are cached."""
    key = (str(root), tuple(candidates))
    resolved = self._resolved.get(key)
    if resolved is None:
      resolved = resolve_under_root(root, candidates, error=error, field=field)
      self._resolved[key] = resolved
    full, relative = resolved
    return self.image_reader.read(full, error=error, field=field), relative
