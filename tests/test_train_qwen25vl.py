"""Qwen2.5-VL through the Drive-KD trainer: tokenizer, processor, batch positions, experiment
wiring, and `configs/drivekd/paper_qwen25vl.py:tiny` end to end (teacher warm-up, distillation,
held-out evaluation of the student and the teacher)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drivekd_jax.data import pipeline as pl
from drivekd_jax.data import qwen25_vl_processor as qwen_processor
from drivekd_jax.data.processor import Processor, tokenizer_for
from drivekd_jax.data.tokenizer import IMAGE_PAD, VISION_END, VISION_START, train_bpe_tokenizer
from drivekd_jax.models import presets
from drivekd_jax.models.qwen25_vl import Qwen25VL
from drivekd_jax.train import experiment as experiment_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train import state as state_lib
from drivekd_jax.train.settings import ModelEntry, RunSettings

REPO = Path(__file__).resolve().parents[1]
TEXTS = ["What colour is the car ahead? A. red B. blue", "Stop at the light: yes."] * 8


TEACHER = "shared"  # the Qwen config's one teacher (the official default name)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
  return train_bpe_tokenizer(TEXTS, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _qwen(tokenizer, **overrides):
  """A tiny Qwen2.5-VL reading `tokenizer` (image token and vocabulary)."""
  image_id = tokenizer.image_token_ids("qwen2.5-vl")[1]
  return presets.qwen25_vl("tiny", image_token_id=image_id, **overrides)


def _image(seed: int, height: int = 40, width: int = 70) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_a_trained_bpe_gets_qwen_image_tokens_appended_and_keeps_its_ids(bpe):
  qwen = tokenizer_for(bpe, "qwen2.5-vl")
  size = bpe.vocab_size
  assert qwen.image_token_ids("qwen2.5-vl") == (size, size + 1, size + 2)
  assert qwen.vocab_size == size + 3
  for text in TEXTS[:2]:
    np.testing.assert_array_equal(qwen.encode(text), bpe.encode(text))
  assert qwen.special_ids == bpe.special_ids
  assert tokenizer_for(qwen, "qwen2.5-vl") is qwen  # nothing missing: unchanged
  assert tokenizer_for(bpe, "internvl") is bpe
  with pytest.raises(KeyError, match="vision_start.* is not in the vocabulary"):
    Processor.for_model(bpe, _qwen(qwen), image_size=56)


def test_qwen_processor_writes_vision_blocks_and_clip_pixels(bpe):
  tokenizer = tokenizer_for(bpe, "qwen2.5-vl")
  processor = Processor.for_model(tokenizer, _qwen(tokenizer), image_size=56)
  images = [_image(0), _image(1, 90, 50)]
  example = processor.training_example("What colour?", "A.", images, capability="perception")
  text = tokenizer.decode(example["input_ids"])
  block = VISION_START + IMAGE_PAD * 4 + VISION_END
  assert text.startswith("<|im_start|>user\n" + block + block + "What colour?")
  np.testing.assert_array_equal(
    example["image_mask"], example["input_ids"] == tokenizer.token_id(IMAGE_PAD)
  )
  # Pixels: Qwen2.5-VL's own preprocessing at a fixed 56 px square (CLIP mean/std).
  settings = qwen_processor.ImageSettings(fixed_size=(56, 56))
  want = np.stack([qwen_processor.normalized_image(image, settings) for image in images])
  np.testing.assert_allclose(example["pixel_values"], want, atol=1e-6)
  with pytest.raises(ValueError, match="multiple of 28"):
    Processor.for_model(tokenizer, _qwen(tokenizer), image_size=60)
  with pytest.raises(ValueError, match="not tiled"):
    Processor.for_model(tokenizer, _qwen(tokenizer), image_size=56, max_tiles=4)


def test_pipeline_positions_are_the_models_mrope_positions(bpe):
  """Batches from the pipeline carry `[B, 3, L]` M-RoPE positions equal to the model's own on
  the real tokens (rows with 0 to 3 images of 4 tokens, a padding row), also after
  `pad_batch_length`."""
  tokenizer = tokenizer_for(bpe, "qwen2.5-vl")
  config = _qwen(tokenizer, vocab_size=tokenizer.vocab_size)
  processor = Processor.for_model(tokenizer, config, image_size=56)
  records = [
    {"question": f"Q{i} what colour?", "answer": "A.", "images": [_image(i)] * (i % 4)}
    for i in range(5)
  ]
  pipeline = pl.TrainingPipeline(
    records,
    processor,
    pl.PipelineConfig(batch_size=3, buckets=(64,), max_images=3, shuffle=False, num_epochs=1),
  )
  model = Qwen25VL(config, rngs=nnx.Rngs(0))
  batches = list(pipeline.iterator())
  assert len(batches) == 2 and not batches[1]["example_mask"][2]
  for batch in batches:
    assert batch["positions"].shape == (3, 3, 64) and batch["positions"].dtype == np.int32
    want = model.rope_positions(
      jnp.asarray(batch["input_ids"]),
      jnp.asarray(batch["pixel_values"]),
      attention_mask=jnp.asarray(batch["attention_mask"]),
    )
    real = batch["attention_mask"][:, None, :]
    np.testing.assert_array_equal(np.where(real, batch["positions"], 0), np.where(real, want, 0))
  # Row 1 holds one image after "<|im_start|>user\n<|vision_start|>": its tokens share the
  # temporal position and walk a 2x2 grid; the text after it resumes 2 positions later.
  row = batches[0]["positions"][1]
  start = int(np.flatnonzero(batches[0]["image_mask"][1])[0])
  grid = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1)]
  assert row[:, start : start + 4].T.tolist() == [
    [start + t, start + i, start + j] for t, i, j in grid
  ]
  assert row[:, start + 4].tolist() == [start + 2] * 3
  padded = pl.pad_batch_length(batches[0], 80, tokenizer.pad_id)
  assert padded["positions"].shape == (3, 3, 80)
  np.testing.assert_array_equal(padded["positions"][..., :64], batches[0]["positions"])


def test_internvl_batches_keep_one_dimensional_positions(bpe):
  config = presets.internvl3("tiny", image_token_id=bpe.img_context_id)
  processor = Processor.for_model(bpe, config)
  assert processor.config.family == "internvl"
  example = processor.training_example("What colour?", "A.", [_image(0)])
  batch = pl.collate(
    [example],
    buckets=(40,),
    max_images=1,
    pad_id=bpe.pad_id,
    image_shape=(56, 56, 3),
    positions_fn=processor.batch_positions,
  )
  n = len(example["input_ids"])
  assert batch["positions"].shape == (1, 40)
  assert batch["positions"][0].tolist() == list(range(n)) + [0] * (40 - n)


def test_llm_only_training_freezes_the_qwen_vision_tower():
  model = Qwen25VL(presets.qwen25_vl("tiny"), rngs=nnx.Rngs(0))
  _, params, frozen = state_lib.split_student(model, "llm")
  trainable = {path[0] for path, _ in nnx.to_flat_state(params)}
  fixed = {path[0] for path, _ in nnx.to_flat_state(frozen)}
  assert trainable == {"language_model"} and "visual" in fixed
  _, params, _ = state_lib.split_student(model, "all")
  assert {path[0] for path, _ in nnx.to_flat_state(params)} == {"language_model", "visual"}


def _settings(**changes) -> RunSettings:
  config = _paper_config("tiny")
  for key, value in changes.items():
    config[key] = value
  return RunSettings.from_config(config)


def _paper_config(arg: str):
  import importlib.util

  path = REPO / "configs" / "drivekd" / "paper_qwen25vl.py"
  spec = importlib.util.spec_from_file_location("paper_qwen25vl", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_experiment_builds_qwen_models_and_their_processor(bpe):
  settings = _settings()
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = sharding_lib.rules_from_config()
  model, config = experiment_lib.build_model(settings.student, bpe, mesh, rules, 0)
  assert isinstance(model, Qwen25VL)
  qwen = tokenizer_for(bpe, "qwen2.5-vl")
  assert config.image_token_id == qwen.token_id(IMAGE_PAD)
  assert config.text.vocab_size == max(qwen.vocab_size, 512)
  processor = experiment_lib.processor_for(settings, bpe, config)
  assert processor.config.family == "qwen2.5-vl"
  assert (processor.config.image_size, processor.config.tokens_per_image) == (56, 4)
  assert processor.image_token_id == config.image_token_id
  # Off synthetic data the images are 448 px squares: 256 tokens, as InternVL3's tiles.
  files = _paper_config("tiny")
  files.data.source = "files"
  files_processor = experiment_lib.processor_for(RunSettings.from_config(files), bpe, config)
  assert files_processor.config.tokens_per_image == 256


def test_a_teacher_must_cut_images_as_the_student():
  student = presets.qwen25_vl("tiny")
  experiment_lib.check_same_image_layout(student, presets.qwen25_vl("tiny", num_layers=3), "t")
  with pytest.raises(ValueError, match="teacher 'shared' is a internvl model"):
    experiment_lib.check_same_image_layout(student, presets.internvl3("tiny"), "shared")
  other = ModelEntry(preset="qwen2.5-vl-tiny")
  assert experiment_lib.family_of(other) == "qwen2.5-vl"
  coarse = dataclasses.replace(
    student, vision=dataclasses.replace(student.vision, spatial_merge_size=1)
  )
  with pytest.raises(ValueError, match="teacher 'big': teacher and student cut images"):
    experiment_lib.check_same_image_layout(student, coarse, "big")


def test_paper_tiny_config_is_a_qwen_teacher_and_student():
  settings = _settings()
  assert settings.student.preset == "qwen2.5-vl-tiny"
  assert [settings.teachers[n].preset for n in settings.teacher_order] == ["qwen2.5-vl-tiny"]
  assert settings.teacher_warmup.steps > 0 and settings.eval.teachers


SMALL = [
  "--config.num_steps=3",
  "--config.teacher_warmup.steps=3",
  "--config.teacher_warmup.log_every=1",
  "--config.data.synthetic.num_train_frames=4",
  "--config.data.synthetic.num_test_frames=1",
  "--config.log_every=1",
  "--config.checkpoint.every_steps=3",
  "--config.eval.max_examples=2",
  "--config.eval.max_new_tokens=3",
  "--config.progress_bar=False",
  # Batch 2 over data = 2 of the suite's 8 fake devices; weights split over tensor.
  "--config.mesh.data=2",
  "--config.mesh.fsdp=1",
  "--config.mesh.tensor=4",
]


@pytest.mark.slow
def test_tiny_qwen_distillation_runs_end_to_end(tmp_path):
  """launch.py on `paper_qwen25vl.py:tiny`, shrunk: CE warm-up of the Qwen teacher, Drive-KD
  steps on the Qwen student (every loss finite), held-out answers of student and teacher."""
  workdir = tmp_path / "run"
  cmd = [
    sys.executable,
    "launch.py",
    "--config=configs/drivekd/paper_qwen25vl.py:tiny",
    f"--workdir={workdir}",
    *SMALL,
  ]
  env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
  out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-6000:]
  warmup = json.loads((workdir / "teachers" / TEACHER / "warmup.json").read_text())
  assert [step for step, _ in warmup["loss"]] == [1, 2, 3]
  from drivekd_jax.train import metrics as metrics_lib

  scalars = metrics_lib.read_scalars(str(workdir / "tensorboard"))
  for tag in ("loss/sup", "loss/perception", "loss/reasoning", "loss/planning"):
    values = [value for _, value in scalars[tag]]
    assert len(values) == 3 and np.all(np.isfinite(values)), (tag, values)
  assert scalars["nonfinite_total"][-1][1] == 0
  summary = json.loads((workdir / "eval_summary.json").read_text())
  assert summary["checkpoint_step"] == 3
  answers = (workdir / "eval" / "answers.jsonl").read_text().splitlines()
  assert len(answers) >= 1
  assert summary["by_capability"]["overall"]["questions"] == len(answers)
  assert summary["teachers"]["shared"]["questions"] == len(answers)
  assert (workdir / "teachers" / TEACHER / "eval_summary.json").is_file()
