"""Toy reproduction: grounded synthetic questions, exact scoring, summaries over seeds, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drivekd_jax.data import records as rec
from drivekd_jax.data import synthetic
from drivekd_jax.eval import comparison
from drivekd_jax.eval import results as results_lib


def _row(capability, reference, prediction):
  return {"capability": capability, "reference": reference, "prediction": prediction}


# ------------------------------------------------------------------------------------------------
# The grounded question set.


def _scenes(count=80, seed=3):
  rng = np.random.default_rng(seed)
  return [synthetic.sample_scene(rng, f"s{i}", f"f{i}") for i in range(count)], rng


def _option(question: str, letter: str) -> str:
  tail = question.split("from the following options: ", 1)[1]
  parts = tail.split(f"{letter}. ", 1)[1]
  return parts.split(" ", 1)[0] if not parts.startswith("Keep") else parts


def test_grounded_answers_follow_the_scene():
  scenes, rng = _scenes()
  seen = {"perception": 0, "behavior": 0, "planning": 0}
  answers = []
  colour_asked = []  # the vehicle each scene's colour question names
  for scene in scenes:
    by_tag = {o.tag(pixels=False): o for o in scene.objects}
    qas = synthetic.grounded_qas(scene, rng)
    colours = [qa for qa in qas if qa.question_type == "perception"]
    vehicles = [o for o in scene.objects if o.kind == "vehicle"]
    assert len(colours) == (1 if vehicles else 0)  # one colour question per scene
    if len(vehicles) > 1:
      colour_asked.append([o.tag(pixels=False) in colours[0].bench_q for o in vehicles].index(True))
    for qa in qas:
      seen[qa.question_type] += 1
      tags = [t for t in by_tag if t in qa.bench_q]
      assert len(tags) == 1, qa.bench_q  # one object, so one camera view goes with it
      obj = by_tag[tags[0]]
      assert rec.filter_cameras(qa.bench_q, rec.CAMERAS) == [obj.camera]
      if qa.question_type == "perception":
        assert obj.kind == "vehicle"
        assert _option(qa.bench_q, qa.bench_a) == obj.description.split()[0].capitalize() + "."
        assert qa.kd_a == f"Final: {qa.bench_a}. {qa.drivelm_a}"
      else:
        # Only what the view decides: the light's colour, the lane vehicle's state and distance.
        assert obj.camera == "CAM_FRONT"
        assert obj.kind == "traffic_light" or (obj.kind == "vehicle" and obj.in_ego_lane)
        if qa.question_type == "behavior":
          assert _option(qa.bench_q, qa.bench_a) == ("Yes." if obj.is_hazard else "No.")
          answers.append(obj.is_hazard)
        else:
          assert qa.tag == 1
          if obj.kind == "traffic_light":
            expected = {"red": "Stop.", "yellow": "Slow down.", "green": "Keep going."}[obj.status]
          elif obj.near:
            expected = "Stop." if obj.status == "Stopped" else "Slow down."
          else:
            expected = "Keep going."
          assert qa.bench_a == expected
  assert min(seen.values()) > 10, seen
  assert len(set(colour_asked)) > 1  # not always the first vehicle
  assert 0.45 < np.mean(answers) < 0.75  # Yes and No about equally often (all asked: 0.35)


def test_grounded_colour_is_in_the_rendered_view():
  scenes, _ = _scenes(30)
  checked = 0
  for scene in scenes:
    for obj in scene.objects:
      if obj.kind != "vehicle":
        continue
      view = synthetic.render_view(scene, obj.camera, 56)
      # The box's upper-left quarter: body colour only (the mark is central, lights low).
      row = int((obj.y - 0.6 * obj.size / 2 + 0.02) * 56)
      col = int((obj.x - obj.size / 2 + 0.02) * 56)
      color = synthetic._COLORS[obj.description.split()[0]]
      if any(
        o is not obj and o.camera == obj.camera and abs(o.x - obj.x) < 0.3 for o in scene.objects
      ):
        continue  # an overlapping object may cover it
      assert tuple(view[row, col]) == color, (obj, view[row, col])
      checked += 1
  assert checked > 20


def test_grounded_views_show_the_stop_cues_as_large_areas():
  rng = np.random.default_rng(5)
  scenes = [
    synthetic.sample_scene(rng, "s", f"f{i}", **synthetic.GROUNDED_SCENES) for i in range(60)
  ]
  lights = stopped = 0
  for scene in map(lambda s: synthetic.enlarged(s, synthetic.GROUNDED_SCALE), scenes):
    bold = synthetic.render_view(scene, "CAM_FRONT", 56, bold=True)
    plain = synthetic.render_view(scene, "CAM_FRONT", 56)
    for obj in scene.objects:
      if obj.camera != "CAM_FRONT" or any(
        o is not obj and o.camera == "CAM_FRONT" and abs(o.x - obj.x) < 0.4 for o in scene.objects
      ):
        continue  # an overlapping object may cover it
      if obj.kind == "traffic_light":
        # The housing's corner takes the lit colour (plain: dark, the lamp a small disc).
        row, col = int((obj.y - 0.9 * obj.size) * 56), int((obj.x - 0.25 * obj.size) * 56)
        assert tuple(bold[row, col]) == synthetic._COLORS[obj.status], obj
        assert tuple(plain[row, col]) == (20, 20, 20)
        lights += 1
      elif obj.kind == "vehicle" and obj.status == "Stopped":
        # Brake lights over the lower half, from the sides to near the centre.
        row = int((obj.y + 0.6 * obj.size * 0.3) * 56)
        col = int((obj.x - 0.2 * obj.size) * 56)
        assert tuple(bold[row, col]) == (255, 0, 0), obj
        stopped += 1
  assert lights > 5 and stopped > 3, (lights, stopped)
  # The grounded scenes show a light and a stopped vehicle ahead more often than set "driving".
  rng = np.random.default_rng(5)
  driving = [synthetic.sample_scene(rng, "s", f"f{i}") for i in range(200)]
  rng = np.random.default_rng(5)
  grounded = [
    synthetic.sample_scene(rng, "s", f"f{i}", **synthetic.GROUNDED_SCENES) for i in range(200)
  ]

  def share(scenes, test):
    return np.mean([any(test(o) for o in s.objects) for s in scenes])

  def is_light(o):
    return o.kind == "traffic_light"

  def is_stopped_ahead(o):
    return o.kind == "vehicle" and o.in_ego_lane and o.status == "Stopped"

  assert share(grounded, is_light) > 1.5 * share(driving, is_light)
  assert share(grounded, is_stopped_ahead) > 1.3 * share(driving, is_stopped_ahead)
  with pytest.raises(ValueError, match="signals must be four"):
    synthetic.sample_scene(rng, "s", "f", signals=("traffic_light",))


def test_grounded_files_and_bad_question_set(tmp_path):
  paths = synthetic.write_synthetic_driving(
    tmp_path / "g", num_train_frames=16, num_test_frames=2, image_size=32, questions="grounded"
  )
  train = json.loads(paths.drivekd_train_json.read_text())
  assert {x["question_type"] for x in train} == {"perception", "reasoning", "planning"}
  for item in train:
    assert item["messages"][0]["content"].count("<image>") == len(item["images"]) == 1
  # The written views are the bold ones: a light's housing centre shows its lit colour.
  lit = {synthetic._COLORS[c] for c in ("red", "yellow", "green")}
  lights = [
    item
    for item in train
    if item["question_type"] == "planning" and ",0.2000>" in item["messages"][0]["content"]
  ]
  assert lights
  for item in lights:
    x = float(item["messages"][0]["content"].split(",")[2])
    name = item["images"][0].split("/")[-1]
    view = rec.decode_image((paths.root / "samples" / "CAM_FRONT" / name).read_bytes())
    assert tuple(view[int(0.2 * 32) + 1, int(x * 32)]) in lit, item
  bench = json.loads(paths.drivebench_json.read_text())
  assert {b["question_type"] for b in bench} <= {"perception", "behavior", "planning"}
  assert all(len(b["answer"]) == 1 for b in bench if b["tag"] == [0])  # MCQ: a letter
  with pytest.raises(ValueError, match="unknown question set 'nope'"):
    synthetic.write_synthetic_driving(tmp_path / "x", questions="nope")


# ------------------------------------------------------------------------------------------------
# Scoring.


@pytest.mark.parametrize(
  "reference, prediction, correct",
  [
    ("Final: B. No.", "Final: B. No.", True),
    ("Final: B. No.", "Final: B. Yes.", True),  # the letter decides
    ("Final: B. No.", "Final: A. No.", False),
    ("Final: B. No.", "No.", False),
    ("Stop.", "stop", True),
    ("Keep going.", "Keep  going!", True),
    ("Keep going.", "Keep going. Stop.", False),
    ("Slow down.", "", False),
  ],
)
def test_is_correct(reference, prediction, correct):
  assert results_lib.is_correct(reference, prediction) is correct


def test_accuracy_row_counts_every_capability_and_averages_the_present_ones():
  rows = [
    _row("perception", "Final: A. Red.", "Final: A. Red."),
    _row("perception", "Final: C. Blue.", "Final: D. Red."),
    _row("planning", "Stop.", "Stop."),
  ]
  row = results_lib.accuracy_row("m", rows)
  assert row["perception"] == 0.5 and row["planning"] == 1.0 and row["reasoning"] is None
  assert row["average"] == 0.75
  assert row["questions"] == {"perception": 2, "planning": 1}


def test_read_answers_names_the_bad_line(tmp_path):
  path = tmp_path / "answers.jsonl"
  path.write_text(json.dumps(_row("planning", "Stop.", "Stop.")) + "\n" + '{"capability": "x"}\n')
  with pytest.raises(ValueError, match=r"answers.jsonl: line 2 has no field 'reference'"):
    results_lib.read_answers(str(path))


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_questions():
  rng = np.random.default_rng(0)
  few = {"perception": [rng.random(20) < 0.7 for _ in range(3)]}
  many = {"perception": [rng.random(2000) < 0.7 for _ in range(3)]}
  low, high = results_lib.bootstrap_interval(few)["perception"]
  mean = np.mean([m.mean() for m in few["perception"]])
  assert low <= mean <= high and high - low > 0.1
  low2, high2 = results_lib.bootstrap_interval(many)["perception"]
  assert high2 - low2 < (high - low) / 4
  assert results_lib.bootstrap_interval({"planning": [np.ones(9, bool)]})["planning"] == (1.0, 1.0)


def test_write_results_files(tmp_path):
  rows = [{"model": "student/after", "perception": 0.5, "reasoning": None, "planning": 1.0}]
  text = results_lib.write_results(str(tmp_path), rows, title="T", notes=["n"])
  assert json.loads((tmp_path / "results.json").read_text())["rows"] == rows
  assert (tmp_path / "results.md").read_text() == text
  assert "| student/after | 50.0 | - | 100.0 | - |" in text


# ------------------------------------------------------------------------------------------------
# The comparison.


def test_arms_switch_only_the_distillation_losses():
  assert comparison.arm_overrides("sft")["capabilities"] == ()
  assert comparison.arm_overrides("single/reasoning") == {"capabilities": ("reasoning",)}
  assert comparison.arm_overrides("multi/sum") == {
    "capabilities": ("perception", "reasoning", "planning"),
    "agp_mode": "sum",
  }
  assert comparison.arm_overrides("multi/agp")["agp_mode"] == "agp"
  with pytest.raises(ValueError, match="unknown arm 'single/other'"):
    comparison.arm_overrides("single/other")


def test_summarize_means_over_seeds_and_refuses_different_questions():
  seed0 = [_row("perception", "Final: A. x", "A"), _row("planning", "Stop.", "Stop.")]
  seed1 = [_row("perception", "Final: A. x", "B"), _row("planning", "Stop.", "Stop.")]
  (row,) = comparison.summarize({"student/sft": [seed0, seed1]}, num_samples=200)
  assert row["perception"] == 0.5 and row["planning"] == 1.0 and row["average"] == 0.75
  assert row["seeds"] == 2 and [r["perception"] for r in row["per_seed"]] == [1.0, 0.0]
  assert row["ci"]["planning"] == [1.0, 1.0]
  low, high = row["ci"]["perception"]
  assert low <= 0.5 <= high
  with pytest.raises(ValueError, match="the seeds answered different perception questions"):
    comparison.summarize({"m": [seed0, seed1 + [_row("perception", "Final: B. y", "B")]]})


def test_agp_curves_average_the_common_steps():
  seed0 = {"agp/stage1_conflicts": [(1, 2.0), (2, 0.0)], "agp/cos_sup_planning": [(1, 0.5)]}
  seed1 = {"agp/stage1_conflicts": [(1, 4.0), (2, 2.0), (3, 1.0)], "loss": [(1, 3.0)]}
  curves = comparison.agp_curves([seed0, seed1])
  assert curves == {"agp/stage1_conflicts": [(1, 3.0), (2, 1.0)]}
  seed1["agp/cos_sup_planning"] = [(1, -0.5)]
  curves = comparison.agp_curves([seed0, seed1])
  assert curves["agp/cos_sup_planning"] == [(1, 0.0)]
  totals = comparison.agp_totals(curves)
  assert totals == {"agp/stage1_conflicts": 4.0, "agp/cos_sup_planning": 0.0}


def test_plots_are_written(tmp_path):
  rows = [
    {
      "model": "student/sft",
      "perception": 0.4,
      "reasoning": 0.6,
      "planning": 0.5,
      "average": 0.5,
      "ci": {"perception": [0.3, 0.5]},
    },
  ]
  png = comparison.plot_accuracy(rows, str(tmp_path / "a.png"), title="t")
  agp = comparison.plot_agp(
    {"agp/stage1_conflicts": [(1, 1.0), (2, 0.0)], "agp/cos_sup_planning": [(1, 0.2)]},
    str(tmp_path / "g.png"),
    title="t",
  )
  for path in (png, agp):
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
