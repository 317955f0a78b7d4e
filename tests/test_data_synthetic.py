"""Synthetic driving scenes: determinism, scene rules, the three formats through every builder."""

import json
import re

import numpy as np
import pytest

from drivekd_jax.data import records as rec
from drivekd_jax.data import sources, synthetic

NUM_TRAIN, NUM_TEST = 16, 6


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  return synthetic.write_synthetic_driving(
    tmp_path_factory.mktemp("syn") / "raw",
    num_train_frames=NUM_TRAIN,
    num_test_frames=NUM_TEST,
    seed=7,
    image_size=32,
    corruptions=("fog",),
  )


@pytest.fixture(scope="module")
def built(written, tmp_path_factory):
  out = tmp_path_factory.mktemp("syn_tfds")
  return {
    "clean": sources.build_dataset("drivebench", written.root, out, config="clean"),
    "fog": sources.build_dataset("drivebench", written.root, out, config="fog"),
    "drivelm": sources.build_dataset("drivelm", written.root, out),
    "drivekd_qa": sources.build_dataset("drivekd_qa", written.root, out),
  }


def load(path):
  return json.loads(path.read_text())


def mcq_options(question: str) -> dict[str, str]:
  """{letter: option text} of an official-style MCQ question."""
  tail = question.split("from the following options: ", 1)[1]
  parts = re.split(r"(?:^| )([A-D])\. ", tail)
  return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_deterministic_for_a_seed(tmp_path, written):
  again = synthetic.write_synthetic_driving(
    tmp_path / "again",
    num_train_frames=NUM_TRAIN,
    num_test_frames=NUM_TEST,
    seed=7,
    image_size=32,
    corruptions=("fog",),
  )
  for name in ("drivebench_json", "drivelm_json", "drivekd_train_json", "visual_description_json"):
    assert getattr(again, name).read_bytes() == getattr(written, name).read_bytes(), name
  images = sorted(p.relative_to(written.root) for p in written.root.rglob("*.png"))
  assert images == sorted(p.relative_to(again.root) for p in again.root.rglob("*.png"))
  assert all((written.root / p).read_bytes() == (again.root / p).read_bytes() for p in images)
  other = synthetic.write_synthetic_driving(
    tmp_path / "other", num_train_frames=NUM_TRAIN, num_test_frames=NUM_TEST, seed=8
  )
  assert other.drivelm_json.read_bytes() != written.drivelm_json.read_bytes()


def test_files_in_the_release_formats(written):
  bench = load(written.drivebench_json)
  assert {item["frame_token"] for item in bench}.__len__() == NUM_TEST
  pairs = {(item["question_type"], tuple(item["tag"])) for item in bench}
  assert pairs <= {
    ("perception", (0,)),
    ("perception", (2,)),
    ("prediction", (3,)),
    ("planning", (1,)),
    ("behavior", (0,)),
  }
  assert {q for q, _ in pairs} == {"perception", "prediction", "planning", "behavior"}
  for item in bench:
    assert set(item) == {
      "scene_token",
      "frame_token",
      "question_type",
      "question",
      "answer",
      "tag",
      "image_path",
    }
    assert list(item["image_path"]) == list(rec.CAMERAS)
    if item["tag"] == [0]:
      assert item["answer"] in mcq_options(item["question"])
  lm = load(written.drivelm_json)
  frames = [f for scene in lm.values() for f in scene["key_frames"].values()]
  assert len(frames) == NUM_TRAIN + NUM_TEST  # DriveBench keyframes are DriveLM train frames
  for frame in frames:
    assert set(frame) == {"key_object_infos", "QA", "image_paths"}
    for ref, info in frame["key_object_infos"].items():
      assert re.fullmatch(r"<c\d+,CAM_[A-Z_]+,\d+\.\d,\d+\.\d>", ref)
      assert set(info) == {"Category", "Status", "Visual_description", "2d_bbox"}
  vd = load(written.visual_description_json)
  assert sum(len(s["key_frames"]) for s in vd.values()) == NUM_TEST
  kd = load(written.drivekd_train_json)
  assert {item["question_type"] for item in kd} == {"perception", "reasoning", "planning"}
  for item in kd:
    content = item["messages"][0]["content"]
    assert content.count("<image>") == len(item["images"])
    assert content.startswith("<image>" * len(item["images"]))


def test_answers_follow_the_scene_rules():
  rng = np.random.default_rng(0)
  seen_hazard = seen_free = 0
  for i in range(200):
    scene = synthetic.sample_scene(rng, "s", f"f{i}")
    assert 3 <= len(scene.objects) <= 5
    qas = synthetic.scene_qas(scene, rng)
    by_question = {qa.drivelm_q.split("?")[0]: qa for qa in qas}
    behavior = by_question["Predict the behavior of the ego vehicle."]
    safe = by_question["In this scenario, what are safe actions to take for the ego vehicle"]
    hazards = [o for o in scene.objects if o.is_hazard]
    for o in hazards:
      assert o.camera == "CAM_FRONT"
      assert (
        (o.kind == "traffic_light" and o.status == "red")
        or o.kind == "stop_sign"
        or (o.kind == "pedestrian" and o.in_ego_lane)
        or (o.kind == "vehicle" and o.status == "Stopped" and o.near and o.in_ego_lane)
      )
    if hazards:
      seen_hazard += 1
      assert behavior.drivelm_a == synthetic.NOT_MOVING
      assert safe.drivelm_a.startswith("Brake gently to a stop")
      notice = by_question["What object should the ego vehicle notice first when the ego vehicle"
                           " is getting to the next possible location"]  # fmt: skip
      first_tag = re.search(r"Firstly notice that (<[^>]+>)", notice.drivelm_a).group(1)
      assert first_tag in {o.tag(pixels=True) for o in hazards}
      assert "so the ego vehicle should stop." in notice.drivelm_a.split("Secondly")[0]
    else:
      seen_free += 1
      steering = synthetic.STEERINGS[scene.curvature + 2]
      assert behavior.drivelm_a.startswith(f"The ego vehicle is {steering}.")
      assert "not moving" not in behavior.drivelm_a
    options = mcq_options(behavior.bench_q)
    assert len(options) == 4 and options[behavior.bench_a] == behavior.drivelm_a
    assert behavior.kd_a == f"Final: {behavior.bench_a}. {behavior.drivelm_a}"
    for qa in qas:
      if qa.drivelm_q.startswith("What is the moving status of object"):
        options = mcq_options(qa.bench_q)
        assert sorted(options.values()) == sorted(synthetic.MOVING_STATUS_OPTIONS)
        assert options[qa.bench_a] == qa.drivelm_a
        index = int(re.search(r"<c(\d+),", qa.drivelm_q).group(1))
        assert qa.drivelm_a == scene.objects[index - 1].status + "."
  assert seen_hazard > 20 and seen_free > 20


def test_rendered_views_show_the_objects():
  rng = np.random.default_rng(1)
  for i in range(30):
    scene = synthetic.sample_scene(rng, "s", f"f{i}")
    for obj in scene.objects:
      view = synthetic.render_view(scene, obj.camera, 64)
      assert view.shape == (64, 64, 3) and view.dtype == np.uint8
      if obj.kind == "vehicle":
        # The body left of the status arrow has the described colour.
        row, col = int(obj.y * 64), int((obj.x - 0.38 * obj.size) * 64)
        body = synthetic._COLORS[obj.description.split()[0]]
        assert tuple(view[row, col]) == body, obj
        if obj.status == "Stopped":  # brake lights
          assert tuple(view[int((obj.y + 0.2 * obj.size) * 64), col]) == (255, 0, 0), obj
        else:  # the status arrow at the centre
          mark = (0, 0, 0) if obj.description.startswith("white") else (255, 255, 255)
          assert tuple(view[row, int(obj.x * 64)]) == mark, obj
      if obj.kind == "traffic_light":
        lit = synthetic._COLORS[obj.status]
        assert (view.reshape(-1, 3) == lit).all(-1).any()


def test_formats_agree_on_the_test_frames(written):
  bench = load(written.drivebench_json)
  kd_test = load(written.drivekd_test_json)
  assert len(bench) == len(kd_test)
  for item, kd in zip(bench, kd_test):
    assert kd["frame_token"] == item["frame_token"]
    assert kd["question_type"] == rec.capability_of(item["question_type"])
    assert kd["messages"][0]["content"].replace("<image>", "") == item["question"]
    answer = kd["messages"][1]["content"]
    if item["tag"] == [0]:
      assert answer.startswith(f"Final: {item['answer']}. ")
    else:
      assert answer == item["answer"]
    expected_cameras = rec.filter_cameras(item["question"], rec.CAMERAS)
    assert [rec.camera_from_path(p) for p in kd["images"]] == expected_cameras


def test_through_every_builder(written, built):
  bench = load(written.drivebench_json)
  kd_train = load(written.drivekd_train_json)
  kd_test = load(written.drivekd_test_json)
  for config in ("clean", "fog"):
    source = built[config].as_data_source("test")
    assert len(source) == len(bench)
    for i in range(len(source)):
      record = source[i]
      item = bench[record["source_index"]]
      assert record["answer"].decode() == item["answer"]
      cameras = [c.decode() for c in record["cameras"]]
      assert cameras == rec.filter_cameras(item["question"], rec.CAMERAS)
      assert all(rec.decode_image(im).shape == (32, 32, 3) for im in record["images"])
      folder = "corruption/Fog/" if config == "fog" else "samples/"
      assert all(p.decode().startswith(folder) for p in record["image_paths"])
      assert record["key_objects"]["ref"], "visual_description.json gives the key objects"
  lm = built["drivelm"]
  counts = lm.info.metadata["counts"]["train"]
  assert counts["num_excluded_frames"] == NUM_TEST
  assert counts["num_excluded_qas"] == len(bench)
  assert len(lm.as_data_source("train")) == len(kd_train)
  record = lm.as_data_source("train")[0]
  assert all(0 <= x <= 1 for x in record["objects"]["x_norm"])
  kd = built["drivekd_qa"]
  assert len(kd.as_data_source("train")) == len(kd_train)
  assert len(kd.as_data_source("test")) == len(kd_test)
  capabilities = set()
  source = kd.as_data_source("train")
  for i in range(len(source)):
    record = source[i]
    assert record["question"].count(b"<image>") == len(record["images"]) == len(record["cameras"])
    capabilities.add(record["capability"].decode())
  assert capabilities == {"perception", "reasoning", "planning"}


def test_cli_and_bad_arguments(tmp_path, capsys):
  synthetic.main(
    ["--out", str(tmp_path / "cli"), "--num_train_frames", "2", "--num_test_frames", "1"]
  )
  assert "drivebench_json" in capsys.readouterr().out
  assert (tmp_path / "cli" / "drivebench-test.json").is_file()
  assert len(list((tmp_path / "cli" / "samples" / "CAM_BACK").glob("*.png"))) == 3
  with pytest.raises(ValueError, match="unknown corruption 'smoke'"):
    synthetic.write_synthetic_driving(tmp_path / "bad", corruptions=("smoke",))


def test_every_corruption_renders():
  from drivekd_jax.data.drivebench import CORRUPTIONS

  rng = np.random.default_rng(0)
  scene = synthetic.sample_scene(rng, "s", "f")
  view = synthetic.render_view(scene, "CAM_FRONT", 32)
  for stem in CORRUPTIONS:
    out = synthetic.corrupt(view, stem, rng)
    assert out.shape == view.shape and out.dtype == np.uint8
    assert not np.array_equal(out, view), stem


def test_records_feed_the_processor(written, built, tmp_path):
  """Every builder's records become processed examples (helper D's processor)."""
  from drivekd_jax.data.processor import Processor, ProcessorConfig
  from drivekd_jax.data.tokenizer import train_bpe_tokenizer

  kd = load(written.drivekd_train_json)
  texts = [m["content"] for item in kd for m in item["messages"]]
  tokenizer = train_bpe_tokenizer(texts, 400, tmp_path / "tok")
  processor = Processor(tokenizer, ProcessorConfig(image_size=28, tokens_per_image=4))
  for name, split in (("clean", "test"), ("drivelm", "train"), ("drivekd_qa", "train")):
    source = built[name].as_data_source(split)
    for i in range(0, len(source), 7):
      record = source[i]
      example = processor.record_example(record)
      num_images = len(record["images"])
      assert example["pixel_values"].shape == (num_images, 28, 28, 3)
      assert int(example["image_mask"].sum()) == 4 * num_images
      assert int(example["capability"]) == int(record["capability_id"])
      assert (example["labels"] != -100).any()
