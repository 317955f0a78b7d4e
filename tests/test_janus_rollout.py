"""The in-process Janus `UnifiedModel`: the jitted multi-turn rollout over the synthetic
benchmark (no retrace, the carried cache equals re-encoding), CFG image turns equal to
`generate_image_tokens` (itself equal to transformers), best-of-N batches, the `/infer` server."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import threading
import urllib.request
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from janus_fixtures import hf_janus, tiny_rollout_janus
from PIL import Image

from imug_jax import run as run_lib
from imug_jax import serve
from imug_jax.data import synthetic
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.janus import unified
from imug_jax.models.janus.generate import JanusGenerator
from imug_jax.rollout import runner
from imug_jax.tts import wrappers

ROOT = Path(__file__).resolve().parents[1]
ROLLOUT = unified.JanusRolloutConfig(cache_length=4096, chunk_buckets=(64, 1024), max_text_tokens=8)
CACHE_TOL = 1e-5  # fp32 keys of the carried cache vs a fresh encoding of the same history.


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  return synthetic.write_synthetic(tmp_path_factory.mktemp("bench"), num_samples=3, seed=1)


@pytest.fixture(scope="module")
def janus_and_tokenizer(bench, tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tokenizer = unified.train_tokenizer(run_lib.text_corpus(bench), 320, path)
  return tiny_rollout_janus(tokenizer), tokenizer


def _model(janus_and_tokenizer, config=ROLLOUT, **kw):
  janus, tokenizer = janus_and_tokenizer
  return unified.JanusUnifiedModel(janus, tokenizer, config, **kw)


def test_understanding_preprocessing_matches_transformers(janus_and_tokenizer):
  from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

  model = _model(janus_and_tokenizer)
  processor = JanusImageProcessorPil(
    size={"height": 16, "width": 16}, image_mean=[0.5] * 3, image_std=[0.5] * 3
  )
  for shape in ((20, 12, 3), (9, 30, 3), (16, 16, 3)):
    image = np.random.default_rng(len(shape)).integers(0, 255, shape, np.uint8)
    want = processor(Image.fromarray(image), return_tensors="np")["pixel_values"][0]
    got = model.preprocess(itok.png_bytes(image))
    np.testing.assert_allclose(got.transpose(2, 0, 1), want, atol=1e-6, rtol=0)


@pytest.mark.slow
def test_rollout_through_the_synthetic_benchmark_without_retracing(
  bench, janus_and_tokenizer, tmp_path
):
  # Two buckets x two modes: at most four programs for the turn, whatever the number of turns.
  model = _model(janus_and_tokenizer, max_traces=4)
  summary = runner.run_rollout(
    model, bench.samples, images_dir=bench.images_dir, out_dir=tmp_path, progress=False
  )
  assert (summary.done, summary.failed, summary.error_turns) == (3, 0, 0)
  assert summary.turns == sum(len(s.tasks) for s in bench.samples) > 6
  pngs = list((tmp_path / "janus").rglob("turn_*_output.png"))
  assert pngs and all(itok.read_image(p.read_bytes()).shape == (16, 16, 3) for p in pngs)
  assert model._jitted_turn._cache_size() <= 4
  assert model._text_embeds._cache_size() <= 2  # one per bucket
  assert model._features._cache_size() == model._decode._cache_size() == 1


def _turns(sample, bench):
  """The sample's user turns as official messages, with their output modes."""
  for task in sample.tasks:
    yield runner.user_message(task, bench.images_dir), task.output_mode


@pytest.mark.slow
def test_carried_cache_equals_reencoding(bench, janus_and_tokenizer):
  carried = _model(janus_and_tokenizer)
  sample = max(bench.samples, key=lambda s: len(s.tasks))
  history = [protocol.message("system", [protocol.text_item(sample.system_prompt)])]
  history = history if sample.system_prompt else []
  reused = []
  for user, mode in _turns(sample, bench):
    history.append(user)
    got = carried.respond(history, mode, temperature=0.0)
    reused.append(carried.reused_tokens)
    fresh = _model(janus_and_tokenizer)
    want = fresh.respond(history, mode, temperature=0.0)
    assert got == want
    shared = 0
    for a, b in zip(carried.keys, fresh.keys):
      if a != b:
        break
      shared += 1
    prompt, _ = carried.encode_prompt(history, mode)
    assert shared >= len(prompt)
    for layer in range(len(carried.cache.k)):
      for cache_a, cache_b in ((carried.cache.k, fresh.cache.k), (carried.cache.v, fresh.cache.v)):
        a = np.asarray(cache_a[layer][0][:, carried.slots[:shared]])
        b = np.asarray(cache_b[layer][0][:, fresh.slots[:shared]])
        np.testing.assert_allclose(a, b, atol=CACHE_TOL, rtol=0)
    # Between calls the unconditional row holds nothing: each image turn rebuilds it.
    assert not np.asarray(carried.cache.key_mask[1]).any()
    history.append(protocol.assistant_message(got))
  assert reused[0] == 0 and all(r > 0 for r in reused[1:])


@pytest.mark.slow
def test_image_turn_is_cfg_generation(janus_and_tokenizer):
  janus, tokenizer = janus_and_tokenizer
  model = _model(janus_and_tokenizer, dataclasses.replace(ROLLOUT, guidance=3.0))
  history = [protocol.message("user", [protocol.text_item("Paint the grid.")])]
  got = itok.read_image(model.respond(history, "image_only", temperature=0.0).image)
  prompt, _ = model.encode_prompt(history, "image_only")
  generator = JanusGenerator(janus)

  def image(boi_id):
    codes = generator.image_tokens(
      np.asarray([prompt]),
      bos_id=tokenizer.bos_id,
      boi_id=boi_id,
      pad_id=tokenizer.pad_id,
      guidance=3.0,
    )
    pixels = np.asarray(generator.decode(codes))[0]
    return np.clip((pixels + 1) * 127.5, 0, 255).astype(np.uint8)

  np.testing.assert_array_equal(got, image(tokenizer.boi_id))
  # The comparison tells apart unconditional rows that lose their <begin_of_image>.
  assert not np.array_equal(got, image(-1))


@pytest.mark.slow
def test_best_of_n_decodes_candidates_as_one_batch(janus_and_tokenizer):
  model = _model(
    janus_and_tokenizer, dataclasses.replace(ROLLOUT, num_samples=2, max_text_tokens=4)
  )
  history = [protocol.message("user", [protocol.text_item("Paint a blue square.")])]
  images = model.respond_batch(history, "image_only", 1.0, jax.random.key(3))
  assert len(images) == 2 and images[0].image != images[1].image
  best = wrappers.wrap(model, "bon", n=2)
  assert best.respond(history, "image_only", 1.0, jax.random.key(4)).image is not None
  assert best.batched_calls == 1
  for strategy in ("cot", "verify"):
    answer = wrappers.wrap(model, strategy).respond(history, "image_only", 1.0, jax.random.key(5))
    assert answer.image is not None


def test_infer_server_answers_the_official_request(janus_and_tokenizer):
  model = _model(janus_and_tokenizer)
  server = serve.make_server(model, port=0)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    image = itok.png_bytes(np.random.default_rng(0).integers(0, 255, (20, 12, 3), np.uint8))
    history = [
      protocol.message("user", [protocol.text_item("What is this?"), protocol.image_item(image)])
    ]
    url = f"http://127.0.0.1:{server.server_address[1]}/infer"
    for mode, field in (("text_only", "text"), ("image_only", "image")):
      body = json.dumps({"history": history, "output_mode": mode, "temperature": 0.7}).encode()
      request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
      with urllib.request.urlopen(request, timeout=120) as reply:
        answer = json.loads(reply.read())["response"]
      assert set(answer) == {field}
    assert itok.read_image(protocol.decode_image(answer["image"])).shape == (16, 16, 3)
  finally:
    server.shutdown()
    server.server_close()


@pytest.mark.slow
def test_janus_checkpoint_runs_the_whole_pipeline(tmp_path):
  """eval/demo config with --config.model.name=janus --config.model.checkpoint=DIR: a tiny random
  transformers Janus rolls out the synthetic benchmark, which is scored and reported."""
  spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "imug" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  config.data.num_samples = 2
  config.rollout.progress = False
  config.rollout.reference_control = False
  config.tts.strategies = ()
  config.model.name = "janus"
  config.model.checkpoint = str(tmp_path / "janus_ckpt")
  config.model.janus = ml_collections.ConfigDict(
    dict(cache_length=4096, chunk_buckets=(64, 1024), max_text_tokens=8)
  )
  bench = run_lib.load_benchmark(config, str(tmp_path))
  tokenizer = unified.train_tokenizer(run_lib.text_corpus(bench), 320, tmp_path / "tokenizer.json")
  hf_janus("untied_gqa", vocab_size=320, image_token_id=tokenizer.image_id).save_pretrained(
    config.model.checkpoint
  )
  tokenizer.backend.save(str(tmp_path / "janus_ckpt" / "tokenizer.json"))
  summary = run_lib.run(config, str(tmp_path))
  assert summary["runs"]["janus"]["done"] == 2 and summary["runs"]["janus"]["failed"] == 0
  assert summary["runs"]["janus"]["error_turns"] == 0
  assert "janus" in summary["report"]["models"]
  assert (tmp_path / "report" / "summary.json").is_file()
