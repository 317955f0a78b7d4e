"""Drive-KD training QAs (`messages` + `images` + `question_type`) as a TFDS builder.

Source format (the official `data/demo.json`): a JSON list, or an object holding the list under
`data`, `items`, `samples` or `examples`, of
`{"messages": [{"role": "user", "content": "<image>...question"}, {"role": "assistant",
"content": "answer"}], "images": [path, ...], "question_type": "perception" | "reasoning" |
"planning"}`. Each `<image>` slot of the user text takes the next entry of `images`; the slot
count must equal the number of images. Optional extra keys are carried when present: `id`,
`scene_token`, `frame_token`, `tag`.

Normalisation:
- `question_type` is lower-cased and aliases map to the canonical names: perceive/perceptual ->
  perception, reason/prediction/behavior/behaviour -> reasoning, plan -> planning. Drive-KD's
  types are capabilities already; any other value is kept (capability `other`).
- Message roles accept ShareGPT aliases (`from`/`value`, human/gpt). An optional leading system
  message is an error (Drive-KD uses no system prompt), as is anything but one user turn then
  one assistant turn.
- Cameras: from the path (`.../samples/<CAM>/...`); a path without one (BDD100K single images,
  `.../100k/train/<id>.jpg`) gets the camera its question tags if it tags exactly one, else
  CAM_FRONT (a dash camera; our inference).
- Coordinates in tags are taken as normalised, as Drive-KD states (some demo answers carry
  values above 1; they are kept as written).

Pointing the builder at local files:

```
<manual_dir>/train.json (or drivekd_train.json), optional test.json (or drivekd_test.json)
<image_root>/nuscenes/samples/<CAM>/<file>   (or <image_root>/samples/<CAM>/<file>)
<image_root>/100k/train/<id>.jpg             (any other path: its leading ./../.../ dropped)
```

```python
builder = DriveKDQA(data_dir="/abs/tfds", manual_dir="/abs/drivekd",
                    json_path="/abs/drivekd/demo.json", image_root="/abs/images")
builder.download_and_prepare()
records = builder.as_data_source("train")
```
Keyword arguments: `json_path` (the `train` split's file) or `split_paths={"train": ...,
"test": ...}`, `image_root` (default: the manual dir), `skip_bad_records`, `image_size`
(see `records.DrivingBuilder`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drivekd_jax.data import records as rec

IMAGE_SLOT = "<image>"
ROOT_LIST_KEYS = ("data", "items", "samples", "examples")
QUESTION_TYPE_ALIASES = {
  "perception": "perception",
  "perceive": "perception",
  "perceptual": "perception",
  "reasoning": "reasoning",
  "reason": "reasoning",
  "prediction": "reasoning",
  "behavior": "reasoning",
  "behaviour": "reasoning",
  "planning": "planning",
  "plan": "planning",
}
ROLE_ALIASES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
DEFAULT_SPLIT_FILES = {
  "train": ("train.json", "drivekd_train.json"),
  "test": ("test.json", "drivekd_test.json"),
}


def normalize_question_type(value: str) -> str:
  """Canonical Drive-KD question type (see the module docstring); unknown values kept, trimmed."""
  key = value.strip().lower().replace("-", "_").replace(" ", "_")
  return QUESTION_TYPE_ALIASES.get(key, value.strip())


def items_of(data: Any, *, file) -> list[Any]:
  """The QA list of a Drive-KD file: the root list, or the list under data/items/..."""
  if isinstance(data, list):
    return data
  if isinstance(data, dict):
    for key in ROOT_LIST_KEYS:
      if isinstance(data.get(key), list):
        return data[key]
  raise rec.RecordError(
    f"expected a list of QAs or an object with one of {', '.join(ROOT_LIST_KEYS)} holding it",
    file=file,
  )


def _message_text(message: Any, position: int, error) -> tuple[str, str]:
  field = f"messages[{position}]"
  if not isinstance(message, Mapping):
    raise error("expected an object", field=field, kind="wrong_type")
  role = message.get("role", message.get("from"))
  content = message.get("content", message.get("value"))
  if not isinstance(role, str):
    raise error("missing role", field=f"{field}.role", kind="missing_field")
  if not isinstance(content, str):
    raise error("missing text content", field=f"{field}.content", kind="missing_field")
  if role.strip().lower() not in ROLE_ALIASES:
    raise error(f"unknown role {role!r}", field=f"{field}.role")
  return ROLE_ALIASES[role.strip().lower()], content


class DriveKDQA(rec.DrivingBuilder):
  """Drive-KD messages/images/question_type QAs; see the module docstring."""

  name = "drivekd_qa"
  DESCRIPTION = "Drive-KD training QAs (messages + images + question_type), one record per QA."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put the Drive-KD QA json (train.json or json_path=) in the manual dir and the images under"
    " image_root (nuscenes/samples/<CAM>/..., 100k/train/...)."
  )

  def __init__(
    self,
    *,
    json_path: str | os.PathLike | None = None,
    split_paths: Mapping[str, str | os.PathLike] | None = None,
    image_root: str | os.PathLike | None = None,
    **kwargs,
  ):
    self._split_paths = rec.split_paths_from(json_path, split_paths)
    self._image_root = Path(image_root).absolute() if image_root else None
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    manual_dir = self.resolve_manual_dir(dl_manager)
    split_paths = self._split_paths
    if split_paths is None:
      split_paths = {}
      for split, names in DEFAULT_SPLIT_FILES.items():
        found = [manual_dir / n for n in names if (manual_dir / n).is_file()]
        if found:
          split_paths[split] = found[0]
      if "train" not in split_paths:
        raise rec.RecordError(
          "no train.json or drivekd_train.json; pass json_path= or split_paths=",
          file=manual_dir,
          kind="missing_file",
        )
    image_root = self._image_root or manual_dir
    return {
      split: self._generate_examples(split, path, image_root) for split, path in split_paths.items()
    }

  def _generate_examples(self, split, json_path, image_root):
    items = items_of(rec.load_json(json_path), file=json_path)
    log = self.bad_record_log()
    num_written = 0
    for index, item in enumerate(items):
      token = None
      if isinstance(item, Mapping):
        token = next((item[k] for k in ("id", "frame_token") if isinstance(item.get(k), str)), None)
      error = rec.RecordErrorFactory(json_path, index, token)
      with log.guard() as guard:
        record = self._record(item, index, error, image_root, Path(json_path).stem)
      if not guard.failed:
        num_written += 1
        yield index, record
    rec.report_to_info(
      self,
      split,
      log,
      source_file=str(json_path),
      num_source_items=len(items),
      num_records=num_written,
    )

  def _record(self, item, index, error, image_root, stem) -> dict[str, Any]:
    messages = rec.require(item, "messages", list, error=error)
    turns = [_message_text(m, i, error) for i, m in enumerate(messages)]
    if [role for role, _ in turns] != ["user", "assistant"]:
      raise error(
        f"expected one user then one assistant message, got roles {[r for r, _ in turns]}",
        field="messages",
      )
    question, answer = turns[0][1], turns[1][1]
    raw_paths = rec.require(item, "images", list, error=error)
    question_type = normalize_question_type(rec.require(item, "question_type", str, error=error))
    slots = question.count(IMAGE_SLOT)
    if slots != len(raw_paths):
      raise error(
        f"the user message has {slots} {IMAGE_SLOT} slots but {len(raw_paths)} images are listed",
        field="images",
      )
    tagged = rec.tagged_cameras(question)
    rec.check_cameras(tagged, error=error, field="messages[0].content")
    cameras, images, paths = [], [], []
    for position, raw in enumerate(raw_paths):
      field = f"images[{position}]"
      if not isinstance(raw, str):
        raise error(f"expected str, got {type(raw).__name__}", field=field, kind="wrong_type")
      camera = rec.camera_from_path(raw)
      if camera is None:
        camera = tagged[0] if len(tagged) == 1 else "CAM_FRONT"
      rec.check_cameras([camera], error=error, field=field)
      candidates = [rec.strip_relative_prefix(raw)]
      for candidate in rec.reroot_nuscenes_path(raw) or ():
        if candidate not in candidates:
          candidates.append(candidate)
      image, relative = self.read_image(image_root, candidates, error=error, field=field)
      cameras.append(camera)
      images.append(image)
      paths.append(relative)
    optional_text = {}
    for key in ("id", "scene_token", "frame_token"):
      value = item.get(key, "")
      if not isinstance(value, str):
        raise error(f"expected str, got {type(value).__name__}", field=key, kind="wrong_type")
      optional_text[key] = value
    return rec.make_record(
      record_id=optional_text["id"] or f"{stem}_{index}",
      source_index=index,
      scene_token=optional_text["scene_token"],
      frame_token=optional_text["frame_token"],
      question_type=question_type,
      question=question,
      answer=answer,
      tag=rec.parse_tag(item.get("tag", []), error=error),
      cameras=cameras,
      images=images,
      image_paths=paths,
      pixel_coordinates=False,
    )
