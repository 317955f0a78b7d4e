"""Tokenizer, InternVL image preprocessing, chat template and Drive-KD input construction."""

import io
import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import tokenizers
import torch
import transformers
from _paths import data_file
from tokenizers import models, pre_tokenizers, trainers

from drivekd_jax.data import tokenizer as tok
from drivekd_jax.data.processor import (
  IGNORE_INDEX,
  IMAGENET_MEAN,
  IMAGENET_STD,
  INTERNVL_SYSTEM_MESSAGE,
  Processor,
  ProcessorConfig,
  candidate_grids,
  closest_grid,
  internvl_chat_prompt,
  normalize,
  preprocess_image,
  resize_bicubic,
  tile_image,
)

TRAINING_TEXT = [
  "What is the moving status of object <c1,CAM_FRONT,0.4678,0.6772>? Please select the correct "
  "answer from the following options: A. Going ahead. B. Turn left. C. Turn right.",
  "Final: {A. Going ahead.}  \nObject: black sedan  \nPosition & orientation: front left",
  "Predict the behavior of the ego vehicle. The ego vehicle is driving slowly.",
  "In this scenario, what are safe actions to take for the ego vehicle? Keep going; 你好。",
]

TOKENS_PER_IMAGE = 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  return tok.train_bpe_tokenizer(TRAINING_TEXT * 4, 400, path)


@pytest.fixture(scope="module")
def processor(tokenizer):
  return Processor(tokenizer, ProcessorConfig(image_size=28, tokens_per_image=TOKENS_PER_IMAGE))


def _gradient_image(width, height, seed=0):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width]
  base = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
  noise = rng.integers(0, 40, (height, width, 3))
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _png(array):
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


# -- tiling ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "max_num, grid, num_tiles", [(12, (4, 2), 9), (6, (2, 1), 3), (1, (1, 1), 1)]
)
def test_nuscenes_view_tiling(max_num, grid, num_tiles):
  image = PIL.Image.fromarray(_gradient_image(1600, 900))
  assert closest_grid(1600, 900, candidate_grids(max_num), 448) == grid
  tiles = tile_image(image, image_size=448, max_num=max_num)
  assert len(tiles) == num_tiles
  assert all(t.size == (448, 448) for t in tiles)
  if num_tiles > 1:
    columns, rows = grid
    resized = np.asarray(image.resize((448 * columns, 448 * rows), PIL.Image.Resampling.BICUBIC))
    # Row-major crops: tile k covers column k % columns, row k // columns.
    for k, tile in enumerate(tiles[:-1]):
      top, left = (k // columns) * 448, (k % columns) * 448
      np.testing.assert_array_equal(np.asarray(tile), resized[top : top + 448, left : left + 448])
    thumbnail = np.asarray(image.resize((448, 448), PIL.Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.asarray(tiles[-1]), thumbnail)
  pixels = preprocess_image(image, image_size=448, max_tiles=max_num)
  assert pixels.shape == (num_tiles, 448, 448, 3) and pixels.dtype == np.float32


def test_candidate_grids_sorted_by_area():
  grids = candidate_grids(12)
  expected = {(i, j) for i in range(1, 13) for j in range(1, 13) if i * j <= 12}
  assert set(grids) == expected and len(grids) == len(expected)
  areas = [i * j for i, j in grids]
  assert areas == sorted(areas)


def test_tie_rule_prefers_larger_grid_only_for_large_images():
  # Aspect 2: (2, 1) and (4, 2) tie exactly; (4, 2) wins only above half its pixel area.
  grids = candidate_grids(12)
  assert closest_grid(1000, 500, grids, 448) == (2, 1)  # 5.0e5 < 0.5 * 448^2 * 8
  assert closest_grid(2000, 1000, grids, 448) == (4, 2)  # 2.0e6 > 8.0e5
  assert len(tile_image(PIL.Image.new("RGB", (1000, 500)), max_num=12)) == 3
  assert len(tile_image(PIL.Image.new("RGB", (2000, 1000)), max_num=12)) == 9
  assert len(tile_image(PIL.Image.new("RGB", (448, 448)), max_num=12)) == 1  # no thumbnail


# -- resize and normalisation -----------------------------------------------------------------


def _bicubic_weights(in_size, out_size):
  """PIL's antialiased bicubic (a = -0.5) resampling matrix, written from its definition."""

  def cubic(x):
    x = np.abs(x)
    a = -0.5
    return np.where(
      x < 1,
      ((a + 2) * x - (a + 3)) * x * x + 1,
      np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0),
    )

  scale = in_size / out_size
  filter_scale = max(scale, 1.0)
  support = 2.0 * filter_scale
  weights = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = (i + 0.5) * scale
    low, high = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
    k = np.arange(low, high)
    w = cubic((k - center + 0.5) / filter_scale)
    weights[i, low:high] = w / w.sum()
  return weights


def test_resize_matches_pil_bicubic():
  image = _gradient_image(160, 90, seed=1)
  ours = np.asarray(resize_bicubic(PIL.Image.fromarray(image), 56, 56))
  pil = np.asarray(PIL.Image.fromarray(image).resize((56, 56), PIL.Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(ours, pil)
  bilinear = np.asarray(PIL.Image.fromarray(image).resize((56, 56), PIL.Image.Resampling.BILINEAR))
  assert np.any(ours != bilinear)
  # Independent float computation of the same filter (horizontal pass, uint8, vertical pass).
  horizontal = np.clip(np.rint(np.einsum("hwc,ow->hoc", image, _bicubic_weights(160, 56))), 0, 255)
  both = np.clip(np.rint(np.einsum("hwc,oh->owc", horizontal, _bicubic_weights(90, 56))), 0, 255)
  assert np.max(np.abs(both - ours.astype(np.float64))) <= 1


def test_normalize_matches_totensor_normalize():
  image = _gradient_image(33, 17, seed=2)
  ours = normalize(image)
  assert ours.dtype == np.float32 and ours.shape == (17, 33, 3)
  # torchvision ToTensor + Normalize, as torch operations (CHW float32).
  tensor = torch.from_numpy(image).permute(2, 0, 1).float().div(255)
  mean = torch.tensor(IMAGENET_MEAN.tolist(), dtype=torch.float32)[:, None, None]
  std = torch.tensor(IMAGENET_STD.tolist(), dtype=torch.float32)[:, None, None]
  expected = tensor.sub(mean).div(std).permute(1, 2, 0).numpy()
  np.testing.assert_array_equal(ours, expected)
  direct = (image.astype(np.float64) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(ours, direct, atol=1e-6)


def test_single_tile_preprocessing_is_one_bicubic_resize():
  image = _gradient_image(160, 90, seed=3)
  pixels = preprocess_image(_png(image), image_size=28, max_tiles=1)
  assert pixels.shape == (1, 28, 28, 3)
  expected = normalize(PIL.Image.fromarray(image).resize((28, 28), PIL.Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(pixels[0], expected)
  # Palette / grey images are converted to RGB first.
  grey = preprocess_image(PIL.Image.fromarray(image[..., 0]), image_size=28)
  assert grey.shape == (1, 28, 28, 3)


# -- tokenizer -------------------------------------------------------------------------------


def test_trained_tokenizer_round_trip_and_special_ids(tokenizer, tmp_path):
  assert tokenizer.special_ids == {t: i for i, t in enumerate(tok.SPECIAL_TOKENS)}
  assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 2) and tokenizer.stop_ids == (2,)
  assert tokenizer.img_context_id == 5 and tokenizer.vocab_size <= 400
  text = "<|im_start|>user\n<img><IMG_CONTEXT></img>Turn left? ünïcode 你好 🚗\n\t<|im_end|>\n"
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32
  assert tokenizer.decode(ids) == text
  assert list(ids[:1]) == [tokenizer.im_start_id]  # no BOS
  assert list(ids).count(tokenizer.img_context_id) == 1
  assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nTurn left? ünïcode 你好 🚗\n\t\n"
  # Text never seen in training still round-trips (byte-level alphabet).
  assert tokenizer.decode(tokenizer.encode("Ωmega ∑ xyzzy")) == "Ωmega ∑ xyzzy"
  reloaded = tok.Tokenizer.from_path(tokenizer.source)
  np.testing.assert_array_equal(reloaded.encode(text), ids)
  with pytest.raises(KeyError, match="<unknown>"):
    tokenizer.token_id("<unknown>")
  other = tok.train_bpe_tokenizer(["other text entirely"] * 4, 300, tmp_path / "other.json")
  with pytest.raises(ValueError, match="must share one tokenizer"):
    tok.check_same_tokenizer(tokenizer, reloaded, other)


def _write_qwen_style_directory(directory: Path, gap: int = 0):
  """A HF Qwen2 tokenizer directory: vocab.json + merges.txt + added tokens after the vocab."""
  backend = tokenizers.Tokenizer(models.BPE())
  tok._qwen2_pipeline(backend)
  trainer = trainers.BpeTrainer(
    vocab_size=330, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  backend.train_from_iterator(TRAINING_TEXT * 4, trainer=trainer)
  directory.mkdir()
  backend.model.save(str(directory))
  base = backend.get_vocab_size() + gap
  ids = {token: base + i for i, token in enumerate(tok.SPECIAL_TOKENS)}
  (directory / "added_tokens.json").write_text(json.dumps(ids))
  decoder = {
    str(i): {"content": t, "special": True, "normalized": False, "lstrip": False, "rstrip": False}
    for t, i in ids.items()
  }
  config = {
    "added_tokens_decoder": decoder,
    "eos_token": "<|im_end|>",
    "pad_token": "<|endoftext|>",
    "tokenizer_class": "Qwen2Tokenizer",
  }
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return ids


def test_real_tokenizer_directory_layouts_match_transformers(tmp_path):
  ids = _write_qwen_style_directory(tmp_path / "slow")
  ours = tok.Tokenizer.from_path(tmp_path / "slow")
  assert ours.special_ids == ids
  reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "slow"))
  text = (
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>What is  the ego\n\nvehicle doing? "
    "你好<|im_end|>\n<|im_start|>assistant\nA.<|im_end|>\n"
  )
  expected = reference(text, add_special_tokens=False)["input_ids"]
  assert list(ours.encode(text)) == expected
  assert (ours.eos_id, ours.pad_id) == (reference.eos_token_id, reference.pad_token_id)
  # The fast layout (tokenizer.json + tokenizer_config.json), as save_pretrained writes it.
  reference.save_pretrained(str(tmp_path / "fast"))
  fast = tok.Tokenizer.from_path(tmp_path / "fast")
  assert list(fast.encode(text)) == expected and fast.special_ids == ids
  # Same ids from either layout: one fingerprint, so student and teachers may mix layouts.
  tok.check_same_tokenizer(ours, fast)


def test_added_token_ids_that_cannot_be_reproduced_fail(tmp_path):
  _write_qwen_style_directory(tmp_path / "gap", gap=3)
  with pytest.raises(ValueError, match="should have id"):
    tok.Tokenizer.from_path(tmp_path / "gap")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    (tmp_path / "empty").mkdir()
    tok.Tokenizer.from_path(tmp_path / "empty")


# -- chat template ---------------------------------------------------------------------------


def test_internvl_chat_prompt():
  prompt = internvl_chat_prompt("What now?", tiles_per_image=[2], tokens_per_image=2)
  assert prompt == (
    f"<|im_start|>system\n{INTERNVL_SYSTEM_MESSAGE}<|im_end|>\n<|im_start|>user\n"
    "<img>" + "<IMG_CONTEXT>" * 4 + "</img>\nWhat now?<|im_end|>\n<|im_start|>assistant\n"
  )
  prompt = internvl_chat_prompt(
    "A <image> B <image>",
    tiles_per_image=[1, 1],
    tokens_per_image=1,
    system_message=None,
    history=[("hi", "hello")],
  )
  assert prompt == (
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    "<|im_start|>user\nA <img><IMG_CONTEXT></img> B <img><IMG_CONTEXT></img><|im_end|>\n"
    "<|im_start|>assistant\n"
  )
  assert internvl_chat_prompt("x", system_message="").startswith("<|im_start|>system\n<|im_end|>\n")
  with pytest.raises(ValueError, match="placeholders"):
    internvl_chat_prompt("<image><image>", tiles_per_image=[1])


# -- Drive-KD input construction ---------------------------------------------------------------


def _context(n):
  return "<IMG_CONTEXT>" * n


def test_drivekd_layout_two_images(processor, tokenizer):
  images = [_gradient_image(40, 20, 4), _gradient_image(20, 40, 5)]
  example = processor.training_example(
    "Look <image> and <image>?", "Final: A.", images, capability="planning"
  )
  ids, labels, image_mask = example["input_ids"], example["labels"], example["image_mask"]
  t = TOKENS_PER_IMAGE
  user = (
    f"<|im_start|>user\nLook <img>{_context(t)}</img> and <img>{_context(t)}</img>?<|im_end|>\n"
  )
  assistant = "<|im_start|>assistant\nFinal: A.<|im_end|>\n"
  assert tokenizer.decode(ids) == user + assistant
  # Chunk-wise tokenisation equals tokenising the whole string (chunks end at special tokens).
  np.testing.assert_array_equal(ids, tokenizer.encode(user + assistant))
  start = len(tokenizer.encode(user))
  assert ids[start] == tokenizer.im_start_id
  np.testing.assert_array_equal(labels[:start], IGNORE_INDEX)
  np.testing.assert_array_equal(labels[start:], ids[start:])
  np.testing.assert_array_equal(labels[start:], tokenizer.encode(assistant))
  np.testing.assert_array_equal(image_mask, ids == tokenizer.img_context_id)
  first = int(np.flatnonzero(ids == tokenizer.img_start_id)[0])
  np.testing.assert_array_equal(np.flatnonzero(image_mask)[:t], np.arange(first + 1, first + 1 + t))
  assert image_mask.sum() == 2 * t
  assert example["attention_mask"].all() and example["attention_mask"].dtype == bool
  assert example["pixel_values"].shape == (2, 28, 28, 3)
  np.testing.assert_array_equal(
    example["pixel_values"][1], preprocess_image(images[1], image_size=28)[0]
  )
  assert example["capability"].dtype == np.int32 and int(example["capability"]) == 2
  assert ids.dtype == np.int32 and labels.dtype == np.int32


def test_drivekd_images_prefixed_without_placeholder(processor, tokenizer):
  images = [_gradient_image(16, 9, i) for i in range(3)]
  example = processor.training_example("Where?", "Here.", images, capability="perception")
  block = f"<img>{_context(TOKENS_PER_IMAGE)}</img>"
  assert tokenizer.decode(example["input_ids"]) == (
    f"<|im_start|>user\n{block * 3}Where?<|im_end|>\n<|im_start|>assistant\nHere.<|im_end|>\n"
  )
  labelled = Processor(tokenizer, ProcessorConfig(28, TOKENS_PER_IMAGE, camera_labels=True))
  cams = ["CAM_FRONT", "CAM_BACK", "CAM_BACK_LEFT"]
  example = labelled.training_example("Where?", "Here.", images, cameras=cams)
  assert tokenizer.decode(example["input_ids"]).startswith(
    f"<|im_start|>user\nCAM_FRONT: {block}\nCAM_BACK: {block}\nCAM_BACK_LEFT: {block}\nWhere?"
  )


def test_drivekd_system_prompt_multi_turn_and_generation_prompt(tokenizer):
  processor = Processor(
    tokenizer, ProcessorConfig(28, TOKENS_PER_IMAGE, system_message="You drive.")
  )
  messages = [
    {"role": "user", "content": "<image>Q1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "A2"},
  ]
  example = processor.build(messages, [_gradient_image(8, 8)])
  text = tokenizer.decode(example["input_ids"])
  assert text.startswith("<|im_start|>system\nYou drive.<|im_end|>\n<|im_start|>user\n<img>")
  supervised = tokenizer.decode(example["input_ids"][example["labels"] != IGNORE_INDEX])
  assert supervised == (
    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"
  )
  prompt = processor.prompt_example("<image>Q", [_gradient_image(8, 8)])
  assert tokenizer.decode(prompt["input_ids"]).endswith("Q<|im_end|>\n<|im_start|>assistant\n")
  assert (prompt["labels"] == IGNORE_INDEX).all()
  assert prompt["image_mask"].sum() == TOKENS_PER_IMAGE


def test_drivekd_dynamic_tiling_mode(tokenizer):
  processor = Processor(tokenizer, ProcessorConfig(448, 2, max_tiles=6))
  example = processor.training_example("Q", "A", [_gradient_image(1600, 900)])
  assert example["pixel_values"].shape == (3, 448, 448, 3)
  assert example["image_mask"].sum() == 3 * 2
  assert tokenizer.decode(example["input_ids"]).startswith(
    f"<|im_start|>user\n<img>{_context(6)}</img>Q"
  )


def test_drivekd_bad_input_names_the_record(processor):
  with pytest.raises(ValueError, match="2 <image> placeholders but 1 images"):
    processor.training_example("<image><image>", "A", [_gradient_image(8, 8)], where="f.json[3]: ")
  with pytest.raises(ValueError, match="capability"):
    processor.training_example("Q", "A", capability="driving")
  with pytest.raises(ValueError, match="reserved for images"):
    processor.training_example("<IMG_CONTEXT>", "A")
  with pytest.raises(ValueError, match=r"f.json\[3\]: field 'images'\[1\]: unreadable image"):
    processor.training_example(
      "Q", "A", [_png(_gradient_image(8, 8)), b"not an image"], where="f.json[3]: "
    )
  with pytest.raises(KeyError, match="record record_id=r7: missing field 'answer'"):
    processor.record_example({"record_id": b"r7", "question": b"Q"})


def test_record_from_driving_builder(processor, tokenizer):
  images = [_png(_gradient_image(32, 18, i)) for i in range(2)]
  record = {
    "record_id": b"scene_frame_0",
    "question": b"What is the moving status of object <c1,CAM_BACK,0.7,0.5>?",
    "answer": b"A",
    "images": images,
    "cameras": [b"CAM_FRONT", b"CAM_BACK"],
    "capability": b"reasoning",
  }
  example = processor.record_example(record)
  assert int(example["capability"]) == 1 and example["pixel_values"].shape == (2, 28, 28, 3)
  block = f"<img>{_context(TOKENS_PER_IMAGE)}</img>"
  assert tokenizer.decode(example["input_ids"]).startswith(f"<|im_start|>user\n{block}{block}What")
  prompt = processor.record_example(record, prompt_only=True)
  assert tokenizer.decode(prompt["input_ids"]).endswith("?<|im_end|>\n<|im_start|>assistant\n")


def test_drivekd_demo_json_messages(processor, tokenizer, tmp_path):
  demo = json.loads(data_file("drivekd", "demo.json").read_text())
  assert len(demo) == 7
  for index, sample in enumerate(demo):
    # The release ships no images: render one small image per listed path.
    images = []
    for k, _ in enumerate(sample["images"]):
      path = tmp_path / f"{index}_{k}.jpg"
      PIL.Image.fromarray(_gradient_image(32, 18, index * 10 + k)).save(path)
      images.append(path)
    example = processor.build(
      sample["messages"], images, capability=sample["question_type"], where=f"demo.json[{index}]: "
    )
    user, assistant = (m["content"] for m in sample["messages"])
    assert user.count("<image>") == len(images)
    assert example["image_mask"].sum() == len(images) * TOKENS_PER_IMAGE
    assert example["pixel_values"].shape == (len(images), 28, 28, 3)
    supervised = example["input_ids"][example["labels"] != IGNORE_INDEX]
    assert tokenizer.decode(supervised) == f"<|im_start|>assistant\n{assistant}<|im_end|>\n"
    expected_user = (
      "<|im_start|>user\n"
      + user.replace("<image>", f"<img>{_context(TOKENS_PER_IMAGE)}</img>")
      + "<|im_end|>\n"
    )
    assert tokenizer.decode(example["input_ids"]) == expected_user + (
      f"<|im_start|>assistant\n{assistant}<|im_end|>\n"
    )
    capability = ("perception", "reasoning", "planning").index(sample["question_type"])
    assert int(example["capability"]) == capability


def test_processor_for_model_config(tokenizer):
  from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig

  text = DecoderConfig(
    vocab_size=512, hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=8
  )
  vision = VisionConfig(image_size=28, patch_size=7, hidden_size=8, num_layers=1, num_heads=2)
  config = InternVLConfig(vision=vision, text=text, image_token_id=tokenizer.img_context_id)
  processor = Processor.for_model(tokenizer, config, system_message="S")
  assert processor.config == ProcessorConfig(28, 4, system_message="S")  # (28/7 * 0.5)^2 = 4
  with pytest.raises(ValueError, match="image_token_id 151667"):
    Processor.for_model(tokenizer, InternVLConfig(vision=vision, text=text))
