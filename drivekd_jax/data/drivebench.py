"""DriveBench (Xie et al., ICCV 2025) as a TFDS builder: one record per QA, split `test`.

Source format: the flat JSON list of the release, `drivebench-test.json` (or the preprocessed
`drivebench-test-final.json`, or a corruption JSON such as `fog.json`), each item
`{scene_token, frame_token, question_type, question, answer, tag, image_path: {CAM: path}}`.

Pointing the builder at local files. The manual dir is the toolkit's `data/` folder (or any
folder laid out the same way):

```
<manual_dir>/drivebench-test.json           # or drivebench-test-final.json
<manual_dir>/<stem>.json                    # optional corruption QAs, e.g. fog.json
<manual_dir>/visual_description.json        # optional: key_object_infos per keyframe
<manual_dir>/samples/<CAM>/<file>           # clean views (or <manual_dir>/nuscenes/samples/...)
<manual_dir>/corruption/<Folder>/<CAM>/<file>
```

```python
builder = DriveBench(config="fog", data_dir="/abs/tfds", manual_dir="/abs/drivebench/data")
builder.download_and_prepare()
records = builder.as_data_source("test")
```
or `sources.build_dataset("drivebench", "/abs/drivebench/data", "/abs/tfds", config="fog")`.
Keyword arguments: `json_path` (a different JSON), `image_root` (images elsewhere than the
manual dir), `visual_description_path`, `skip_bad_records`, `image_size` (see
`records.DrivingBuilder`). Paths and options are not part of the dataset's identity: to rebuild
with other ones, use another `data_dir` or `build_dataset(..., overwrite=True)`.

Behaviour:
- Every image path is re-rooted on `samples/<CAM>/` (clean) or `corruption/<Folder>/<CAM>/`
  (corruption configs) under the image root, whatever prefix the JSON carries; a path that
  leaves the root after re-rooting is an error.
- Camera filtering as the official `tools/preprocess.py`: if the question has `<cK,CAM,x,y>`
  tags, only the tagged cameras are kept, else all of them; images are ordered as the system
  prompt states (FRONT, FRONT_LEFT, FRONT_RIGHT, BACK, BACK_LEFT, BACK_RIGHT).
- Configs: `clean`, `no_image` (the kept cameras' views replaced by black 224x224 images, as
  the toolkit's NoImage setting) and one per corruption, named by the toolkit's result stem
  (`biterror`, `bright`, `cameracrash`, ...; `CORRUPTIONS`). A corruption config reads
  `<stem>.json` if present (the release's per-corruption QAs), else `drivebench-test.json`, with
  that corruption's images.
- Unknown `question_type`s (e.g. the corruption JSONs' robustness questions) are kept, with
  capability `other`. Object coordinates in DriveBench tags are already normalised.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import tensorflow_datasets as tfds

from drivekd_jax.data import records as rec

CORRUPTIONS = {
  "biterror": "BitError",
  "bright": "Brightness",
  "cameracrash": "CameraCrash",
  "colorquant": "ColorQuant",
  "fog": "Fog",
  "framelost": "FrameLost",
  "h256": "H256ABRCompression",
  "lens": "LensObstacleCorruption",
  "lowlight": "LowLight",
  "motion": "MotionBlur",
  "rain": "Rain",
  "saturate": "Saturate",
  "snow": "Snow",
  "water": "WaterSplashCorruption",
  "zoom": "ZoomBlur",
}
"""Toolkit result stem -> image folder under `corruption/`, for the 15 corruptions."""

TEST_JSON_NAMES = ("drivebench-test.json", "drivebench-test-final.json")
NO_IMAGE_SIZE = 224
_REQUIRED_TEXT = ("scene_token", "frame_token", "question_type", "question", "answer")


@dataclasses.dataclass
class DriveBenchConfig(tfds.core.BuilderConfig):
  """One image setting: clean, no_image, or a corruption (`corruption_folder` set)."""

  corruption_folder: str | None = None
  no_image: bool = False


def _configs() -> list[DriveBenchConfig]:
  configs = [
    DriveBenchConfig(name="clean", description="Clean nuScenes views."),
    DriveBenchConfig(name="no_image", description="Black 224x224 views (NoImage).", no_image=True),
  ]
  for stem, folder in CORRUPTIONS.items():
    configs.append(
      DriveBenchConfig(name=stem, description=f"{folder} corruption.", corruption_folder=folder)
    )
  return configs


class DriveBench(rec.DrivingBuilder):
  """DriveBench test QAs (clean, NoImage and the 15 corruptions); see the module docstring."""

  name = "drivebench"
  BUILDER_CONFIGS = _configs()
  DEFAULT_CONFIG_NAME = "clean"
  DESCRIPTION = "DriveBench (ICCV 2025) test QAs, one record per question, camera-filtered."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put drivebench-test.json (and the corruption JSONs) from HF drive-bench/arena and the"
    " images (samples/<CAM>/..., corruption/<Folder>/<CAM>/...) in the manual dir."
  )

  def __init__(
    self,
    *,
    json_path: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    visual_description_path: str | os.PathLike | None = None,
    **kwargs,
  ):
    self._json_path = Path(json_path).absolute() if json_path else None
    self._image_root = Path(image_root).absolute() if image_root else None
    self._visual_description_path = (
      Path(visual_description_path).absolute() if visual_description_path else None
    )
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    manual_dir = self.resolve_manual_dir(dl_manager)
    return {"test": self._generate_examples(manual_dir)}

  def _find_json(self, manual_dir: Path) -> Path:
    if self._json_path is not None:
      return self._json_path
    config: DriveBenchConfig = self.builder_config
    names = TEST_JSON_NAMES
    if config.corruption_folder is not None:
      names = (f"{config.name}.json", *names)
    for name in names:
      if (manual_dir / name).is_file():
        return manual_dir / name
    raise rec.RecordError(
      f"none of {', '.join(names)} found; pass json_path=", file=manual_dir, kind="missing_file"
    )

  def _load_key_objects(self, manual_dir: Path) -> dict[tuple[str, str], Any]:
    path = self._visual_description_path or manual_dir / "visual_description.json"
    if self._visual_description_path is None and not path.is_file():
      return {}
    data = rec.load_json(path)
    if not isinstance(data, dict):
      raise rec.RecordError("expected an object {scene_token: {...}}", file=path)
    infos = {}
    for scene_token, scene in data.items():
      frames = scene.get("key_frames") if isinstance(scene, dict) else None
      if not isinstance(frames, dict):
        raise rec.RecordError(
          "expected an object", file=path, token=scene_token, field="key_frames"
        )
      for frame_token, frame in frames.items():
        infos[(scene_token, frame_token)] = (
          frame.get("key_object_infos") if isinstance(frame, dict) else None,
          scene.get("scene_description", ""),
        )
    return infos

  def _generate_examples(self, manual_dir: Path):
    config: DriveBenchConfig = self.builder_config
    json_path = self._find_json(manual_dir)
    image_root = self._image_root or manual_dir
    key_objects = self._load_key_objects(manual_dir)
    data = rec.load_json(json_path)
    if not isinstance(data, list):
      raise rec.RecordError(
        f"expected a JSON list of QAs, got {type(data).__name__}", file=json_path
      )
    log = self.bad_record_log()
    qa_index_in_frame: dict[str, int] = {}
    num_written = 0
    for index, item in enumerate(data):
      token = item.get("frame_token") if isinstance(item, dict) else None
      error = rec.RecordErrorFactory(json_path, index, token if isinstance(token, str) else None)
      with log.guard() as guard:
        record = self._record(item, index, error, image_root, key_objects)
      if guard.failed:
        continue
      frame = record["frame_token"]
      i = qa_index_in_frame.get(frame, 0)
      qa_index_in_frame[frame] = i + 1
      record["record_id"] = f"{record['scene_token']}_{frame}_{i}"
      num_written += 1
      yield index, record
    rec.report_to_info(
      self,
      "test",
      log,
      source_file=str(json_path),
      num_source_items=len(data),
      num_records=num_written,
      setting=config.name,
    )

  def _record(self, item, index, error, image_root, key_objects) -> dict[str, Any]:
    config: DriveBenchConfig = self.builder_config
    fields = {name: rec.require(item, name, str, error=error) for name in _REQUIRED_TEXT}
    tag = rec.parse_tag(rec.require(item, "tag", (list, int), error=error), error=error)
    image_path = rec.require(item, "image_path", dict, error=error)
    rec.check_cameras(image_path, error=error, field="image_path")
    rec.check_cameras(rec.tagged_cameras(fields["question"]), error=error, field="question")
    cameras = rec.select_cameras(fields["question"], image_path, error=error, field="image_path")
    images, paths = self.read_camera_images(
      image_root,
      image_path,
      cameras,
      error=error,
      field="image_path",
      corruption_folder=config.corruption_folder,
      blank_size=NO_IMAGE_SIZE if config.no_image else None,
    )
    infos, scene_description = key_objects.get(
      (fields["scene_token"], fields["frame_token"]), (None, "")
    )
    return rec.make_record(
      record_id="",
      source_index=index,
      tag=tag,
      cameras=cameras,
      images=images,
      image_paths=paths,
      pixel_coordinates=False,
      key_objects=rec.parse_key_object_infos(infos, error=error),
      scene_description=scene_description or "",
      **fields,
    )
