"""Dynamic resolution, image-point judging, the pipeline order, resume, and failure handling."""

import json
import re
import shutil

import numpy as np
import pytest

from imug_jax.data import schema, synthetic
from imug_jax.judges.base import ImagePart, JudgeError, JudgeReplyError
from imug_jax.judges.prompts import DYNAMIC_ROLE, PromptSet
from imug_jax.judges.random_judge import RandomJudge
from imug_jax.models import image_tokenizer as itok
from imug_jax.scoring import dynamic, image_points, layout, mcq, pipeline


class ScriptedJudge:
  """Replies from a list (then repeats the last); records every request."""

  def __init__(self, *replies, name="scripted"):
    self.replies = list(replies)
    self.name = name
    self.requests = []

  def chat(self, system, parts, *, temperature=0.1):
    self.requests.append((system, list(parts), temperature))
    reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
    if isinstance(reply, Exception):
      raise reply
    return reply


class PointsJudge:
  """Gives every evaluation point `score` and answers dynamic questions with `letters`."""

  def __init__(self, score=4, letters="B"):
    self.score, self.letters, self.name, self.calls = score, letters, f"points:{score}", 0

  def chat(self, system, parts, *, temperature=0.1):
    self.calls += 1
    if DYNAMIC_ROLE in system:
      return json.dumps({"determined_answer": self.letters})
    text = "\n".join(p for p in parts if isinstance(p, str))
    count = len(re.findall(r"(?m)^\d+\.\s", text.split("[Evaluation Points List]:")[1]))
    results = [{"point_id": i + 1, "score": self.score} for i in range(count)]
    return "Here you go:\n" + json.dumps({"evaluation_results": results})


def png(colour):
  return itok.png_bytes(np.full((16, 16, 3), colour, np.uint8))


def hand_sample(domain="Physics", subdomain="magnetism_compare"):
  return schema.parse_sample(
    {
      "domain": domain,
      "subdomain": subdomain,
      "sample_id": "7",
      "tasks": [
        {
          "turn": 1,
          "modality": "image",
          "input": [{"text": "Draw two magnets."}, {"image": "in.jpg"}],
          "output": {"evaluation_points": ["two magnets", "north poles red"]},
        },
        {
          "turn": 2,
          "modality": "text",
          "input": [{"text": "Which pole? A) N B) S C) both"}],
          "output": {"answer": "C"},
        },
        {
          "turn": 3,
          "modality": "image",
          "input": [{"text": "Flip the left magnet."}],
          "output": {"evaluation_points": ["left magnet flipped"]},
        },
        {
          "turn": 4,
          "modality": "text",
          "input": [{"text": "How many magnets? A) 1 B) 2 C) 3"}],
          "output": {"answer": "A+<DYNAMIC>"},
        },
      ],
    }
  )


def write_rollout(model_dir, sample, responses, images):
  folder = layout.question_dir(model_dir, sample.key)
  folder.mkdir(parents=True, exist_ok=True)
  for turn, data in images.items():
    (folder / f"turn_{turn}_output.png").write_bytes(data)
  record = sample.with_responses(responses).to_json()
  (folder / "result.json").write_text(json.dumps(record))


def test_dynamic_request_follows_the_official_context(tmp_path):
  sample = hand_sample()
  write_rollout(tmp_path, sample, {1: "turn_1_output.png", 2: "B"}, {1: png(9)})
  parts = dynamic.build_request(sample, sample.task(4), [2, 1], model_dir=tmp_path)
  assert parts[0] == (
    "### REFERENCE CONTEXT PROVIDED ###\n"
    "Turn 1: Q: Draw two magnets. | AI Resp: [IMAGE_RESPONSE: See Image_1]\n"
    "Turn 2: Q: Which pole? A) N B) S C) both | AI Resp: C\n"  # gold, not the model's "B"
    "\n### TARGET QUESTION (Turn 4) ###\n"
    "Question: How many magnets? A) 1 B) 2 C) 3\n"
    "Type: SINGLE-CHOICE\n"
    "Identify the correct options based on the images provided."
  )
  assert parts[1:] == [ImagePart(png(9), "image/png")]
  assert dynamic.choice_type("Botany", "natural_growth") == "MULTIPLE-CHOICE"
  assert dynamic.choice_type("Botany", "tropisms") == "SINGLE-CHOICE"


def test_dynamic_answers_join_fixed_and_judged_letters(tmp_path):
  assert dynamic.combine("A+<DYNAMIC>", "c, b") == "ABC"
  assert dynamic.combine("<DYNAMIC>", "D") == "D"
  assert dynamic.combine("<DYNAMIC>", "") == ""
  sample = hand_sample()
  write_rollout(tmp_path, sample, {}, {1: png(1), 3: png(2)})
  judge = ScriptedJudge("no json", 'Answer: {"determined_answer": "b", "reasoning": "two"}')
  record = dynamic.resolve_turn(judge, "sys", sample, sample.task(4), [3], model_dir=tmp_path)
  assert record["status"] == "ok" and record["answer"] == "AB" and record["attempts"] == 2
  assert judge.requests[0][2] == 0.1
  # The resolved "AB" is a run of capitals: the official parser finds no letter in it.
  assert mcq.score(record["answer"], "AB") == 0.0
  assert mcq.score(record["answer"], "AB", parser="corrected") == 1.0
  failing = ScriptedJudge("still not json")
  record = dynamic.resolve_turn(failing, "sys", sample, sample.task(4), [3], model_dir=tmp_path)
  assert record["status"] == "failed" and "answer" not in record and len(failing.requests) == 3
  with pytest.raises(ValueError, match="not dynamic"):
    dynamic.resolve_turn(failing, "sys", sample, sample.task(2), [1], model_dir=tmp_path)


def test_image_request_order_labels_and_text(tmp_path):
  sample = hand_sample()
  images_dir = tmp_path / "images"
  images_dir.mkdir()
  (images_dir / "in.jpg").write_bytes(b"jpeg-bytes")
  model_dir = tmp_path / "model"
  write_rollout(model_dir, sample, {3: "turn_3_output.png"}, {3: png(3)})
  refs = [schema.ImageRef(1, "input"), schema.ImageRef(1, "output"), schema.ImageRef(2, "input")]
  result = layout.load_result(model_dir, sample.key)
  parts, target = image_points.build_request(
    sample, sample.task(3), refs, model_dir=model_dir, images_dir=images_dir, result=result
  )
  # Turn 1's output is missing: skipped, but the numbering keeps its slot (official behaviour).
  assert parts[:2] == [ImagePart(b"jpeg-bytes", "image/jpeg"), ImagePart(png(3), "image/png")]
  assert target.name == "turn_3_output.png"
  assert parts[2] == (
    "Sequence description:\n- Image_1 (Turn 1 input image)\n- Image_2 (Target Image)\n"
    "\n[Task Instruction Recap]:\nFlip the left magnet.\n\n"
    "[Evaluation Points List]:\n1. left magnet flipped\n\nPlease output JSON results."
  )


def test_point_replies_are_parsed_strictly():
  reply = (
    'Sure.\n{"evaluation_results": [{"point_id": 1, "score": "4", "reason": "ok"},'
    ' {"point_id": 2, "score": 2.0}]}\nThanks'
  )
  points = image_points.parse_point_scores(reply)
  assert [(p.point_id, p.score) for p in points] == [(1, 4), (2, 2)]
  for bad in (
    '{"evaluation_results": []}',
    '{"evaluation_results": [{"point_id": 1, "score": 6}]}',
    '{"evaluation_results": [{"point_id": 1, "score": "good"}]}',
    '{"results": [{"point_id": 1, "score": 3}]}',
    "score: 4",
  ):
    with pytest.raises(JudgeReplyError):
      image_points.parse_point_scores(bad)


def test_unparseable_replies_are_retried_then_recorded_as_failures(tmp_path):
  sample = hand_sample()
  write_rollout(tmp_path, sample, {}, {3: png(3)})
  good = '{"evaluation_results": [{"point_id": 1, "score": 3}]}'
  kwargs = dict(model_dir=tmp_path, images_dir=tmp_path, result=None, retries=2)
  record = image_points.score_turn(
    ScriptedJudge("??", good), "s", sample, sample.task(3), [], **kwargs
  )
  assert record["status"] == "ok" and record["points"][0]["score"] == 3 and record["attempts"] == 2
  record = image_points.score_turn(ScriptedJudge("??"), "s", sample, sample.task(3), [], **kwargs)
  assert record["status"] == "failed" and record["points"] == [] and record["attempts"] == 3
  broken = ScriptedJudge(JudgeError("HTTP 500"))
  record = image_points.score_turn(broken, "s", sample, sample.task(3), [], **kwargs)
  assert record["status"] == "failed" and "HTTP 500" in record["error"]
  # No image for turn 1: zeros without a judge call (ours), or the official judge call.
  silent = ScriptedJudge(good)
  record = image_points.score_turn(silent, "s", sample, sample.task(1), [], **kwargs)
  assert [p["score"] for p in record["points"]] == [0, 0] and silent.requests == []
  record = image_points.score_turn(
    silent,
    "s",
    sample,
    sample.task(1),
    [],
    missing_output="judge",
    model_dir=tmp_path,
    images_dir=tmp_path,
    result=None,
  )
  assert record["status"] == "ok" and len(silent.requests) == 1


@pytest.fixture(scope="module")
def synthetic_release(tmp_path_factory):
  return synthetic.write_synthetic(tmp_path_factory.mktemp("syn"), 8, seed=0)


def perfect_rollout(bench, model_dir):
  """A model that draws every ground-truth target and answers every static MCQ correctly."""
  root = bench.data_dir
  truth = synthetic.ground_truth_images(root)
  for sample in bench.samples:
    images, responses = {}, {}
    for task in sample.tasks:
      if task.modality == "image":
        images[task.turn] = truth[(sample.key, task.turn)].read_bytes()
        responses[task.turn] = f"turn_{task.turn}_output.png"
      else:
        responses[task.turn] = "A" if task.is_dynamic else task.answer
    write_rollout(model_dir, sample, responses, images)


def test_pipeline_order_rows_resume_and_grid_override(synthetic_release, tmp_path):
  bench = synthetic_release
  model_dir = tmp_path / "outputs" / "perfect"
  perfect_rollout(bench, model_dir)
  judge = PointsJudge(score=4, letters="A")
  options = pipeline.ScoringOptions(grid_subdomains=("grid_coloring",))
  result = pipeline.score_model(model_dir, bench, judge, options=options)
  samples = bench.samples
  image_turns = [(s, t) for s in samples for t in s.tasks if t.modality == "image"]
  text_turns = [(s, t) for s in samples for t in s.tasks if t.modality == "text"]
  dynamic_turns = [(s, t) for s, t in text_turns if t.is_dynamic]
  grid_turns = [(s, t) for s, t in image_turns if t.turn in bench.grid_gt.get(s.key, {})]
  assert grid_turns and dynamic_turns
  assert result.failures == []
  assert len(result.rows) == len(image_turns) + len(text_turns)
  assert result.counts["grid_overrides"] == len(grid_turns)
  assert judge.calls == len(image_turns) - len(grid_turns) + len(dynamic_turns)
  by_key = {(r["domain"], r["sample_id"], r["turn"]): r for r in result.records}
  for s, t in grid_turns:  # the synthetic ground truth is a perfect grid
    assert by_key[(s.domain, s.sample_id, t.turn)]["score"] == 100.0
  for s, t in image_turns:
    if (s, t) not in grid_turns:
      assert by_key[(s.domain, s.sample_id, t.turn)]["score"] == pytest.approx(80.0)
  for s, t in text_turns:
    record = by_key[(s.domain, s.sample_id, t.turn)]
    assert record["score"] == 100.0  # every static answer is right; the judge's "A" is too
    if t.answer == "A+<DYNAMIC>":
      assert record["answer"] == "A"  # the judge said "A" too
  # Every record is on disk next to result.json; a rerun reuses every judge result.
  first = next(iter(image_turns))
  assert layout.score_path(model_dir, first[0].key, first[1].turn).exists()
  again = pipeline.score_model(model_dir, bench, judge, options=options)
  assert judge.calls == len(image_turns) - len(grid_turns) + len(dynamic_turns)
  assert again.counts["judge_calls"] == 0
  assert [r.score for r in again.rows] == [r.score for r in result.rows]
  # A different judge (or prompt set) is not reused.
  other = PointsJudge(score=2, letters="A")
  pipeline.score_model(model_dir, bench, other, prompts=PromptSet.ours(), options=options)
  assert other.calls == judge.calls


def test_pipeline_records_failures_and_retries_them_on_rerun(synthetic_release, tmp_path):
  bench = synthetic_release
  model_dir = tmp_path / "m"
  perfect_rollout(bench, model_dir)
  missing = bench.samples[-1]
  shutil.rmtree(layout.question_dir(model_dir, missing.key))
  broken = ScriptedJudge("not json at all", name="broken")
  result = pipeline.score_model(
    model_dir, bench, broken, options=pipeline.ScoringOptions(judge_retries=0)
  )
  assert result.counts["missing_samples"] == 1
  non_grid_images = [t for s in bench.samples[:-1] for t in s.tasks if t.modality == "image"]
  dynamic_turns = [t for s in bench.samples[:-1] for t in s.tasks if t.is_dynamic]
  assert len(result.failures) == len(non_grid_images) + len(dynamic_turns)
  # Only the static text turns (answered right) are scored; the dynamic ones wait on the judge.
  static_text = [t for s in bench.samples[:-1] for t in s.tasks if t.modality == "text"]
  static_text = [t for t in static_text if not t.is_dynamic]
  assert [(r.modality, r.score) for r in result.rows] == [("text", 100.0)] * len(static_text)
  assert result.counts["missing_dynamic"] == len(dynamic_turns)
  for failure in result.failures:
    assert failure["status"] == "failed" and "score" not in failure
  random_judge = RandomJudge()
  rerun = pipeline.score_model(model_dir, bench, random_judge)
  assert rerun.failures == [] and random_judge.calls == len(result.failures)


def test_a_broken_result_file_is_reported_and_the_rest_scored(synthetic_release, tmp_path):
  bench = synthetic_release
  model_dir = tmp_path / "m"
  perfect_rollout(bench, model_dir)
  broken = layout.question_dir(model_dir, bench.samples[0].key) / "result.json"
  broken.write_text("{not json")
  result = pipeline.score_model(model_dir, bench, RandomJudge())
  assert (
    result.counts["invalid_results"] == 1 and result.counts["samples"] == len(bench.samples) - 1
  )
  assert result.failures[0]["method"] == "result" and str(broken) in result.failures[0]["error"]
  assert len(result.failures) == 1 and result.rows
