"""The local judge: structured rubric questions to an in-process unified model."""

import json

import numpy as np
import pytest

from drivekd_jax.data import tokenizer as text_tokenizer
from imug_jax.judges import make_judge
from imug_jax.judges.base import ImagePart, JudgeError
from imug_jax.judges.local import LocalModelJudge
from imug_jax.judges.prompts import PromptSet
from imug_jax.models.protocol import ModelError, Response
from imug_jax.models.tiny import TinyConfig, TinyUnifiedModel
from imug_jax.scoring import image_points

POINTS_TEXT = (
  "Sequence description:\n- Image_1 (Turn 1 input image)\n- Image_2 (Target Image)\n\n"
  "[Task Instruction Recap]:\nPaint it red.\n\n[Evaluation Points List]:\n1. red canvas\n"
  "2. nothing else\n3. square\n\nPlease output JSON results."
)
DYNAMIC_TEXT = (
  "### REFERENCE CONTEXT PROVIDED ###\nTurn 1: Q: Draw. | AI Resp: [IMAGE_RESPONSE: See Image_1]\n"
  "\n### TARGET QUESTION (Turn 2) ###\nQuestion: How many? A) 1 B) 2\nType: SINGLE-CHOICE\n"
  "Identify the correct options based on the images provided."
)


class Scripted:
  name = "scripted"

  def __init__(self, replies):
    self.replies, self.histories = list(replies), []

  def respond(self, history, output_mode, temperature, rng=None):
    assert output_mode == "text_only"
    self.histories.append(history)
    reply = self.replies.pop(0)
    if isinstance(reply, Exception):
      raise reply
    return Response(text=reply)


def image(value):
  return ImagePart.from_array(np.full((4, 4, 3), value, np.uint8))


def test_structured_points_are_asked_one_by_one():
  model = Scripted(["4 looks red", "no idea", "score: 2"])
  judge = LocalModelJudge(model)
  reply = judge.chat(PromptSet.ours().image, [image(1), image(2), POINTS_TEXT])
  points = image_points.parse_point_scores(reply)
  assert [(p.point_id, p.score) for p in points] == [(1, 4), (3, 2)]  # point 2 gave no digit
  first = model.histories[0]
  assert first[0]["role"] == "system"
  user = first[1]["content"]
  assert [item["type"] for item in user] == ["image", "text"]  # only the target image
  assert "Paint it red." in user[1]["text"] and "red canvas" in user[1]["text"]


def test_structured_failures_surface_as_unparseable_or_judge_errors():
  judge = LocalModelJudge(Scripted(["x", "y", "z"]))
  outcome = image_points.ask_for_points(judge, "rubric", [image(1), POINTS_TEXT], retries=0)
  assert outcome.error is not None and outcome.points == ()
  broken = LocalModelJudge(Scripted([ModelError("context too long")]))
  with pytest.raises(JudgeError, match="context too long"):
    broken.chat("rubric", [image(1), POINTS_TEXT])


def test_dynamic_letters_are_read_from_the_reply():
  model = Scripted(["I think B, maybe also d"])
  judge = LocalModelJudge(model)
  reply = json.loads(judge.chat(PromptSet.ours().dynamic, [DYNAMIC_TEXT, image(3)]))
  assert reply["determined_answer"] == "B"
  question = model.histories[0][1]["content"][-1]["text"]
  assert question.startswith("Question: How many?") and "REFERENCE CONTEXT" not in question


def test_raw_mode_passes_the_whole_request():
  model = Scripted(['{"evaluation_results": [{"point_id": 1, "score": 3}]}'])
  judge = make_judge("local", model=model, structured=False)
  assert judge.chat("rubric", [image(1), POINTS_TEXT]).startswith('{"evaluation_results"')
  assert model.histories[0][0]["content"][0]["text"] == "rubric"
  assert model.histories[0][1]["content"][-1]["text"] == POINTS_TEXT


@pytest.mark.slow
def test_real_tiny_model_judge_call(tmp_path):
  """A real call through the tiny JAX model: whatever it answers, the judge returns text and the
  scorer either parses it into in-range points or reports it as unparseable."""
  tok = text_tokenizer.train_bpe_tokenizer(
    [POINTS_TEXT, DYNAMIC_TEXT, "0 1 2 3 4 5 A B C"] * 4, 300, tmp_path / "tok.json"
  )
  config = TinyConfig(
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=64,
    cache_length=1024,
    chunk_buckets=(512,),
    max_text_tokens=4,
  )
  judge = LocalModelJudge(TinyUnifiedModel(tok, config, seed=0))
  reply = judge.chat(PromptSet.ours().image, [image(1), POINTS_TEXT])
  assert isinstance(reply, str) and judge.calls == 3
  outcome = image_points.ask_for_points(judge, "rubric", [image(1), POINTS_TEXT], retries=0)
  assert all(0 <= p.score <= 5 for p in outcome.points)
  assert (outcome.error is None) == bool(outcome.points)
  assert outcome.reply == reply  # the same request, the same key: the same judgement
