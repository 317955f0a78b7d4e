"""Each test-time-scaling wrapper raises the image score of a model whose errors are random.

The scripted model paints a canvas in a requested colour and errs at random: it draws the right
colour with probability 0.35, plans it in text with probability 0.9, and recognises whether an
image has the requested colour with probability 0.9. Baseline and wrapped models are rolled out
with the rollout runner over a small benchmark in the release format, scored by the scoring
pipeline with an exact judge, and compared with `tts.gains`.
"""

import base64
import io
import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from imug_jax.data import schema
from imug_jax.data.release import Release
from imug_jax.judges.base import ImagePart, text_of
from imug_jax.models.protocol import Response
from imug_jax.rollout.runner import run_rollout
from imug_jax.scoring import pipeline
from imug_jax.scoring.summary import TurnRow
from imug_jax.tts import gains, verifiers, wrappers

COLOURS = {
  "red": (220, 30, 30),
  "green": (30, 180, 40),
  "blue": (30, 60, 220),
  "yellow": (230, 220, 30),
  "purple": (140, 40, 160),
  "orange": (240, 140, 20),
}
_COLOUR = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def canvas(colour):
  buffer = io.BytesIO()
  Image.fromarray(np.full((8, 8, 3), COLOURS[colour], np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def colour_of(png):
  pixel = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))[0, 0].astype(int)
  return min(COLOURS, key=lambda c: np.abs(pixel - COLOURS[c]).sum())


def texts(message):
  return " ".join(i["text"] for i in message["content"] if i["type"] == "text")


class RandomErrorModel:
  """A scripted unified model with random errors (see the module docstring)."""

  def __init__(self, name="scripted", p_draw=0.35, p_plan=0.9, p_judge=0.9):
    self.name, self.p_draw, self.p_plan, self.p_judge = name, p_draw, p_plan, p_judge
    self.calls = 0

  def requested(self, history):
    for message in reversed(history):
      if message["role"] == "user":
        found = _COLOUR.findall(texts(message))
        if found and "Paint" in texts(message):
          return found[-1]
    raise AssertionError("no paint instruction in history")

  def plan(self, history):
    last = history[-1]
    if history[-2:-1] and history[-2]["role"] == "assistant" and "plan" in texts(last).lower():
      found = _COLOUR.findall(texts(history[-2]))
      return found[-1] if found else None
    return None

  def respond(self, history, output_mode, temperature, rng=None):
    self.calls += 1
    gen = np.random.default_rng(np.asarray(jax.random.key_data(rng)).ravel().tolist())
    want = self.requested(history)
    others = [c for c in COLOURS if c != want]
    if output_mode == "image_only":
      planned = self.plan(history)
      if planned is not None:
        return Response(image=canvas(planned))
      return Response(image=canvas(want if gen.random() < self.p_draw else gen.choice(others)))
    question = texts(history[-1])
    if question == wrappers.PLAN_PROMPT:
      colour = want if gen.random() < self.p_plan else gen.choice(others)
      return Response(text=f"I will paint the whole canvas {colour}.")
    if question in (wrappers.CHECK_PROMPT, verifiers.RATE_PROMPT):
      image = next(i for i in history[-2]["content"] if i["type"] == "image")
      right = colour_of(base64.b64decode(image["image"])) == want
      right = right if gen.random() < self.p_judge else not right
      if question == wrappers.CHECK_PROMPT:
        return Response(text="YES" if right else "NO")
      return Response(text="5" if right else "1")
    return Response(text="A")


class BatchedModel(RandomErrorModel):
  """The same model with batched sampling (a fixed batch of `batch` answers per call)."""

  def __init__(self, batch, **kwargs):
    super().__init__(**kwargs)
    self.batch = batch

  def respond_batch(self, history, output_mode, temperature, rng=None):
    keys = jax.random.split(rng, self.batch)
    return [self.respond(history, output_mode, temperature, k) for k in keys]


class ExactJudge:
  """5 for every point when the target has the colour named in the instruction recap, else 1."""

  name = "exact-colour"

  def chat(self, system, parts, *, temperature=0.1):
    recap = text_of(parts).split("[Task Instruction Recap]:")[1].split("[Evaluation Points")[0]
    want = _COLOUR.findall(recap)[-1]
    target = [p for p in parts if isinstance(p, ImagePart)][-1]
    score = 5 if colour_of(target.data) == want else 1
    return json.dumps({"evaluation_results": [{"point_id": 1, "score": score}]})


def paint_release(tmp_path, num_samples=60):
  samples = []
  gen = np.random.default_rng(0)
  for i in range(num_samples):
    first, second = gen.choice(list(COLOURS), 2, replace=False)
    samples.append(
      schema.parse_sample(
        {
          "domain": "Color_Reasoning",
          "subdomain": "paint",
          "sample_id": str(i + 1),
          "tasks": [
            {
              "turn": 1,
              "modality": "image",
              "input": [{"text": f"Paint the canvas {first}."}],
              "output": {"evaluation_points": [f"The canvas is {first}."]},
            },
            {
              "turn": 2,
              "modality": "image",
              "input": [{"text": f"Paint the canvas {second} now."}],
              "output": {"evaluation_points": [f"The canvas is {second}."]},
            },
            {
              "turn": 3,
              "modality": "text",
              "input": [{"text": "Is it painted? A) yes B) no"}],
              "output": {"answer": "A"},
            },
          ],
        }
      )
    )
  (tmp_path / "images").mkdir()
  return Release(tmp_path, samples, {}, {}, {})


def run(model, bench, out_dir):
  run_rollout(
    model, bench.samples, images_dir=bench.images_dir, out_dir=out_dir, seed=1, progress=False
  )
  return pipeline.score_model(out_dir / model.name, bench, ExactJudge()).rows


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = tmp_path_factory.mktemp("tts")
  bench = paint_release(root)
  baseline = run(RandomErrorModel(), bench, root / "out")
  return root, bench, baseline


@pytest.mark.parametrize(
  "make, min_gain",
  [
    (lambda m: wrappers.ChainOfThought(m), 25.0),
    (lambda m: wrappers.SelfVerification(m, rounds=3), 15.0),
    (lambda m: wrappers.BestOfN(m, n=4), 20.0),
    (lambda m: wrappers.BestOfN(m, n=4, verifier=verifiers.JudgeVerifier(ExactJudge())), 30.0),
  ],
  ids=["cot", "verify", "bon-self", "bon-judge"],
)
def test_wrapper_raises_image_score(setting, make, min_gain):
  root, bench, baseline = setting
  wrapped = make(RandomErrorModel())
  result = gains.gains(baseline, run(wrapped, bench, root / "out"))
  assert result["image"]["count"] == 120
  # Baseline: 0.35 * 100 + 0.65 * 20 = 48 expected; every strategy should clearly beat it.
  assert 35 < result["image"]["baseline"] < 62
  assert result["image"]["gain"] > min_gain, result
  assert set(result["by_turn"]) == {1, 2}
  assert result["text"]["gain"] == 0.0  # text turns pass through unchanged


def test_best_of_n_uses_one_batched_call_per_turn():
  model = BatchedModel(batch=4, p_judge=1.0)  # the self-rating is always right: 5 iff red
  wrapper = wrappers.BestOfN(model, n=4)
  history = [{"role": "user", "content": [{"type": "text", "text": "Paint the canvas red."}]}]
  response = wrapper.respond(history, "image_only", 0.7, jax.random.key(10))
  assert wrapper.batched_calls == 1
  assert wrapper.last_scores == [1, 1, 1, 5]  # this key draws red last only
  assert colour_of(response.image) == "red"
  text = wrapper.respond(history, "text_only", 0.7, jax.random.key(3))
  assert text.text == "A"


def test_self_verification_stops_at_the_round_limit():
  model = RandomErrorModel(p_draw=0.0, p_judge=1.0)  # always wrong, always caught
  wrapper = wrappers.SelfVerification(model, rounds=2)
  history = [{"role": "user", "content": [{"type": "text", "text": "Paint the canvas red."}]}]
  wrapper.respond(history, "image_only", 0.7, jax.random.key(0))
  assert wrapper.regenerations == 2 and wrapper.model_calls == 3 + 2
  with pytest.raises(ValueError, match="unknown test-time scaling"):
    wrappers.wrap(model, "beam")


def test_gains_carry_a_paired_bootstrap_interval():
  def rows(model, scores):
    return [TurnRow(model, "Apparel", "s", str(i), 1, "image", v) for i, v in enumerate(scores)]

  base = rows("m", [10.0, 50.0, 90.0, 30.0])
  shifted = gains.gains(base, rows("m+cot", [15.0, 55.0, 95.0, 35.0]), num_boot=200)
  assert shifted["by_turn"][1] == {
    "baseline": 45.0,
    "scaled": 50.0,
    "gain": 5.0,
    "low": 5.0,
    "high": 5.0,
    "count": 4,
  }  # Every pair gains 5: no spread, whatever the spread of the scores themselves.
  mixed = gains.gains(base, rows("m+cot", [30.0, 40.0, 95.0, 30.0]), num_boot=200)["image"]
  assert mixed["low"] < mixed["gain"] < mixed["high"]
  assert gains.gains(base, [], num_boot=10)["image"]["low"] is None
