"""IMUG models: protocol messages, guided sampling, the tiny model's carried multi-turn cache."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drivekd_jax.data.tokenizer import train_bpe_tokenizer
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.protocol import ModelError, ProtocolError, Response
from imug_jax.models.tiny import GuidedSampling, TinyConfig, TinyUnifiedModel, WindowSampling

CONFIG = TinyConfig(
  hidden_size=32,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  intermediate_size=64,
  cache_length=1024,
  chunk_buckets=(64,),
  max_text_tokens=4,
  image_grid=4,
  image_patch=8,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  texts = ["Draw a red square.", "What colour is it? A. red B. blue", "Answer with a letter."]
  return train_bpe_tokenizer(texts * 3, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _image(colour: str) -> bytes:
  tok = itok.PaletteTokenizer(4, 8)
  return itok.png_bytes(tok.decode(np.full(16, tok.token(colour))))


def _dialogue():
  """(user content, output mode) per turn: image, text, image, text."""
  return [
    ([protocol.text_item("Draw a red square."), protocol.image_item(_image("blue"))], "image_only"),
    ([protocol.text_item("What colour is it? A. red B. blue")], "text_only"),
    ([protocol.text_item("Draw it again, blue.")], "image_only"),
    ([protocol.text_item("Answer with a letter.")], "text_only"),
  ]


def _roll(model, *, fresh_each_turn=False, replace_images=None, temperature=0.0):
  """Runs the dialogue with own history; optional reference images replace assistant images."""
  history = [protocol.message("system", [protocol.text_item("Answer with a letter.")])]
  answers = []
  for turn, (content, mode) in enumerate(_dialogue()):
    history.append(protocol.message("user", content))
    if fresh_each_turn:
      model.reset()
    response = model.respond(history, mode, temperature, jax.random.key(turn))
    answers.append(response)
    if replace_images and response.image is not None:
      response = Response(image=replace_images)
    history.append(protocol.assistant_message(response))
  return answers


def test_response_and_request_validation():
  png = _image("red")
  assert Response.from_json({"response": {"text": "B"}}) == Response(text="B")
  assert Response.from_json({"response": Response(image=png).to_json()}).image == png
  with pytest.raises(ModelError, match="boom"):
    Response.from_json({"response": {"error": "boom"}})
  with pytest.raises(ModelError, match="boom"):
    Response.from_json({"error": "boom"})
  for garbage in ([], {"response": 3}, {"response": {"image": 5}}, "x"):
    with pytest.raises(ProtocolError):
      Response.from_json(garbage)
  with pytest.raises(ProtocolError, match="invalid base64"):
    Response.from_json({"response": {"image": "%%%"}})
  with pytest.raises(ProtocolError, match="not a readable image"):
    Response.from_json({"response": {"image": protocol.encode_image(b"not a png")}})
  with pytest.raises(ValueError):
    Response(text="a", image=png)
  good = {
    "history": [protocol.message("user", [protocol.text_item("hi"), protocol.image_item(png)])],
    "output_mode": "text_only",
    "temperature": 0.7,
  }
  assert protocol.validate_request(good)[1:] == ("text_only", 0.7)
  bad = [
    ({"output_mode": "video"}, "output_mode"),
    ({"temperature": "hot"}, "temperature"),
    ({"history": []}, "non-empty"),
    ({"history": [{"role": "robot", "content": []}]}, "history\\[0\\]"),
    (
      {"history": [protocol.message("user", [{"type": "image", "image": "@@"}])]},
      "history\\[0\\].content\\[0\\].image: invalid base64",
    ),
    ({"history": [protocol.message("assistant", [protocol.text_item("x")])]}, "last message"),
  ]
  for change, message in bad:
    with pytest.raises(ProtocolError, match=message):
      protocol.validate_request(good | change)


def test_guided_and_window_sampling():
  logits = jnp.array([[0.0, 5.0, 1.0, 3.0], [0.0, 1.0, 4.0, 0.0]])  # [cond; uncond]
  window = WindowSampling(low=2, high=4)
  np.testing.assert_array_equal(window.next_tokens(logits, jax.random.key(0)), [3, 2])
  # guidance 1 is the conditional row; a large scale pushes away from the unconditional choice.
  plain = GuidedSampling(low=1, high=4, guidance=1.0, num_cond=1)
  np.testing.assert_array_equal(plain.next_tokens(logits, jax.random.key(0)), [1, 1])
  strong = GuidedSampling(low=2, high=4, guidance=5.0, num_cond=1)  # u + 5(c-u): [-, -, -11, 15]
  np.testing.assert_array_equal(strong.next_tokens(logits, jax.random.key(0)), [3, 3])
  sampled = GuidedSampling(temperature=1.0, low=2, high=4, guidance=2.0, num_cond=1)
  tokens = sampled.next_tokens(logits, jax.random.key(1))
  assert tokens[0] == tokens[1] and 2 <= int(tokens[0]) < 4


@pytest.mark.slow
def test_rollout_does_not_retrace_across_turns(tokenizer):
  model = TinyUnifiedModel(tokenizer, CONFIG, max_traces=2)  # One program per output mode.
  answers = _roll(model, temperature=0.7)
  answers += _roll(model, temperature=0.7, replace_images=_image("red"))  # Reuses both.
  assert [a.image is not None for a in answers] == [True, False, True, False] * 2
  image = itok.read_image(answers[0].image)
  assert image.shape == (32, 32, 3)
  assert all(isinstance(a.text, str) for a in answers[1::2])
  assert model.tokens  # The cache carries the conversation.


def test_carried_cache_equals_reencoding_from_scratch(tokenizer):
  carried = TinyUnifiedModel(tokenizer, CONFIG, seed=1)
  scratch = TinyUnifiedModel(tokenizer, CONFIG, seed=1)
  assert _roll(carried) == _roll(scratch, fresh_each_turn=True)
  # A history that differs from what the cache holds (reference images instead of the model's
  # own) rolls the cache back to the common prefix and still matches re-encoding.
  reference = _image("green")
  assert _roll(carried, replace_images=reference) == _roll(
    scratch, fresh_each_turn=True, replace_images=reference
  )


@pytest.mark.slow
def test_several_samples_decode_as_one_batch(tokenizer):
  batched = TinyUnifiedModel(tokenizer, dataclasses.replace(CONFIG, num_samples=3), seed=2)
  single = TinyUnifiedModel(tokenizer, CONFIG, seed=2)
  history = [protocol.message("user", [protocol.text_item("Draw a red square.")])]
  greedy = batched.respond_batch(history, "image_only", 0.0, jax.random.key(0))
  assert len(greedy) == 3 and len({r.image for r in greedy}) == 1
  assert greedy[0] == single.respond(history, "image_only", 0.0, jax.random.key(0))
  sampled = batched.respond_batch(history, "image_only", 1.0, jax.random.key(0))
  assert len({r.image for r in sampled}) > 1  # Different rows draw different images.
  # The batch call kept only the shared prompt in the cache: the next turn matches re-encoding.
  history += [
    protocol.assistant_message(sampled[1]),
    protocol.message("user", [protocol.text_item("What colour is it?")]),
  ]
  single.reset()
  assert batched.respond(history, "text_only", 0.0) == single.respond(history, "text_only", 0.0)


def test_long_prompts_are_prefilled_in_pieces_and_overlong_ones_fail(tokenizer):
  history = [protocol.message("user", [protocol.text_item("Draw a red square. " * 60)])]
  model = TinyUnifiedModel(tokenizer, CONFIG)
  assert len(model.encode_prompt(history, "text_only")) > 3 * CONFIG.chunk_buckets[-1]
  pieces = model.respond(history, "text_only", 0.0)
  whole = TinyUnifiedModel(tokenizer, dataclasses.replace(CONFIG, chunk_buckets=(512,)))
  assert pieces == whole.respond(history, "text_only", 0.0)
  small = TinyUnifiedModel(tokenizer, dataclasses.replace(CONFIG, cache_length=128))
  with pytest.raises(ModelError, match="does not fit the cache"):
    small.respond(history, "text_only", 0.0)


def test_ground_truth_dialogue_supervises_exactly_the_answers(tmp_path):
  from imug_jax import run as run_lib
  from imug_jax.data import synthetic
  from imug_jax.models import tiny_train

  bench = synthetic.write_synthetic(tmp_path / "bench", num_samples=4, seed=0)
  tok = train_bpe_tokenizer(run_lib.text_corpus(bench), 300, tmp_path / "tokenizer.json")
  model = TinyUnifiedModel(tok, CONFIG)
  sample = bench.samples[0]  # Geometric_Coloring: image and text turns, dynamic answers.
  tokens, mask = tiny_train.ground_truth_dialogue(model, bench, sample)
  supervised = tokens[mask].tolist()
  expected = []
  truth = synthetic.ground_truth_images(bench.data_dir)
  meta = synthetic.load_meta(bench.data_dir)
  for task in sample.tasks:
    if task.modality == "image":
      image = truth[(sample.key, task.turn)].read_bytes()
      expected += model.image_tokens(image)[1:] + [model.im_end]
    else:
      answer = synthetic.ground_truth_answer(sample.key, task, truth, meta)
      expected += [*map(int, tok.encode(answer)), model.im_end]
  assert supervised == expected
  assert len(tokens) == len(
    model.encode_prompt([m for m in _history_of(model, bench, sample)], "text_only")
  ) - len(model.prompt_suffix("text_only"))


def _history_of(model, bench, sample):
  from imug_jax.data import synthetic
  from imug_jax.rollout.runner import user_message

  truth = synthetic.ground_truth_images(bench.data_dir)
  meta = synthetic.load_meta(bench.data_dir)
  history = [protocol.message("system", [protocol.text_item(sample.system_prompt)])]
  for task in sample.tasks:
    history.append(user_message(task, bench.images_dir))
    if task.modality == "image":
      history.append(
        protocol.assistant_message(Response(image=truth[(sample.key, task.turn)].read_bytes()))
      )
    else:
      answer = synthetic.ground_truth_answer(sample.key, task, truth, meta)
      history.append(protocol.assistant_message(Response(text=answer)))
  return history


@pytest.mark.slow
def test_training_reduces_the_loss(tmp_path):
  from imug_jax import run as run_lib
  from imug_jax.data import synthetic
  from imug_jax.models import tiny_train

  bench = synthetic.write_synthetic(tmp_path / "bench", num_samples=2, seed=0)
  tok = train_bpe_tokenizer(run_lib.text_corpus(bench), 300, tmp_path / "tokenizer.json")
  model = TinyUnifiedModel(tok, CONFIG)
  before = model.params
  losses = tiny_train.train(
    model,
    bench,
    tiny_train.TrainConfig(
      steps=12, batch_size=2, max_length=256, learning_rate=1e-2, unconditional_fraction=0.0
    ),
  )
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
  assert model.params is not before and not model.tokens  # New parameters, fresh cache.
