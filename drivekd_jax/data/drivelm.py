"""DriveLM-nuScenes as a TFDS builder: the nested QA file flattened to one record per QA.

Source format (`v1_1_train_nus.json`, v1_0 and the challenge's `test_eval.json` alike):
`{scene_token: {scene_description, key_frames: {frame_token: {key_object_infos, QA: {perception:
[{Q, A, C, con_up, con_down, cluster, layer[, tag]}], prediction, planning, behavior},
image_paths: {CAM: path}}}}}`. `scene_description` and `key_object_infos` may be absent (the
test format has neither); `tag` is carried where present.

Pointing the builder at local files:

```
<manual_dir>/v1_1_train_nus.json          # the QA file (or json_path=...)
<manual_dir>/drivebench-test.json         # keyframes to exclude (or visual_description.json)
<manual_dir>/samples/<CAM>/<file>         # images (or <manual_dir>/nuscenes/samples/...)
```

```python
builder = DriveLM(data_dir="/abs/tfds", manual_dir="/abs/drivelm",
                  drivebench_json="/abs/drivebench/data/drivebench-test.json")
builder.download_and_prepare()
records = builder.as_data_source("train")
```
Keyword arguments:
- `json_path`: the QA file of the `train` split; `split_paths={"train": ..., "val": ...}` names
  several splits instead.
- `image_root`: the folder holding `samples/<CAM>/` (default: the manual dir).
- `exclude_drivebench` (default True): drop the keyframes of the DriveBench test set, which was
  built from DriveLM-nuScenes *train*. The frame tokens come from `drivebench_json`: a DriveBench
  QA list (`drivebench-test.json`, any corruption JSON) or the nested
  `visual_description.json`; by default the manual dir's `drivebench-test.json`, else its
  `visual_description.json`; without either the build fails (pass `exclude_drivebench=False` to
  train on every frame knowingly). The numbers of excluded frames and QAs are in
  `info.metadata["counts"]`.
- `filter_cameras` (default True): keep only the cameras the question tags, like DriveBench's
  preprocessing, so training inputs look like the benchmark's; False keeps all six views.
- `skip_bad_records`, `image_size`: see `records.DrivingBuilder`.

Record ids are `<scene>_<frame>_<i>` with i the QA's index in perception + prediction + planning +
behavior of its frame, as in the challenge's submission ids. Tags are in pixels (1600 x 900):
`objects` keeps them and adds normalised coordinates.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from drivekd_jax.data import records as rec

STAGES = ("perception", "prediction", "planning", "behavior")
DEFAULT_JSON = "v1_1_train_nus.json"


def drivebench_frame_tokens(path: str | os.PathLike) -> set[str]:
  """The keyframe tokens of a DriveBench file: a QA list or the nested visual descriptions."""
  data = rec.load_json(path)
  if isinstance(data, list):
    tokens = set()
    for index, item in enumerate(data):
      error = rec.RecordErrorFactory(path, index, None)
      tokens.add(rec.require(item, "frame_token", str, error=error))
    return tokens
  if isinstance(data, dict):
    tokens = set()
    for scene_token, scene in data.items():
      frames = scene.get("key_frames") if isinstance(scene, dict) else None
      if not isinstance(frames, dict):
        raise rec.RecordError(
          "expected an object", file=path, token=scene_token, field="key_frames"
        )
      tokens.update(frames)
    return tokens
  raise rec.RecordError("expected a QA list or a {scene: {key_frames: ...}} object", file=path)


class DriveLM(rec.DrivingBuilder):
  """DriveLM-nuScenes QAs, one record per QA; see the module docstring."""

  name = "drivelm"
  DESCRIPTION = "DriveLM-nuScenes QAs flattened to one record per QA."
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put v1_1_train_nus.json (HF OpenDriveLab/DriveLM) and the nuScenes images"
    " (samples/<CAM>/...) in the manual dir, plus DriveBench's drivebench-test.json"
    " for the test-frame exclusion."
  )

  def __init__(
    self,
    *,
    json_path: str | os.PathLike | None = None,
    split_paths: Mapping[str, str | os.PathLike] | None = None,
    image_root: str | os.PathLike | None = None,
    exclude_drivebench: bool = True,
    drivebench_json: str | os.PathLike | None = None,
    filter_cameras: bool = True,
    **kwargs,
  ):
    self._split_paths = rec.split_paths_from(json_path, split_paths)
    self._image_root = Path(image_root).absolute() if image_root else None
    self._exclude_drivebench = exclude_drivebench
    self._drivebench_json = Path(drivebench_json).absolute() if drivebench_json else None
    self._filter_cameras = filter_cameras
    super().__init__(**kwargs)

  def _split_generators(self, dl_manager):
    manual_dir = self.resolve_manual_dir(dl_manager)
    split_paths = self._split_paths or {"train": manual_dir / DEFAULT_JSON}
    excluded, exclusion_source = set(), None
    if self._exclude_drivebench:
      exclusion_source = self._drivebench_json or next(
        (
          manual_dir / name
          for name in ("drivebench-test.json", "visual_description.json")
          if (manual_dir / name).is_file()
        ),
        None,
      )
      if exclusion_source is None:
        raise rec.RecordError(
          "exclude_drivebench=True needs the DriveBench keyframes: pass drivebench_json= (or put"
          " drivebench-test.json / visual_description.json in the manual dir), or set"
          " exclude_drivebench=False",
          file=manual_dir,
          kind="missing_file",
        )
      excluded = drivebench_frame_tokens(exclusion_source)
    image_root = self._image_root or manual_dir
    return {
      split: self._generate_examples(split, path, image_root, excluded, exclusion_source)
      for split, path in split_paths.items()
    }

  def _generate_examples(self, split, json_path, image_root, excluded, exclusion_source):
    data = rec.load_json(json_path)
    if not isinstance(data, dict):
      raise rec.RecordError(
        f"expected an object {{scene_token: ...}}, got {type(data).__name__}", file=json_path
      )
    log = self.bad_record_log()
    counts = dict(
      source_file=str(json_path),
      exclusion_source=str(exclusion_source) if exclusion_source else None,
      num_frames=0,
      num_excluded_frames=0,
      num_excluded_qas=0,
      num_records=0,
    )
    source_index = 0
    for scene_token, scene in data.items():
      for frame_token, frame, qas, error in self._frames(json_path, scene_token, scene, log):
        counts["num_frames"] += 1
        if frame_token in excluded:
          counts["num_excluded_frames"] += 1
          counts["num_excluded_qas"] += len(qas)
          source_index += len(qas)
          continue
        with log.guard() as guard:
          key_objects = rec.parse_key_object_infos(frame.get("key_object_infos"), error=error)
          image_paths = rec.require(frame, "image_paths", dict, error=error)
          rec.check_cameras(image_paths, error=error, field="image_paths")
        if guard.failed:
          source_index += len(qas)
          continue
        for i, (stage, position, qa) in enumerate(qas):
          qa_error = rec.RecordErrorFactory(json_path, source_index, frame_token)
          with log.guard() as guard:
            record = self._record(
              qa,
              stage=stage,
              field=f"QA.{stage}[{position}]",
              error=qa_error,
              image_paths=image_paths,
              image_root=image_root,
            )
          if not guard.failed:
            record.update(
              record_id=f"{scene_token}_{frame_token}_{i}",
              source_index=source_index,
              scene_token=scene_token,
              frame_token=frame_token,
              key_objects=key_objects,
              scene_description=str(scene.get("scene_description") or ""),
            )
            counts["num_records"] += 1
            yield source_index, record
          source_index += 1
    rec.report_to_info(self, split, log, **counts)

  def _frames(self, json_path, scene_token, scene, log):
    """Yields (frame_token, frame, [(stage, position, qa)], error) of a scene's valid frames."""
    error = rec.RecordErrorFactory(json_path, None, scene_token)
    with log.guard() as guard:
      frames = rec.require(scene, "key_frames", dict, error=error)
    if guard.failed:
      return
    for frame_token, frame in frames.items():
      error = rec.RecordErrorFactory(json_path, None, frame_token)
      with log.guard() as guard:
        qa_groups = rec.require(frame, "QA", dict, error=error)
        stages = [s for s in STAGES if s in qa_groups] + [s for s in qa_groups if s not in STAGES]
        qas = []
        for stage in stages:
          group = rec.require(qa_groups, stage, list, error=error, field=f"QA.{stage}")
          qas.extend((stage, position, qa) for position, qa in enumerate(group))
      if not guard.failed:
        yield frame_token, frame, qas, error

  def _record(self, qa, *, stage, field, error, image_paths, image_root) -> dict[str, Any]:
    question = rec.require(qa, "Q", str, error=error, field=f"{field}.Q")
    answer = rec.require(qa, "A", str, error=error, field=f"{field}.A")
    tag = rec.parse_tag(qa.get("tag", []), error=error, field=f"{field}.tag")
    rec.check_cameras(rec.tagged_cameras(question), error=error, field=f"{field}.Q")
    if self._filter_cameras:
      cameras = rec.select_cameras(question, image_paths, error=error, field="image_paths")
    else:
      cameras = [c for c in rec.CAMERAS if c in image_paths]
    images, paths = self.read_camera_images(
      image_root, image_paths, cameras, error=error, field="image_paths"
    )
    return rec.make_record(
      record_id="",
      source_index=0,
      scene_token="",
      frame_token="",
      question_type=stage,
      question=question,
      answer=answer,
      tag=tag,
      cameras=cameras,
      images=images,
      image_paths=paths,
      pixel_coordinates=True,
    )
