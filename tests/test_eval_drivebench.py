"""DriveBench scoring: answers files, parsers, rubric routing, judging, language, scores.json.

The answers are the fixture's 15 release items (tests/data/drivebench) with hand-made
predictions; a fake in-process judge replies with a fixed score per prediction, so every
capability score, accuracy and failure count below is computed by hand.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from drivekd_jax.data import records as rec
from drivekd_jax.eval import answers as answers_lib
from drivekd_jax.eval import drivebench, drivelm, language, rubrics
from drivekd_jax.eval.judge_client import JudgeError

DATA = Path(__file__).parent / "data" / "drivebench"

# Per item of drivebench-test.json, in file order: (prediction, judge behaviour).
# A behaviour is a score, "never" (no Total Score in any reply) or ("flaky", score): the first
# call raises JudgeError, the second returns the score.
PLAN = [
  ("There is a yellow light ahead.", 40),  # perception/2
  ("Firstly notice the yellow light.", "never"),  # prediction/3
  ("Slow down because of the light.", 10),  # planning/1
  ("No collision is possible.", 20),  # planning/1
  ("Keep going at the same speed.", 30),  # planning/1
  ("Final: D. The ego vehicle goes straight.", 70),  # behavior/0, GT D
  ("The car turns left, option B.", 80),  # perception/0, GT B: official B, strict none
  ("No.", 0),  # prediction/0: skipped by the toolkit, never judged
  ("B. It is a moving car.", 60),  # perception/0, GT A: official reads "a" as A
  ("There is a blue bus ahead.", 20),  # perception/2
  ("Firstly notice the blue bus.", 30),  # prediction/3
  ("Keep going ahead.", ("flaky", 40)),  # planning/1
  ("Accelerating leads to a collision.", 50),  # planning/1
  ("Keep going at the same speed, decelerate gradually.", 60),  # planning/1
  ("C", 90),  # behavior/0, GT A
]
# Hand-computed: perception (40 + 80 + 60 + 20) / 4; reasoning (70 + 30 + 90) / 3 (one never
# scores); planning (10 + 20 + 30 + 40 + 50 + 60) / 6.
PERCEPTION, REASONING, PLANNING = 50.0, 190 / 3, 35.0


class FakeJudge:
  """Replies by the prediction found in the message ("[#k]" marks item k)."""

  name = "fake:fixed"
  concurrency = 3

  def __init__(self, plan=PLAN):
    self.plan = plan
    self.calls = 0
    self.messages: list[tuple[str, str]] = []
    self.asked: dict[int, int] = {}

  def chat(self, system, parts, *, temperature):
    assert temperature == 0.0 and len(parts) == 1
    self.calls += 1
    self.messages.append((system, parts[0]))
    index = int(re.search(r"\[#(\d+)\]", parts[0]).group(1))
    self.asked[index] = self.asked.get(index, 0) + 1
    behaviour = self.plan[index][1]
    if behaviour == "never":
      return "Answer Correctness: 20\nI cannot decide on a total."
    if isinstance(behaviour, tuple):
      if self.asked[index] == 1:
        raise JudgeError("HTTP 503 from the judge")
      behaviour = behaviour[1]
    return f"Answer Correctness: 10\nTotal Score: {behaviour}\nBrief Summary: fine."


def fixture_answers() -> list[dict]:
  items = answers_lib.release_items(DATA / "drivebench-test.json")
  assert len(items) == len(PLAN)
  return [
    answers_lib.answer_record(rid, item, f"{pred} [#{i}]")
    for i, ((rid, item), (pred, _)) in enumerate(zip(items, PLAN))
  ]


def descriptions():
  return drivebench.load_descriptions(DATA / "visual_description.json")


def test_fixture_covers_every_question_type():
  keys = {rubrics.route_key(i["question_type"], i["tag"]) for _, i in fixture_answers_items()}
  assert keys == {
    "perception/0",
    "perception/2",
    "prediction/3",
    "prediction/0",
    "planning/1",
    "behavior/0",
  }
  fog = json.loads((DATA / "fog.json").read_text())
  assert fog[-1]["question_type"] == "robustness"
  for folder in ("Fog", "Brightness"):
    for camera in rec.CAMERAS:
      assert len(list((DATA / "corruption" / folder / camera).glob("*.png"))) == 2


def fixture_answers_items():
  return answers_lib.release_items(DATA / "drivebench-test.json")


def test_parsers_official_quirk_and_strict():
  official, strict = drivebench.parse_choice_official, drivebench.parse_choice_strict
  assert official("B. It is a moving car.") == "A"  # the article reads as A
  assert strict("B. It is a moving car.") == "B"
  assert official("The car turns left, option B.") == "B"
  assert strict("The car turns left, option B.") == ""
  assert official("") == official("No letter here.") == ""
  assert strict("Final: {C. The ego vehicle ...}") == "C"
  assert strict("  (D) because") == "D" and strict("Option c.") == "C"
  assert strict("a car is ahead") == "" and strict("A") == "A"


def test_scores_with_a_fake_judge(tmp_path):
  judge = FakeJudge()
  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  scores = drivebench.score_answers(
    answers, judge=judge, descriptions=descriptions(), judged_path=tmp_path / "judged.jsonl"
  )
  assert scores["perception"] == pytest.approx(PERCEPTION)
  assert scores["reasoning"] == pytest.approx(REASONING)
  assert scores["planning"] == pytest.approx(PLANNING)
  assert scores["average"] == pytest.approx((PERCEPTION + REASONING + PLANNING) / 3)
  # MCQs: 2 perception + 2 behavior. Official: B ok, quirk A ok, D ok, C wrong. Strict: only D.
  assert scores["accuracy"] == {"official": 75.0, "strict": 25.0, "items": 4}
  judged = scores["judge"]
  assert (judged["scored"], judged["failed"]) == (13, 1)
  assert judged["failures"][0]["record_id"] == fixture_answers()[1]["record_id"]
  assert "parse_total_score" in judged["failures"][0]["error"]
  assert judged["without_description"] == 0 and judged["rubric"] == "ours"
  assert scores["skipped"] == {"prediction/0": 1} and sum(scores["routed"].values()) == 14
  # Three attempts on the never-parseable item, two on the flaky one, one on the others.
  assert judge.asked[1] == 3 and judge.asked[11] == 2 and 7 not in judge.asked
  assert judge.calls == 12 + 3 + 2
  # Toolkit breakdown.
  toolkit = scores["toolkit"]
  assert toolkit["perception"]["MCQ"]["gpt_score"] == 70.0
  assert toolkit["perception"]["MCQ"]["accuracy"] == 100.0
  assert toolkit["behavior"]["MCQ"]["accuracy"] == 50.0
  assert toolkit["prediction"]["VQA"]["gpt_score"] == 30.0
  assert toolkit["planning"]["VQA"]["language_metrics"]["items"] == 6
  assert scores["language"]["items"] == 10
  assert 0 < scores["language"]["Bleu_1"] < 100


def test_judge_messages_follow_the_toolkit(tmp_path):
  judge = FakeJudge()
  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  drivebench.score_answers(answers, judge=judge, descriptions=descriptions(), workers=1)
  systems = {system for system, _ in judge.messages}
  assert systems == {""}
  by_item = {int(re.search(r"\[#(\d+)\]", m).group(1)): m for _, m in judge.messages}
  assert all(m.startswith(rubrics.PREAMBLE) for m in by_item.values())
  # Planning on an object: its visual description, lower-cased; safe actions: the fixed text.
  planning_object = by_item[2]
  items = fixture_answers()
  infos = descriptions()[items[2]["scene_token"]]["key_frames"][items[2]["frame_token"]]
  first = next(v for k, v in infos["key_object_infos"].items() if k.startswith("<c1,CAM_FRONT,"))
  assert first["Visual_description"].lower() in planning_object
  assert rubrics.NO_DESCRIPTION_NEEDED in by_item[4]
  assert "Answer Correctness (50 points)" in by_item[6]  # PERCEPTION_MCQ
  assert "Action Prediction Accuracy (40 points)" in by_item[2]  # PLANNING_VQA
  assert "Behavioral Understanding and Detail (15 points)" in by_item[5]  # BEHAVIOR_MCQ
  assert items[6]["answer"] in by_item[6]


def test_judged_file_resumes_without_asking_again(tmp_path):
  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  path = tmp_path / "judged.jsonl"
  first = drivebench.score_answers(answers, judge=FakeJudge(), judged_path=path)
  judge = FakeJudge()
  second = drivebench.score_answers(answers, judge=judge, judged_path=path)
  assert judge.calls == 3  # only the failed item is asked again
  assert second == first
  assert len(answers_lib.read_jsonl(path, key_field="key")) == 13
  assert first["judge"]["without_description"] == 6  # no descriptions were given
  # Another prediction (or rubric) is another message: judged afresh, never a stale score.
  records = fixture_answers()
  records[0]["pred"] = records[0]["pred"].replace("yellow", "green")
  changed = drivebench.validate_answers(records, "fixture")
  judge = FakeJudge()
  drivebench.score_answers(changed, judge=judge, judged_path=path)
  assert judge.calls == 3 + 1 and judge.asked[0] == 1
  judge = FakeJudge()
  drivebench.score_answers(answers, judge=judge, judged_path=path, rubric_name="official")
  assert judge.calls == 12 + 3 + 2


def test_official_templates_from_a_toolkit_checkout(tmp_path):
  body = {
    name: f"OFFICIAL {name}: Q={{QUESTION}} GT={{GT}} P={{PRED}} D={{DESC}}"
    for name in rubrics.TEMPLATE_NAMES
  }
  source = "\n".join(f"{name}_PROMPT = {text!r}" for name, text in body.items())
  (tmp_path / "evaluate").mkdir()
  (tmp_path / "evaluate" / "prompts.py").write_text(source + "\nOTHER = 3\n")
  templates = rubrics.official_templates(tmp_path)
  assert templates == body
  assert drivebench.rubric_templates(tmp_path) == (body, f"official:{tmp_path.name}")
  judge = FakeJudge()
  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  drivebench.score_answers(answers, judge=judge, templates=templates, descriptions=descriptions())
  assert all("OFFICIAL" in m for _, m in judge.messages)
  assert any(m.startswith(rubrics.PREAMBLE + "OFFICIAL BEHAVIOR_MCQ") for _, m in judge.messages)
  (tmp_path / "evaluate" / "prompts.py").write_text(source.replace("PLANNING_VQA_PROMPT", "X"))
  with pytest.raises(ValueError, match="PLANNING_VQA, found none"):
    rubrics.official_templates(tmp_path)
  (tmp_path / "evaluate" / "prompts.py").write_text(source.replace("{GT}", "gt"))
  with pytest.raises(ValueError, match="lacks the placeholder"):
    rubrics.official_templates(tmp_path)


def test_our_templates_state_the_official_points():
  for name, template in rubrics.OUR_TEMPLATES.items():
    points = [int(p) for p in re.findall(r"\((\d+) points\)", template)]
    assert sum(points) == 100, name
    assert template.rstrip().splitlines()[-2].startswith("Total Score:")
  assert rubrics.parse_total_score("x\nTotal Score: 87\nBrief") == 87
  assert rubrics.parse_total_score("Total Score: 187") is None
  assert rubrics.parse_total_score("Total: 80") is None


def test_bad_answer_record_names_file_record_and_field():
  records = fixture_answers()
  del records[3]["pred"]
  with pytest.raises(rec.RecordError, match=r"file answers.jsonl, record 3.*field 'pred'"):
    drivebench.validate_answers(records, "answers.jsonl")


def test_scores_json_and_summary(tmp_path):
  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  scores = drivebench.score_answers(answers, judge=FakeJudge(), descriptions=descriptions())
  for setting in ("clean", "fog", "bright"):
    drivebench.write_scores(tmp_path, setting, scores)
  written = json.loads((tmp_path / "drivebench" / "fog" / "scores.json").read_text())
  for key in ("perception", "reasoning", "planning", "average", "accuracy", "language", "judge"):
    assert key in written
  assert written["setting"] == "fog" and written["judge"]["failed"] == 1
  assert set(written["accuracy"]) >= {"official", "strict"}
  path = drivebench.write_summary(tmp_path, ["clean", "fog", "bright"])
  summary = json.loads(path.read_text())
  assert summary["settings"]["clean"]["planning"] == 35.0
  assert summary["corruption_mean"]["settings"] == 2
  assert summary["corruption_mean"]["accuracy_strict"] == 25.0


def test_score_setting_reads_answers_and_writes_scores(tmp_path):
  with answers_lib.JsonlRecords(answers_lib.answers_path(tmp_path, "bright")) as out:
    for record in fixture_answers():
      out.append(record)
  templates, name = drivebench.rubric_templates(None)
  assert name == "ours" and templates == rubrics.OUR_TEMPLATES
  scores, path = drivebench.score_setting(
    tmp_path,
    "bright",
    judge=FakeJudge(),
    templates=templates,
    rubric_name=name,
    descriptions=descriptions(),
  )
  assert path == drivebench.scores_path(tmp_path, "bright")
  assert json.loads(path.read_text())["planning"] == PLANNING == scores["planning"]
  assert (
    len(answers_lib.read_jsonl(drivebench.judged_path(tmp_path, "bright"), key_field="key")) == 13
  )


def test_no_judge_leaves_judged_scores_null():
  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  scores = drivebench.score_answers(answers)
  assert scores["perception"] is None and scores["average"] is None
  assert scores["judge"]["scored"] == 0 and scores["accuracy"]["official"] == 75.0


def test_language_metrics_through_pycocoevalcap():
  perfect = language.caption_metrics(
    ["The car stops.", "Turn left now."], ["the car stops", "turn left now"]
  )
  assert perfect["Bleu_1"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
  partial = language.caption_metrics(["the car", ""], ["the car stops", "go"])
  assert 0 < partial["Bleu_1"] < 1 and partial["ROUGE_L"] < 1
  assert (
    language.simple_tokenize("The ego vehicle isn't moving.") == "the ego vehicle is n't moving"
  )
  with pytest.raises(ValueError, match="2 predictions but 1 references"):
    language.caption_metrics(["a", "b"], ["a"])


@pytest.mark.skipif(shutil.which("java") is None, reason="PTBTokenizer needs java")
def test_simple_tokenizer_matches_ptb_on_the_fixture():
  texts = [i["answer"] for _, i in fixture_answers_items()] + [p for p, _ in PLAN]
  simple = language.caption_metrics(texts[::-1], texts)
  ptb = language.caption_metrics(texts[::-1], texts, tokenizer="ptb")
  for key, value in ptb.items():
    assert simple[key] == pytest.approx(value, rel=1e-6), key


# ---------------------------------------------------------------------------------------------
# Answers files


def test_answers_are_flushed_as_they_come(tmp_path):
  records = fixture_answers()
  path = answers_lib.answers_path(tmp_path, "clean")
  with answers_lib.JsonlRecords(path) as out:
    for i, record in enumerate(records[:3]):
      out.append(record)
      assert len(path.read_text().splitlines()) == i + 1  # readable before close
    with pytest.raises(ValueError, match="already written"):
      out.append(records[0])
  assert [r["record_id"] for r in answers_lib.read_jsonl(path)] == [
    r["record_id"] for r in records[:3]
  ]


_WRITER = textwrap.dedent(
  """
  import json, os, signal, sys
  from drivekd_jax.eval import answers
  records = json.loads(open(sys.argv[2]).read())
  out = answers.JsonlRecords(sys.argv[1])
  for record in records[:5]:
    if record["record_id"] not in out:
      out.append(record)
  out._file.write(json.dumps(records[5])[:40])  # killed in the middle of the sixth line
  out._file.flush()
  os.kill(os.getpid(), signal.SIGKILL)
  """
)


def test_killed_write_resumes_without_loss_or_duplicates(tmp_path):
  records = fixture_answers()
  source = tmp_path / "records.json"
  source.write_text(json.dumps(records))
  path = answers_lib.answers_path(tmp_path, "fog")
  result = subprocess.run([sys.executable, "-c", _WRITER, str(path), str(source)], check=False)
  assert result.returncode == -signal.SIGKILL
  assert not path.read_text().endswith("\n")  # the torn line is there
  items = [(r["record_id"], r) for r in records]
  with answers_lib.JsonlRecords(path) as out:
    assert out.dropped_bytes == 40 and len(out) == 5
    todo = answers_lib.pending(items, out)
    assert [rid for rid, _ in todo] == [r["record_id"] for r in records[5:]]
    for _, record in todo:
      out.append(record)
  written = answers_lib.read_jsonl(path)
  assert [r["record_id"] for r in written] == [r["record_id"] for r in records]
  assert written == records


def test_corrupt_complete_line_is_an_error(tmp_path):
  path = tmp_path / "answers.jsonl"
  path.write_text('{"record_id": "a"}\nnot json\n')
  with pytest.raises(rec.RecordError, match="answers.jsonl, record 2: malformed JSON"):
    answers_lib.JsonlRecords(path)
  path.write_text('{"record_id": "a"}\n{"record_id": "a"}\n')
  with pytest.raises(rec.RecordError, match="duplicate record_id"):
    answers_lib.JsonlRecords(path)


# ---------------------------------------------------------------------------------------------
# DriveLM-nuScenes


def _qa(question, answer, tag):
  return {"Q": question, "A": answer, "tag": [tag]}


DRIVELM_TEST = {
  "s1": {
    "key_frames": {
      "f1": {
        "QA": {
          "perception": [
            _qa(
              "What are the important objects in the current scene?",
              "A car <c1,CAM_FRONT,100.0,200.0> and a truck <c2,CAM_BACK,500.0,300.0>.",
              2,
            ),
            _qa("What is the moving status of object <c1,CAM_FRONT,100.0,200.0>? A. B.", "A", 0),
          ],
          "prediction": [
            _qa("Is <c2,CAM_BACK,500.0,300.0> a traffic sign?", "No.", 0),
            _qa(
              "What object should the ego vehicle notice first?",
              "Firstly <c1,CAM_FRONT,100.0,200.0>. Secondly <c2,CAM_BACK,500.0,300.0>.",
              3,
            ),
          ],
          "planning": [
            _qa("What actions could the ego take based on <c1,CAM_FRONT,100.0,200.0>?", "Stop.", 1),
            _qa("What actions lead to a collision with <c2,CAM_BACK,500.0,300.0>?", "Go.", 1),
          ],
          "behavior": [_qa("Predict the behavior of the ego vehicle. A. B.", "B", 0)],
        }
      },
      "f2": {
        "QA": {
          "perception": [
            _qa(
              "What are the important objects in the current scene?",
              "A pedestrian <c1,CAM_FRONT_LEFT,300.0,400.0>.",
              2,
            ),
            _qa("What is the moving status of object <c1,CAM_FRONT_LEFT,300.0,400.0>?", "A", 0),
          ],
          "planning": [_qa("In this scenario, what are safe actions to take?", "Brake.", 1)],
          "behavior": [_qa("Predict the behavior of the ego vehicle.", "C", 0)],
        }
      },
    }
  }
}
DRIVELM_PREDICTIONS = {
  "s1_f1_0": "A car <c1,CAM_FRONT,105.0,203.0> and a bus <c3,CAM_FRONT,900.0,100.0>.",  # F1 0.5
  "s1_f1_1": "A",  # in the graph, correct
  "s1_f1_2": "No.",  # (500, 300) is not in the graph: skipped
  "s1_f1_3": "Firstly <c1,CAM_FRONT,110.0,204.0>. Secondly <c2,CAM_BACK,510.0,301.0>. 3.0",
  "s1_f1_4": "Stop now.",  # judged 60
  "s1_f1_5": "Go fast.",  # skipped
  "s1_f1_6": "B. The ego vehicle goes straight.",  # not exactly "B": wrong
  "s1_f2_0": "I see nothing.",  # no points: the graph is empty
  "s1_f2_1": "A",  # skipped
  "s1_f2_2": "Brake hard.",  # judged: "about forty" once, then 40
  "s1_f2_3": "C",  # correct
}
DRIVELM_JUDGE = {"Stop now.": 60, "Brake hard.": 40, DRIVELM_PREDICTIONS["s1_f1_3"]: 80}


class FakeDriveLMJudge:
  name = "fake:drivelm"

  def __init__(self):
    self.asked: dict[str, int] = {}

  def chat(self, system, parts, *, temperature):
    assert system == drivelm.JUDGE_SYSTEM and temperature == 0.6
    pred = parts[0].split("This is my answer: ")[1]
    self.asked[pred] = self.asked.get(pred, 0) + 1
    if pred == "Brake hard." and self.asked[pred] == 1:
      return "about forty"
    return str(DRIVELM_JUDGE[pred])


def test_drivelm_point_match():
  f1, matched = drivelm.match_points(
    DRIVELM_PREDICTIONS["s1_f1_0"], "<c1,X,100.0,200.0> <c2,X,500.0,300.0>"
  )
  assert f1 == pytest.approx(0.5) and matched == [(100.0, 200.0)]
  # A dangling number is dropped; each ground-truth point is used once; 16 px is not a match.
  assert drivelm.points("1.0 2.0 3.0") == [(1.0, 2.0)]
  f1, matched = drivelm.match_points("1.0,1.0 2.0,2.0", "0.0,0.0")
  assert matched == [(0.0, 0.0)] and f1 == pytest.approx(2 * 0.5 * 1 / 1.5)
  assert drivelm.match_points("16.0,0.0", "0.0,0.0")[0] == pytest.approx(0.0)
  assert drivelm.match_points("15.9,0.0", "0.0,0.0")[0] == pytest.approx(1.0)
  assert drivelm.match_points("no numbers", "0.0,0.0") == (0.0, [])


def test_drivelm_metrics_with_graph_gating():
  judge = FakeDriveLMJudge()
  predictions = [{"id": k, "question": "", "answer": v} for k, v in DRIVELM_PREDICTIONS.items()]
  out = drivelm.evaluate(DRIVELM_TEST, {"method": "x", "results": predictions}, judge=judge)
  assert out["counts"] == {"qas": 11, "scored": 8, "skipped_by_graph": 3, "frames": 2}
  assert out["accuracy"] == pytest.approx(2 / 3)  # f1#1 right, f1#6 wrong, f2#3 right
  assert out["chatgpt"] == pytest.approx(50.0)  # (60 + 40) / 2
  assert out["match_f1"] == pytest.approx(100.0)
  assert out["match"] == pytest.approx(90.0)  # (100 + 80) / 2
  assert judge.asked == {"Stop now.": 1, "Brake hard.": 2, DRIVELM_PREDICTIONS["s1_f1_3"]: 1}
  assert out["judge"]["scored"] == 3 and out["judge"]["failed"] == 0
  want_language = language.caption_metrics(
    [DRIVELM_PREDICTIONS["s1_f1_0"], DRIVELM_PREDICTIONS["s1_f2_0"]],
    [
      DRIVELM_TEST["s1"]["key_frames"]["f1"]["QA"]["perception"][0]["A"],
      DRIVELM_TEST["s1"]["key_frames"]["f2"]["QA"]["perception"][0]["A"],
    ],
  )
  assert out["language"] == want_language
  lang = sum(want_language[f"Bleu_{n}"] for n in range(1, 5)) / 12
  lang += want_language["ROUGE_L"] / 3 + want_language["CIDEr"] / 30
  want_final = 0.4 * 0.5 + 0.2 * lang + 0.2 * 0.9 + 0.2 * (2 / 3)
  assert out["final_score"] == pytest.approx(want_final)


def test_drivelm_judge_failures_and_missing_predictions():
  class Mute:
    name = "mute"

    def chat(self, system, parts, *, temperature):
      raise JudgeError("HTTP 500")

  out = drivelm.evaluate(
    DRIVELM_TEST, [{"id": k, "answer": v} for k, v in DRIVELM_PREDICTIONS.items()], judge=Mute()
  )
  assert out["judge"]["failed"] == 3 and out["chatgpt"] is None and out["final_score"] is None
  incomplete = {k: v for k, v in DRIVELM_PREDICTIONS.items() if k != "s1_f2_3"}
  with pytest.raises(rec.RecordError, match="1 test QAs have no prediction.*s1_f2_3"):
    drivelm.evaluate(DRIVELM_TEST, [{"id": k, "answer": v} for k, v in incomplete.items()])


# ---------------------------------------------------------------------------------------------
# Efficiency and report


def tiny_internvl():
  from flax import nnx

  from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
  from drivekd_jax.models.internvl import InternVL

  config = InternVLConfig(
    vision=VisionConfig(
      image_size=28, patch_size=14, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32
    ),
    text=DecoderConfig(
      vocab_size=64,
      hidden_size=16,
      num_layers=1,
      num_heads=2,
      num_kv_heads=1,
      intermediate_size=32,
    ),
    image_token_id=60,
  )
  return InternVL(config, rngs=nnx.Rngs(0))


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compiles")
def test_measure_generation_formula_and_memory():
  import jax
  import numpy as np
  from flax import nnx

  from drivekd_jax.eval import efficiency

  model = tiny_internvl()
  ids = np.asarray([[1, 60, 2, 3, 4], [5, 60, 6, 7, 8]], np.int32)  # one 1-token image per row
  pixels = np.zeros((2, 28, 28, 3), np.float32)
  # A fake clock: each timed first-token call lasts 0.5 s, each decode call 2 s.
  ticks = iter([0, 0.5, 1, 1.5, 10, 12, 20, 22])
  out = efficiency.measure_generation(
    model, ids, pixels, new_tokens=4, repeats=2, clock=lambda: next(ticks)
  )
  assert out.first_token_latency_s == 0.5
  assert out.tokens_per_s == pytest.approx(2 * 4 / 2)
  assert (out.batch_size, out.prompt_tokens, out.new_tokens) == (2, 5, 4)
  assert out.memory_source == "live_arrays"  # CPU reports no peak
  params = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert out.memory_gb * efficiency.GIB >= params
  real = efficiency.measure_generation(model, ids, pixels, new_tokens=4, repeats=1)
  assert real.first_token_latency_s > 0 and real.tokens_per_s > 0
  with pytest.raises(ValueError, match="new_tokens must be >= 1"):
    efficiency.measure_generation(model, ids, pixels, new_tokens=0)


def test_report_table1_and_plot(tmp_path):
  from PIL import Image

  from drivekd_jax.eval import efficiency, report

  answers = drivebench.validate_answers(fixture_answers(), "fixture")
  scores = drivebench.score_answers(answers, judge=FakeJudge(), descriptions=descriptions())
  fog = dict(scores, perception=20.0, average=None)
  eff = efficiency.Efficiency(0.5, "live_arrays", 12.5, 0.25, 1, 100, 32, 3, "1 x cpu:cpu")
  models = [
    report.ModelResult("student", {"fog": fog, "clean": scores}, eff),
    report.ModelResult("teacher", {"bright": scores}),
  ]
  path = report.write_report(tmp_path, models, judge_name="fake:fixed")
  text = path.read_text()
  rows = [line for line in text.splitlines() if line.startswith("| student | clean |")]
  assert rows == [
    "| student | clean | 50.00 | 63.33 | 35.00 | 49.44 | 0.5* | 12.5 | 0.250 |",
    "| student | clean | 50.00 | 63.33 | 35.00 | 49.44 | 75.00 | 25.00 | 13 | 1 |",
  ]
  assert "| teacher | bright | 50.00 | 63.33 | 35.00 | 49.44 | - | - | - |" in text
  assert "| student | fog | 20.00 | 63.33 | 35.00 | - |" in text
  assert report.ordered_settings(["fog", "x", "clean", "bright"]) == ["clean", "bright", "fog", "x"]
  with Image.open(tmp_path / "settings.png") as image:
    assert image.size == (1200, 700)


# ---------------------------------------------------------------------------------------------
# Through the real client and a loopback OpenAI-compatible server


class FakeOpenAIServer:
  """`POST /v1/chat/completions` on 127.0.0.1, replying as `FakeJudge` does (a 503 for the
  flaky item's first request), so the HTTP path gives the in-process scores."""

  def __init__(self):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    self.judge = FakeJudge()
    self.requests = 0
    outer = self

    class Handler(BaseHTTPRequestHandler):
      def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        outer.requests += 1
        system = body["messages"][0]["content"]
        user = body["messages"][1]["content"][0]["text"]
        try:
          reply = outer.judge.chat(system, [user], temperature=body["temperature"])
          status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": reply}}]}
        except JudgeError:
          status, payload = 503, {"error": "busy"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    import threading

    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


def test_scores_through_the_judge_client_and_a_loopback_server(tmp_path):
  from drivekd_jax.eval.judge_client import OpenAIChatJudge

  server = FakeOpenAIServer()
  try:
    answers = drivebench.validate_answers(fixture_answers(), "fixture")

    def client(**kwargs):
      return OpenAIChatJudge(
        server.url, "fake", max_retries=1, sleep=lambda s: None, cache_dir=tmp_path, **kwargs
      )

    scores = drivebench.score_answers(answers, judge=client(), descriptions=descriptions())
    assert (scores["perception"], scores["planning"]) == (PERCEPTION, PLANNING)
    assert scores["reasoning"] == pytest.approx(REASONING)
    assert (scores["judge"]["scored"], scores["judge"]["failed"]) == (13, 1)
    assert scores["judge"]["name"] == "openai:fake"
    asked = server.requests
    # Replayed from the client's cache: the same scores without a single request.
    replayed = drivebench.score_answers(
      answers, judge=client(replay_only=True), descriptions=descriptions()
    )
    assert replayed == scores and server.requests == asked
  finally:
    server.close()


def test_overlap_judge_behind_the_loopback_server(tmp_path):
  from drivekd_jax.eval import local_judge
  from drivekd_jax.eval.judge_client import OpenAIChatJudge

  assert local_judge.overlap_score("the car stops", "The car goes.") == 67
  assert local_judge.overlap_score("B", "B. Turn left.") == 100
  assert local_judge.overlap_score("B", "a car, so A") == 0
  records = [dict(r, pred=r["answer"]) for r in fixture_answers()]  # perfect predictions
  records[0]["pred"] = ""  # one empty VQA answer: 0
  answers = drivebench.validate_answers(records, "fixture")
  with local_judge.LoopbackJudgeServer(local_judge.OverlapJudge()) as server:
    client = OpenAIChatJudge(server.url, "overlap", max_retries=0, cache_dir=tmp_path)
    scores = drivebench.score_answers(answers, judge=client, descriptions=descriptions())
    assert server.requests == 14
    with pytest.raises(JudgeError, match="422"):
      client.chat("", ["not a rubric message"], temperature=0.0)
  assert scores["planning"] == 100.0 and scores["reasoning"] == 100.0
  assert scores["perception"] == 75.0  # (0 + 100 + 100 + 100) / 4
  assert scores["accuracy"] == {"official": 100.0, "strict": 100.0, "items": 4}
  test = json.loads(json.dumps(DRIVELM_TEST))
  perfect = [{"id": qa.id, "answer": qa.answer} for qa in drivelm.challenge_qas(test)]
  out = drivelm.evaluate(test, perfect, judge=local_judge.OverlapJudge())
  assert out["chatgpt"] == 100.0 and out["match"] == pytest.approx(100.0)
  assert out["accuracy"] == 1.0 and out["counts"]["skipped_by_graph"] == 0


def test_live_memory_counts_every_shard_and_replica():
  import jax
  import numpy as np

  from drivekd_jax.eval import efficiency

  devices = jax.devices()[-2:]
  before, source = efficiency.device_memory_bytes(devices)
  mesh = jax.sharding.Mesh(np.asarray(devices), ("x",))
  replicated = jax.device_put(np.zeros(1000, np.float32), jax.sharding.NamedSharding(mesh, jax.P()))
  split = jax.device_put(np.zeros(1000, np.float32), jax.sharding.NamedSharding(mesh, jax.P("x")))
  after, _ = efficiency.device_memory_bytes(devices)
  assert source == "live_arrays"
  assert after - before == 2 * 4000 + 4000
  del replicated, split
