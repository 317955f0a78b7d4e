"""TFDS builders for DriveBench, DriveLM-nuScenes and Drive-KD QA: real files, fixtures, errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from _paths import data_file

from drivekd_jax.data import records as rec
from drivekd_jax.data import sources
from drivekd_jax.data.drivebench import CORRUPTIONS, DriveBench
from drivekd_jax.data.drivekd_qa import DriveKDQA
from drivekd_jax.data.drivelm import DriveLM


def write_image(path: Path, value: int, size=(6, 10)) -> None:
  """A tiny image of one grey value (so a decoded pixel tells which file was read)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(rec.encode_png(np.full((*size, 3), value, np.uint8)))


def read_all(builder, split: str) -> dict[str, dict]:
  """All records of a split by record_id (data sources return a hashed order)."""
  source = builder.as_data_source(split)
  out = {}
  for i in range(len(source)):
    record = source[i]
    out[record["record_id"].decode()] = record
  assert len(out) == len(source)
  return out


def texts(values) -> list[str]:
  return [v.decode() for v in values]


def pixel(image_bytes: bytes) -> int:
  return int(rec.decode_image(image_bytes)[0, 0, 0])


# ---------------------------------------------------------------------------------------------
# Unit helpers.


def test_capability_mapping():
  assert rec.capability_of("perception") == "perception"
  assert rec.capability_of("prediction") == "reasoning"
  assert rec.capability_of("behavior") == "reasoning"
  assert rec.capability_of("reasoning") == "reasoning"
  assert rec.capability_of("planning") == "planning"
  assert rec.capability_of("robustness") == "other"
  assert rec.capability_of("") == "other"
  assert [rec.capability_id(c) for c in rec.CAPABILITIES] == [0, 1, 2, 3]


def test_parse_object_refs_pixels_and_normalised():
  text = "Is <c1,CAM_BACK,1088.3,497.5> near <c2,CAM_FRONT,800,450>? <c1,CAM_BACK,1088.3,497.5>"
  refs = rec.parse_object_refs(text, pixel_coordinates=True)
  assert [r.ref for r in refs] == ["<c1,CAM_BACK,1088.3,497.5>", "<c2,CAM_FRONT,800,450>"]
  assert (refs[0].index, refs[0].camera, refs[0].x, refs[0].y) == (1, "CAM_BACK", 1088.3, 497.5)
  assert refs[0].x_norm == round(1088.3 / 1600, 4) and refs[0].y_norm == round(497.5 / 900, 4)
  assert (refs[1].x_norm, refs[1].y_norm) == (0.5, 0.5)
  normalised = rec.parse_object_refs("<c2,CAM_BACK,0.7229,0.5620>", pixel_coordinates=False)
  assert (normalised[0].x_norm, normalised[0].y_norm) == (0.7229, 0.562)


def test_filter_cameras_official_rule():
  q = "Between <c1,CAM_BACK_LEFT,0.1,0.2> and <c2,CAM_FRONT,0.3,0.4>, <c3,CAM_BACK_LEFT,0.5,0.5>?"
  assert rec.tagged_cameras(q) == ["CAM_BACK_LEFT", "CAM_FRONT"]
  assert rec.filter_cameras(q, list(reversed(rec.CAMERAS))) == ["CAM_FRONT", "CAM_BACK_LEFT"]
  assert rec.filter_cameras("No tags here.", ["CAM_BACK", "CAM_FRONT"]) == ["CAM_FRONT", "CAM_BACK"]
  with pytest.raises(KeyError, match="CAM_FRONT"):
    rec.filter_cameras(q, ["CAM_BACK_LEFT"])


def test_path_rerooting():
  name = "n008__CAM_BACK__1.jpg"
  for prefix in ("data/nuscenes/", "../nuscenes/", ".../nuscenes/", "/mnt/x/", ""):
    raw = f"{prefix}samples/CAM_BACK/{name}"
    assert rec.reroot_nuscenes_path(raw) == [
      f"samples/CAM_BACK/{name}",
      f"nuscenes/samples/CAM_BACK/{name}",
    ]
    assert rec.reroot_nuscenes_path(raw, corruption_folder="Fog") == [
      f"corruption/Fog/CAM_BACK/{name}"
    ]
  assert rec.reroot_nuscenes_path(f"data/corruption/Snow/CAM_BACK/{name}") == [
    f"samples/CAM_BACK/{name}",
    f"nuscenes/samples/CAM_BACK/{name}",
  ]
  assert rec.reroot_nuscenes_path(".../100k/train/a.jpg") is None
  assert rec.strip_relative_prefix(".../100k/train/a.jpg") == "100k/train/a.jpg"
  assert rec.strip_relative_prefix("../../x/y.jpg") == "x/y.jpg"
  assert rec.camera_from_path(f"../nuscenes/samples/CAM_BACK/{name}") == "CAM_BACK"
  assert rec.camera_from_path(".../100k/train/a.jpg") is None


def test_resolve_under_root_escape_and_missing(tmp_path):
  error = rec.RecordErrorFactory("f.json", 3, "tok")
  write_image(tmp_path / "root" / "samples" / "CAM_FRONT" / "a.png", 1)
  write_image(tmp_path / "outside.png", 1)
  full, rel = rec.resolve_under_root(
    tmp_path / "root", ["samples/CAM_FRONT/a.png"], error=error, field="image_path.CAM_FRONT"
  )
  assert rel == "samples/CAM_FRONT/a.png" and full.is_file()
  with pytest.raises(rec.RecordError) as info:
    rec.resolve_under_root(
      tmp_path / "root", ["samples/CAM_FRONT/../../../outside.png"], error=error, field="p"
    )
  assert info.value.kind == "path_escape"
  assert "f.json" in str(info.value) and "record 3" in str(info.value)
  assert "token tok" in str(info.value) and "'p'" in str(info.value)
  with pytest.raises(rec.RecordError, match="image not found") as info:
    rec.resolve_under_root(tmp_path / "root", ["samples/CAM_FRONT/b.png"], error=error, field="p")
  assert info.value.kind == "missing_image"


# ---------------------------------------------------------------------------------------------
# DriveBench: a fixture in the release schema, every field checked.

VD_PATH = data_file("drivebench-toolkit", "visual_description.json")
_VD = json.loads(VD_PATH.read_text())
VD_SCENE = next(iter(_VD))
VD_FRAME = next(iter(_VD[VD_SCENE]["key_frames"]))


def _bench_image_value(frame: int, camera: str, corrupted: bool = False) -> int:
  return 10 * frame + rec.CAMERAS.index(camera) + (100 if corrupted else 0)


def _bench_items(image_prefix: str = "data/nuscenes/") -> list[dict]:
  frames = [("scene_a", "frame_a"), (VD_SCENE, VD_FRAME)]

  def paths(frame: int) -> dict[str, str]:
    token = frames[frame][1]
    return {
      c: f"{image_prefix}samples/{c}/{token}__{c}.jpg" for c in reversed(rec.CAMERAS)
    }  # reversed: the builder orders cameras itself

  def item(frame, question_type, question, answer, tag):
    scene, token = frames[frame]
    return {
      "scene_token": scene,
      "frame_token": token,
      "question_type": question_type,
      "question": question,
      "answer": answer,
      "tag": tag,
      "image_path": paths(frame),
    }

  mcq = (
    "What is the moving status of object <c2,CAM_BACK,0.7229,0.5620>? Please select the correct"
    " answer from the following options: A. Going ahead. B. Turn left. C. Turn right."
  )
  return [
    item(0, "perception", mcq, "A", [0]),
    item(0, "perception", "What are the important objects in the current scene?", "A car.", [2]),
    item(
      1,
      "planning",
      "What actions taken by the ego vehicle can lead to a collision with"
      " <c1,CAM_BACK_LEFT,0.1,0.2> or <c3,CAM_FRONT,0.5,0.6>?",
      "No such action will lead to a collision.",
      [1],
    ),
    item(1, "behavior", "Predict the behavior of the ego vehicle. A. x B. y C. z D. w", "C", [0]),
    item(1, "prediction", "What object should the ego vehicle notice first?", "Firstly ...", [3]),
    item(0, "robustness", "What is the current type of corruption?: A. Fog. B. Snow.", "A", [0]),
  ]


def write_bench_manual_dir(root: Path, items=None, corrupted: bool = True) -> Path:
  items = _bench_items() if items is None else items
  root.mkdir(parents=True, exist_ok=True)
  (root / "drivebench-test.json").write_text(json.dumps(items))
  for frame, token in enumerate(["frame_a", VD_FRAME]):
    for c in rec.CAMERAS:
      write_image(
        root / "nuscenes" / "samples" / c / f"{token}__{c}.jpg", _bench_image_value(frame, c)
      )
      if corrupted:
        write_image(
          root / "corruption" / "Fog" / c / f"{token}__{c}.jpg",
          _bench_image_value(frame, c, corrupted=True),
        )
  return root


@pytest.fixture(scope="module")
def bench_builders(tmp_path_factory):
  root = write_bench_manual_dir(tmp_path_factory.mktemp("bench") / "manual")
  out = tmp_path_factory.mktemp("bench_tfds")
  builders = {}
  for config in ("clean", "fog", "no_image"):
    builder = DriveBench(
      config=config, data_dir=out, manual_dir=root, visual_description_path=VD_PATH
    )
    builder.download_and_prepare()
    builders[config] = builder
  return builders


def test_drivebench_configs():
  names = [c.name for c in DriveBench.BUILDER_CONFIGS]
  assert names[:2] == ["clean", "no_image"]
  assert sorted(names[2:]) == sorted(CORRUPTIONS) and len(CORRUPTIONS) == 15
  assert CORRUPTIONS["h256"] == "H256ABRCompression" and CORRUPTIONS["water"] == (
    "WaterSplashCorruption"
  )


@pytest.mark.parametrize("config", ["clean", "fog", "no_image"])
def test_drivebench_every_field(bench_builders, config):
  builder = bench_builders[config]
  records = read_all(builder, "test")
  items = _bench_items()
  assert len(records) == len(items)
  frame_of = {"frame_a": 0, VD_FRAME: 1}
  seen_in_frame: dict[str, int] = {}
  expected_cameras = [
    ["CAM_BACK"],
    list(rec.CAMERAS),
    ["CAM_FRONT", "CAM_BACK_LEFT"],  # the official order, not tag or dict order
    list(rec.CAMERAS),
    list(rec.CAMERAS),
    list(rec.CAMERAS),
  ]
  for index, item in enumerate(items):
    i = seen_in_frame.get(item["frame_token"], 0)
    seen_in_frame[item["frame_token"]] = i + 1
    r = records[f"{item['scene_token']}_{item['frame_token']}_{i}"]
    assert r["source_index"] == index
    for key in ("scene_token", "frame_token", "question_type", "question", "answer"):
      assert r[key].decode() == item[key], key
    assert [int(t) for t in r["tag"]] == item["tag"]
    capability = rec.capability_of(item["question_type"])
    assert r["capability"].decode() == capability
    assert r["capability_id"] == rec.capability_id(capability)
    cameras = expected_cameras[index]
    assert texts(r["cameras"]) == cameras
    assert len(r["images"]) == len(cameras)
    frame = frame_of[item["frame_token"]]
    for camera, image, path in zip(cameras, r["images"], texts(r["image_paths"])):
      if config == "no_image":
        assert rec.decode_image(image).shape == (224, 224, 3) and pixel(image) == 0
        assert path == ""
      else:
        fog = config == "fog"
        assert pixel(image) == _bench_image_value(frame, camera, corrupted=fog)
        folder = f"corruption/Fog/{camera}" if fog else f"nuscenes/samples/{camera}"
        assert path == f"{folder}/{item['frame_token']}__{camera}.jpg"
    refs = rec.parse_object_refs(item["question"], pixel_coordinates=False)
    assert texts(r["objects"]["ref"]) == [o.ref for o in refs]
    assert texts(r["objects"]["camera"]) == [o.camera for o in refs]
    np.testing.assert_allclose(r["objects"]["x_norm"], [o.x for o in refs], rtol=1e-6)
    np.testing.assert_allclose(r["objects"]["y"], [o.y for o in refs], rtol=1e-6)
    infos = _VD[VD_SCENE]["key_frames"][VD_FRAME]["key_object_infos"] if frame == 1 else {}
    assert texts(r["key_objects"]["ref"]) == list(infos)
    assert texts(r["key_objects"]["visual_description"]) == [
      v["Visual_description"] for v in infos.values()
    ]
    for bbox, info in zip(r["key_objects"]["bbox"], infos.values()):
      np.testing.assert_allclose(bbox, info["2d_bbox"], rtol=1e-6)
    expected_description = _VD[VD_SCENE]["scene_description"] if frame == 1 else ""
    assert r["scene_description"].decode() == expected_description
  metadata = builder.info.metadata
  assert metadata["bad_records"]["test"]["num_skipped"] == 0
  assert metadata["counts"]["test"]["num_records"] == len(items)


def test_drivebench_readable_without_builder(bench_builders):
  builder = bench_builders["clean"]
  source = tfds.data_source("drivebench/clean", data_dir=builder.data_dir_root, split="test")
  assert len(source) == 6
  restored = tfds.builder_from_directory(builder.data_dir)
  assert restored.info.metadata["counts"]["test"]["setting"] == "clean"
  assert len(restored.as_data_source("test")) == 6


def test_drivebench_corruption_json_preferred(tmp_path):
  root = write_bench_manual_dir(tmp_path / "manual")
  fog_items = _bench_items()[-1:]
  (root / "fog.json").write_text(json.dumps(fog_items))
  builder = DriveBench(config="fog", data_dir=tmp_path / "out", manual_dir=root)
  builder.download_and_prepare()
  records = read_all(builder, "test")
  assert [r["question"].decode() for r in records.values()] == [fog_items[0]["question"]]
  assert builder.info.metadata["counts"]["test"]["source_file"] == str(root / "fog.json")


# ---------------------------------------------------------------------------------------------
# DriveLM: a fixture in the nested release schema.


def _lm_json() -> dict:
  def frame(token, qas, infos=True):
    out = {
      "QA": qas,
      "image_paths": {c: f"../nuscenes/samples/{c}/{token}__{c}.jpg" for c in rec.CAMERAS},
    }
    if infos:
      out["key_object_infos"] = {
        "<c1,CAM_BACK,1088.3,497.5>": {
          "Category": "Vehicle",
          "Status": "Moving",
          "Visual_description": "Brown SUV.",
          "2d_bbox": [966.6, 403.3, 1224.1, 591.7],
        },
        "<c2,CAM_FRONT,800.0,90.0>": {
          "Category": "Traffic element",
          "Status": None,
          "Visual_description": "Green light.",
          "2d_bbox": [700.0, 0.0, 900.0, 180.0],
        },
      }
    return out

  def qa(q, a, **extra):
    return {
      "Q": q,
      "A": a,
      "C": None,
      "con_up": None,
      "con_down": None,
      "cluster": None,
      "layer": None,
      **extra,
    }

  return {
    "scene_1": {
      "scene_description": "The ego vehicle proceeds.",
      "key_frames": {
        "frame_1": frame(
          "frame_1",
          {
            "behavior": [
              qa("Predict the behavior of the ego vehicle.", "The ego vehicle is going straight.")
            ],
            "perception": [
              qa("What is the moving status of object <c1,CAM_BACK,1088.3,497.5>?", "Turn left."),
              qa("What are the important objects?", "A SUV.", tag=[2]),
            ],
            "planning": [qa("Is <c2,CAM_FRONT,800.0,90.0> important?", "Yes.")],
          },
        ),
        "frame_excluded": frame("frame_excluded", {"perception": [qa("Q?", "A.")]}),
      },
    },
    "scene_2": {
      "key_frames": {
        "frame_2": frame(
          "frame_2",
          {"prediction": [qa("Is <c1,CAM_BACK,1088.3,497.5> a sign?", "No.", tag=[0])]},
          infos=False,
        )
      }
    },
  }


def write_lm_manual_dir(root: Path, data=None) -> Path:
  data = _lm_json() if data is None else data
  root.mkdir(parents=True, exist_ok=True)
  (root / "v1_1_train_nus.json").write_text(json.dumps(data))
  (root / "drivebench-test.json").write_text(
    json.dumps([{"frame_token": "frame_excluded", "question": "q"}])
  )
  for f, token in enumerate(["frame_1", "frame_excluded", "frame_2"]):
    for c in rec.CAMERAS:
      write_image(root / "samples" / c / f"{token}__{c}.jpg", _bench_image_value(f, c))
  return root


@pytest.fixture(scope="module")
def lm_builder(tmp_path_factory):
  root = write_lm_manual_dir(tmp_path_factory.mktemp("lm") / "manual")
  builder = DriveLM(data_dir=tmp_path_factory.mktemp("lm_tfds"), manual_dir=root)
  builder.download_and_prepare()
  return builder


def test_drivelm_every_field(lm_builder):
  records = read_all(lm_builder, "train")
  # i counts perception + prediction + planning + behavior of a frame, whatever the JSON order.
  status_q = "What is the moving status of object <c1,CAM_BACK,1088.3,497.5>?"
  behavior_a = "The ego vehicle is going straight."
  all_cams = list(rec.CAMERAS)
  expected = {
    "scene_1_frame_1_0": ("perception", status_q, "Turn left.", [], ["CAM_BACK"], 0),
    "scene_1_frame_1_1": (
      "perception",
      "What are the important objects?",
      "A SUV.",
      [2],
      all_cams,
      1,
    ),
    "scene_1_frame_1_2": (
      "planning",
      "Is <c2,CAM_FRONT,800.0,90.0> important?",
      "Yes.",
      [],
      ["CAM_FRONT"],
      2,
    ),
    "scene_1_frame_1_3": (
      "behavior",
      "Predict the behavior of the ego vehicle.",
      behavior_a,
      [],
      all_cams,
      3,
    ),
    "scene_2_frame_2_0": (
      "prediction",
      "Is <c1,CAM_BACK,1088.3,497.5> a sign?",
      "No.",
      [0],
      ["CAM_BACK"],
      5,
    ),
  }
  assert sorted(records) == sorted(expected)
  for record_id, (qtype, q, a, tag, cameras, source_index) in expected.items():
    r = records[record_id]
    scene, frame = record_id.rsplit("_", 1)[0].split("_frame_")
    frame = "frame_" + frame
    assert r["scene_token"].decode() == scene and r["frame_token"].decode() == frame
    assert r["source_index"] == source_index
    assert r["question_type"].decode() == qtype
    assert r["capability"].decode() == rec.capability_of(qtype)
    assert r["question"].decode() == q and r["answer"].decode() == a
    assert [int(t) for t in r["tag"]] == tag
    assert texts(r["cameras"]) == cameras
    f = {"frame_1": 0, "frame_2": 2}[frame]
    assert [pixel(i) for i in r["images"]] == [_bench_image_value(f, c) for c in cameras]
    assert texts(r["image_paths"]) == [f"samples/{c}/{frame}__{c}.jpg" for c in cameras]
    refs = rec.parse_object_refs(q, pixel_coordinates=True)
    assert texts(r["objects"]["ref"]) == [o.ref for o in refs]
    np.testing.assert_allclose(r["objects"]["x"], [o.x for o in refs], rtol=1e-6)
    np.testing.assert_allclose(r["objects"]["x_norm"], [o.x / 1600 for o in refs], atol=1e-4)
    np.testing.assert_allclose(r["objects"]["y_norm"], [o.y / 900 for o in refs], atol=1e-4)
    if frame == "frame_1":
      assert r["scene_description"].decode() == "The ego vehicle proceeds."
      assert texts(r["key_objects"]["category"]) == ["Vehicle", "Traffic element"]
      assert texts(r["key_objects"]["status"]) == ["Moving", ""]
      np.testing.assert_allclose(r["key_objects"]["bbox"][0], [966.6, 403.3, 1224.1, 591.7])
    else:
      assert r["scene_description"].decode() == "" and r["key_objects"]["ref"] == []
  counts = lm_builder.info.metadata["counts"]["train"]
  assert counts["num_frames"] == 3
  assert counts["num_excluded_frames"] == 1 and counts["num_excluded_qas"] == 1
  assert counts["num_records"] == 5


def test_drivelm_options(tmp_path):
  root = write_lm_manual_dir(tmp_path / "manual")
  (root / "drivebench-test.json").unlink()
  with pytest.raises(rec.RecordError, match="exclude_drivebench"):
    DriveLM(data_dir=tmp_path / "a", manual_dir=root).download_and_prepare()
  builder = DriveLM(
    data_dir=tmp_path / "b", manual_dir=root, exclude_drivebench=False, filter_cameras=False
  )
  builder.download_and_prepare()
  records = read_all(builder, "train")
  assert len(records) == 6
  assert all(texts(r["cameras"]) == list(rec.CAMERAS) for r in records.values())


# ---------------------------------------------------------------------------------------------
# Drive-KD QA: a fixture in the release schema.


def _kd_json() -> dict:
  nus = [f".../nuscenes/samples/{c}/kd__{c}.jpg" for c in reversed(rec.CAMERAS)]
  return {
    "data": [
      {
        "messages": [
          {"role": "user", "content": "<image>" * 6 + "Predict the behavior of the ego vehicle."},
          {"role": "assistant", "content": "Final: C. The ego vehicle is driving slowly."},
        ],
        "images": nus,
        "question_type": "Behaviour",
      },
      {
        "conversations_unused": True,
        "messages": [
          {"from": "human", "value": "<image>Moving status of <c1,CAM_FRONT,0.4678,0.6772>?"},
          {"from": "gpt", "value": "Final: {A. Going ahead.}"},
        ],
        "images": [".../100k/train/9afb9daf.jpg"],
        "question_type": " Perception ",
        "id": "kd-1",
        "scene_token": "s",
        "frame_token": "f",
        "tag": [0],
      },
      {
        "messages": [
          {"role": "user", "content": "<image>Actions based on <c1,CAM_BACK,0.2,0.5>?"},
          {"role": "assistant", "content": "Target: ..."},
        ],
        "images": [".../100k/train/other.jpg"],
        "question_type": "plan",
      },
    ]
  }


def write_kd_manual_dir(root: Path, data=None) -> Path:
  data = _kd_json() if data is None else data
  root.mkdir(parents=True, exist_ok=True)
  (root / "train.json").write_text(json.dumps(data))
  for c in rec.CAMERAS:
    write_image(root / "nuscenes" / "samples" / c / f"kd__{c}.jpg", rec.CAMERAS.index(c))
  write_image(root / "100k" / "train" / "9afb9daf.jpg", 50)
  write_image(root / "100k" / "train" / "other.jpg", 60)
  return root


@pytest.fixture(scope="module")
def kd_builder(tmp_path_factory):
  root = write_kd_manual_dir(tmp_path_factory.mktemp("kd") / "manual")
  builder = DriveKDQA(data_dir=tmp_path_factory.mktemp("kd_tfds"), manual_dir=root)
  builder.download_and_prepare()
  return builder


def test_drivekd_every_field(kd_builder):
  records = read_all(kd_builder, "train")
  assert sorted(records) == ["kd-1", "train_0", "train_2"]
  r = records["train_0"]
  assert r["question_type"].decode() == "reasoning" and r["capability_id"] == 1
  assert r["question"].decode().count("<image>") == 6 == len(r["images"])
  assert texts(r["cameras"]) == list(reversed(rec.CAMERAS))  # the order the file lists them
  assert [pixel(i) for i in r["images"]] == [rec.CAMERAS.index(c) for c in reversed(rec.CAMERAS)]
  assert r["answer"].decode() == "Final: C. The ego vehicle is driving slowly."
  assert r["scene_token"] == b"" and r["frame_token"] == b"" and r["tag"] == []
  r = records["kd-1"]
  assert r["question_type"].decode() == "perception" and r["capability"] == b"perception"
  assert (r["scene_token"], r["frame_token"], [int(t) for t in r["tag"]]) == (b"s", b"f", [0])
  assert texts(r["cameras"]) == ["CAM_FRONT"] and pixel(r["images"][0]) == 50
  assert texts(r["image_paths"]) == ["100k/train/9afb9daf.jpg"]
  assert r["answer"].decode() == "Final: {A. Going ahead.}"
  np.testing.assert_allclose(r["objects"]["x_norm"], [0.4678], rtol=1e-6)
  r = records["train_2"]
  assert r["question_type"] == b"planning" and r["capability_id"] == 2
  assert texts(r["cameras"]) == ["CAM_BACK"]  # no camera in a BDD path: the one tagged


# ---------------------------------------------------------------------------------------------
# The real release files.


@pytest.fixture(scope="module")
def real_lm_root(tmp_path_factory):
  """Images rendered for every path the real DriveLM files name."""
  root = tmp_path_factory.mktemp("real_lm")
  for name in ("train_sample.json", "test_eval.json"):
    data = json.loads(data_file("drivelm", name).read_text())
    for scene in data.values():
      for frame in scene["key_frames"].values():
        for camera, path in frame["image_paths"].items():
          write_image(root / rec.reroot_nuscenes_path(path)[0], rec.CAMERAS.index(camera))
  return root


def _real_lm_qas(name: str):
  data = json.loads(data_file("drivelm", name).read_text())
  out = {}
  for scene_token, scene in data.items():
    for frame_token, frame in scene["key_frames"].items():
      stages = [s for s in ("perception", "prediction", "planning", "behavior") if s in frame["QA"]]
      qas = [(s, qa) for s in stages for qa in frame["QA"][s]]
      for i, (stage, qa) in enumerate(qas):
        out[f"{scene_token}_{frame_token}_{i}"] = (stage, qa, frame)
  return out


def test_real_drivelm_train_sample(real_lm_root, tmp_path):
  builder = DriveLM(
    data_dir=tmp_path,
    manual_dir=real_lm_root,
    json_path=data_file("drivelm", "train_sample.json"),
    drivebench_json=VD_PATH,
  )
  builder.download_and_prepare()
  records = read_all(builder, "train")
  qas = _real_lm_qas("train_sample.json")
  bench_frames = {f for s in _VD.values() for f in s["key_frames"]}
  kept = {k: v for k, v in qas.items() if k.split("_")[1] not in bench_frames}
  assert len(qas) == 790 and len(kept) < len(qas)  # the sample holds one DriveBench keyframe
  assert sorted(records) == sorted(kept)
  for record_id, (stage, qa, frame) in kept.items():
    r = records[record_id]
    assert r["question"].decode() == qa["Q"] and r["answer"].decode() == qa["A"]
    assert r["question_type"].decode() == stage
    assert texts(r["cameras"]) == rec.filter_cameras(qa["Q"], list(frame["image_paths"]))
    assert [pixel(i) for i in r["images"]] == [rec.CAMERAS.index(c) for c in texts(r["cameras"])]
    assert texts(r["key_objects"]["ref"]) == list(frame["key_object_infos"])
  counts = builder.info.metadata["counts"]["train"]
  assert counts["num_excluded_qas"] == len(qas) - len(kept)


def test_real_drivelm_test_eval(real_lm_root, tmp_path):
  builder = DriveLM(
    data_dir=tmp_path,
    manual_dir=real_lm_root,
    json_path=data_file("drivelm", "test_eval.json"),
    exclude_drivebench=False,
  )
  builder.download_and_prepare()
  records = read_all(builder, "train")
  qas = _real_lm_qas("test_eval.json")
  assert sorted(records) == sorted(qas)
  for record_id, (stage, qa, _) in qas.items():
    r = records[record_id]
    assert [int(t) for t in r["tag"]] == qa["tag"]
    assert r["capability"].decode() == rec.capability_of(stage)
  assert {r["capability"] for r in records.values()} == {b"perception", b"reasoning", b"planning"}


def test_real_drivekd_demo(tmp_path):
  demo = json.loads(data_file("drivekd", "demo.json").read_text())
  root = tmp_path / "images"
  for item in demo:
    for i, path in enumerate(item["images"]):
      write_image(root / rec.strip_relative_prefix(path), i)
  builder = DriveKDQA(
    data_dir=tmp_path / "out", manual_dir=root, json_path=data_file("drivekd", "demo.json")
  )
  builder.download_and_prepare()
  records = read_all(builder, "train")
  assert len(records) == len(demo) == 7
  for index, item in enumerate(demo):
    r = records[f"demo_{index}"]
    assert r["question"].decode() == item["messages"][0]["content"]
    assert r["answer"].decode() == item["messages"][1]["content"]
    assert r["question_type"].decode() == item["question_type"]
    assert len(r["images"]) == len(item["images"])
    assert [pixel(i) for i in r["images"]] == list(range(len(item["images"])))
    expected = [rec.camera_from_path(p) or "CAM_FRONT" for p in item["images"]]
    assert texts(r["cameras"]) == expected


def test_real_visual_description_as_exclusion_list():
  from drivekd_jax.data.drivelm import drivebench_frame_tokens

  tokens = drivebench_frame_tokens(VD_PATH)
  assert len(tokens) == 200  # DriveBench's 200 keyframes


# ---------------------------------------------------------------------------------------------
# Bad input: an error naming file, record and field; or skipped, counted and reported.


def _bench_case(root: Path, case: str) -> tuple[str | None, str | None, str]:
  """Writes a DriveBench manual dir with one bad record (index 1): (token, field, kind)."""
  items = _bench_items()[:3]
  write_bench_manual_dir(root, items=items, corrupted=False)
  bad = items[1]
  token = bad["frame_token"]
  if case == "missing_field":
    del bad["answer"]
    field, kind = "answer", "missing_field"
  elif case == "wrong_type":
    bad["tag"] = ["zero"]
    field, kind = "tag", "wrong_type"
  elif case == "missing_image":
    (root / "nuscenes" / "samples" / "CAM_FRONT_RIGHT" / f"{token}__CAM_FRONT_RIGHT.jpg").unlink()
    field, kind = "image_path.CAM_FRONT_RIGHT", "missing_image"
  elif case == "unreadable_image":
    path = root / "nuscenes" / "samples" / "CAM_FRONT_RIGHT" / f"{token}__CAM_FRONT_RIGHT.jpg"
    path.write_bytes(b"\xff\xd8 not a jpeg")
    field, kind = "image_path.CAM_FRONT_RIGHT", "unreadable_image"
  elif case == "path_escape":
    bad["image_path"]["CAM_FRONT"] = "data/nuscenes/samples/CAM_FRONT/../../../../../secret.jpg"
    field, kind = "image_path.CAM_FRONT", "path_escape"
  elif case == "unknown_camera":
    bad["image_path"]["CAM_TOP"] = "data/nuscenes/samples/CAM_TOP/x.jpg"
    field, kind = "image_path", "invalid"
  elif case == "unknown_tag_camera":
    bad["question"] = "What about <c1,CAM_TOP,0.5,0.5>?"
    field, kind = "question", "invalid"
  elif case == "not_an_object":
    items[1] = ["not", "a", "record"]
    token, field, kind = None, None, "invalid"
  else:
    raise AssertionError(case)
  (root / "drivebench-test.json").write_text(json.dumps(items))
  return token, field, kind


BAD_CASES = [
  "missing_field",
  "wrong_type",
  "missing_image",
  "unreadable_image",
  "path_escape",
  "unknown_camera",
  "unknown_tag_camera",
  "not_an_object",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_drivebench_bad_record(tmp_path, case):
  root = tmp_path / "manual"
  token, field, kind = _bench_case(root, case)
  with pytest.raises(rec.RecordError) as info:
    DriveBench(data_dir=tmp_path / "strict", manual_dir=root).download_and_prepare()
  error = info.value
  assert error.file == str(root / "drivebench-test.json") and error.index == 1
  assert (error.token, error.field, error.kind) == (token, field, kind)
  message = str(error)
  assert str(root / "drivebench-test.json") in message and "record 1" in message
  if field:
    assert repr(field) in message
  builder = DriveBench(data_dir=tmp_path / "lenient", manual_dir=root, skip_bad_records=True)
  builder.download_and_prepare()
  assert len(builder.as_data_source("test")) == 2
  report = tfds.builder_from_directory(builder.data_dir).info.metadata["bad_records"]["test"]
  assert report["num_skipped"] == 1 and report["by_kind"] == {kind: 1}
  assert report["first_messages"] == [message]


def test_malformed_json_names_the_file(tmp_path):
  root = write_bench_manual_dir(tmp_path / "manual", corrupted=False)
  (root / "drivebench-test.json").write_text('[{"scene_token": "a",\n  "frame_token": }]')
  for skip in (False, True):  # A file that does not parse cannot be skipped record by record.
    with pytest.raises(rec.RecordError, match=r"malformed JSON at line 2") as info:
      DriveBench(
        data_dir=tmp_path / str(skip), manual_dir=root, skip_bad_records=skip
      ).download_and_prepare()
    assert info.value.file == str(root / "drivebench-test.json")
    assert info.value.kind == "malformed_json"


def test_drivelm_bad_records(tmp_path):
  data = _lm_json()
  frame_1 = data["scene_1"]["key_frames"]["frame_1"]
  del frame_1["QA"]["perception"][1]["A"]
  del data["scene_2"]["key_frames"]["frame_2"]["image_paths"]
  root = write_lm_manual_dir(tmp_path / "manual", data)
  with pytest.raises(rec.RecordError) as info:
    DriveLM(data_dir=tmp_path / "strict", manual_dir=root).download_and_prepare()
  assert (info.value.index, info.value.token, info.value.field) == (
    1,
    "frame_1",
    "QA.perception[1].A",
  )
  builder = DriveLM(data_dir=tmp_path / "lenient", manual_dir=root, skip_bad_records=True)
  builder.download_and_prepare()
  assert len(builder.as_data_source("train")) == 3
  report = builder.info.metadata["bad_records"]["train"]
  assert report["num_skipped"] == 2 and report["by_kind"] == {"missing_field": 2}
  assert any("token frame_2" in m and "'image_paths'" in m for m in report["first_messages"])


def test_drivekd_bad_records(tmp_path):
  data = _kd_json()
  data["data"][0]["images"] = data["data"][0]["images"][:5]  # 6 <image> slots, 5 images
  data["data"][1]["images"] = [".../nuscenes/samples/CAM_TOP/x.jpg"]
  del data["data"][2]["question_type"]
  root = write_kd_manual_dir(tmp_path / "manual", data)
  with pytest.raises(rec.RecordError, match="6 <image> slots but 5 images") as info:
    DriveKDQA(data_dir=tmp_path / "strict", manual_dir=root).download_and_prepare()
  assert (info.value.index, info.value.field) == (0, "images")
  with pytest.raises(rec.RecordError, match=r"no records left \(3 bad records skipped"):
    DriveKDQA(
      data_dir=tmp_path / "all_bad", manual_dir=root, skip_bad_records=True
    ).download_and_prepare()
  data["data"].append(_kd_json()["data"][1])
  root = write_kd_manual_dir(tmp_path / "manual", data)
  builder = DriveKDQA(data_dir=tmp_path / "lenient", manual_dir=root, skip_bad_records=True)
  builder.download_and_prepare()
  assert len(builder.as_data_source("train")) == 1
  report = builder.info.metadata["bad_records"]["train"]
  assert report["num_skipped"] == 3
  assert report["by_kind"] == {"invalid": 2, "missing_field": 1}
  messages = report["first_messages"]
  assert "token kd-1" in messages[1] and "unknown camera 'CAM_TOP'" in messages[1]
  assert "'question_type'" in messages[2] and "record 2" in messages[2]


def test_image_size_option_resizes(tmp_path):
  root = write_bench_manual_dir(tmp_path / "manual", corrupted=False)
  builder = DriveBench(data_dir=tmp_path / "out", manual_dir=root, image_size=32)
  builder.download_and_prepare()
  record = builder.as_data_source("test")[0]
  assert all(rec.decode_image(i).shape == (32, 32, 3) for i in record["images"])


def test_build_dataset_helper(tmp_path):
  root = write_kd_manual_dir(tmp_path / "manual")
  builder = sources.build_dataset("drivekd_qa", root, tmp_path / "out")
  assert len(builder.as_data_source("train")) == 3
  shutil.rmtree(root / "100k")
  with pytest.raises(rec.RecordError, match="image not found"):
    sources.build_dataset("drivekd_qa", root, tmp_path / "out", overwrite=True)
  with pytest.raises(ValueError, match="unknown dataset kind"):
    sources.build_dataset("nuscenes", root, tmp_path / "out")
