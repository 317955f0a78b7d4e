"""Qwen2.5-VL parity with transformers `Qwen2_5_VLForConditionalGeneration` (eager attention).

Tiny random models are written by `save_pretrained` (and rewritten with the older config.json and
the in-memory tensor names) and loaded through `from_pretrained`; our `save_pretrained` writes
them back. Three images of different grids, one spanning two
attention windows, and window and full-attention blocks. Tolerances (fp32): logits <= 1e-4, every
decoder layer's head-averaged attention map <= 1e-5, greedy tokens equal.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from drivekd_jax.data import qwen25_vl_processor as processor
from drivekd_jax.models import from_pretrained, presets, save_pretrained
from drivekd_jax.models.config import MapRequest
from drivekd_jax.models.hf_import import CheckpointError
from drivekd_jax.models.qwen2 import Decoder
from drivekd_jax.models.qwen25_vl import (
  NO_MAPS,
  Qwen25VL,
  check_same_image_tokens,
  generate,
  mrope_positions,
  patchify,
  vision_masks,
)
from drivekd_jax.models.sampling import completions

IMAGE_TOKEN_ID = 120
PATCH_DIM = 3 * 2 * 14 * 14

# (1) untied head, GQA 2, full attention in the middle vision block, 56 px windows (2x2 merged
# tokens); (2) tied head, GQA 3, full attention in the first and last blocks, 84 px windows.
CASES = {
  "untied_window56": dict(
    vision=dict(window_size=56, fullatt_block_indexes=[1]),
    text=dict(num_attention_heads=4, num_key_value_heads=2, mrope=[2, 2, 2]),
    tied=False,
  ),
  "tied_window84": dict(
    vision=dict(window_size=84, fullatt_block_indexes=[0, 2]),
    text=dict(num_attention_heads=6, num_key_value_heads=2, mrope=[1, 1, 2]),
    tied=True,
  ),
}


def hf_qwen25_vl(case: str, seed: int = 0) -> transformers.Qwen2_5_VLForConditionalGeneration:
  spec = CASES[case]
  text = dict(spec["text"])
  mrope = text.pop("mrope")
  config = transformers.Qwen2_5_VLConfig(
    vision_config=dict(
      depth=3,
      hidden_size=32,
      intermediate_size=48,
      num_heads=4,
      patch_size=14,
      spatial_merge_size=2,
      temporal_patch_size=2,
      out_hidden_size=48,
      **spec["vision"],
    ),
    text_config=dict(
      vocab_size=128,
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=3,
      rope_parameters=dict(rope_type="default", mrope_section=mrope, rope_theta=1e6),
      max_position_embeddings=512,
      rms_norm_eps=1e-6,
      bos_token_id=None,
      eos_token_id=None,
      **text,
    ),
    image_token_id=IMAGE_TOKEN_ID,
    tie_word_embeddings=spec["tied"],
  )
  torch.manual_seed(seed)
  model = transformers.Qwen2_5_VLForConditionalGeneration(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "lm_head.weight" and spec["tied"]:
        continue
      is_scale = ("norm" in name or "ln_q" in name) and name.endswith("weight")
      p.copy_((1.0 if is_scale else 0.0) + 0.15 * torch.randn_like(p))
  model.config._attn_implementation = "eager"
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model.eval()


def write_legacy_layout(model, directory) -> None:
  """The hub's older `config.json` (text fields at the top, `rope_scaling` of type "mrope",
  `in_chans`) with the in-memory tensor names (`model.visual.*`, `model.language_model.*`): the
  naming and config variants that `save_pretrained` (hub names, `text_config`) does not cover."""
  directory.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name, value in model.state_dict().items():
    if name == "lm_head.weight" and model.config.tie_word_embeddings:
      continue
    tensors[name] = value.detach().numpy().copy()
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  text = model.config.text_config.to_dict()
  rope = text.pop("rope_parameters")
  vision = model.config.vision_config.to_dict()
  vision["in_chans"] = vision.pop("in_channels")
  vision.pop("rope_parameters")
  config = dict(
    text,
    architectures=["Qwen2_5_VLForConditionalGeneration"],
    model_type="qwen2_5_vl",
    rope_theta=rope["rope_theta"],
    rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
    vision_config=vision,
    image_token_id=IMAGE_TOKEN_ID,
    tie_word_embeddings=model.config.tie_word_embeddings,
  )
  (directory / "config.json").write_text(__import__("json").dumps(config))


# Three images: 4x6 patches (2x3 tokens: two 56 px windows side by side), 8x4 (4x2) and 4x4.
GRIDS = np.array([[1, 4, 6], [1, 8, 4], [1, 4, 4]])
PIXELS = np.random.default_rng(0).standard_normal((int(GRIDS.prod(1).sum()), PATCH_DIM))
PIXELS = PIXELS.astype(np.float32)


def prompt(rows: list[list[int]]) -> np.ndarray:
  """Rows of (text id | -n for an image of n tokens) -> int32 ids."""
  out = []
  for row in rows:
    ids = []
    for item in row:
      ids.extend([IMAGE_TOKEN_ID] * -item if item < 0 else [item])
    out.append(ids)
  return np.asarray(out, np.int32)


# Row 0: text, image 0 (6 tokens), text, image 1 (8 tokens), text; row 1: image 2 (4), text.
IDS = prompt([[5, 9, -6, 17, 33, -8, 40, 41], [7, -4] + list(range(60, 75))])


def hf_inputs(ids=IDS, pixels=PIXELS, grids=GRIDS, mask=None):
  inputs = dict(
    input_ids=torch.tensor(ids, dtype=torch.long),
    pixel_values=torch.tensor(pixels),
    image_grid_thw=torch.tensor(grids),
    mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN_ID).astype(np.int32)),
  )
  if mask is not None:
    inputs["attention_mask"] = torch.tensor(mask, dtype=torch.long)
  return inputs


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(case name, transformers model, save_pretrained directory, legacy-layout directory)."""
  model = hf_qwen25_vl(request.param)
  root = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(root / "hf")
  write_legacy_layout(model, root / "legacy")
  return request.param, model, root / "hf", root / "legacy"


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
  """One saved model for the checks of our own code paths (no reference needed)."""
  directory = tmp_path_factory.mktemp("untied")
  hf_qwen25_vl("untied_window56").save_pretrained(directory)
  return directory


@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _forward_jit(graphdef, state, ids, pixels, grids, maps):
  return nnx.merge(graphdef, state)(ids, pixels, grids, maps=maps)


def forward(model: Qwen25VL, ids, pixels, grids, maps: MapRequest = NO_MAPS):
  graphdef, state = nnx.split(model)
  grids = None if grids is None else tuple(map(tuple, np.asarray(grids).tolist()))
  return _forward_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(pixels), grids, maps)


@pytest.mark.parametrize("layout", ["hf", "legacy"])
def test_logits_and_attention_maps_match_transformers(case, layout):
  name, reference, hf_dir, legacy_dir = case
  ours = from_pretrained(hf_dir if layout == "hf" else legacy_dir)
  assert isinstance(ours, Qwen25VL)
  assert (ours.language_model.lm_head is None) == CASES[name]["tied"]
  assert ours.config.vision.fullatt_block_indexes == tuple(
    CASES[name]["vision"]["fullatt_block_indexes"]
  )
  with torch.no_grad():
    want = reference(**hf_inputs(), output_attentions=True)
  layers = ours.config.text.num_layers
  out = forward(ours, IDS, PIXELS, GRIDS, MapRequest(full_layers=tuple(range(layers))))
  logits_err = np.abs(np.asarray(out.logits) - want.logits.numpy()).max()
  assert logits_err <= 1e-4, logits_err
  assert len(want.attentions) == layers
  for layer in range(layers):
    map_err = np.abs(np.asarray(out.full_maps[layer]) - want.attentions[layer].mean(1).numpy())
    assert map_err.max() <= 1e-5, (layer, map_err.max())
  assert np.asarray(out.full_maps[0]).max() > 0.3  # the maps are not near-uniform


def test_export_loads_in_transformers_with_equal_logits(case, tmp_path):
  """`save_pretrained` writes transformers' own tensor names and a config it builds the same
  model from; the weights round-trip bit for bit, so the logits are the reference's."""
  name, reference, hf_dir, _ = case
  save_pretrained(from_pretrained(hf_dir), tmp_path)
  theirs = safetensors.numpy.load_file(str(hf_dir / "model.safetensors"))
  exported = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
  assert sorted(exported) == sorted(theirs)
  for key, value in theirs.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  loaded = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
    tmp_path, attn_implementation="eager"
  ).eval()
  assert loaded.config.tie_word_embeddings == CASES[name]["tied"]
  with torch.no_grad():
    got, want = loaded(**hf_inputs()).logits.numpy(), reference(**hf_inputs()).logits.numpy()
  np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


def test_vision_tower_matches_transformers(case):
  """The merged image features, in the reference's order, for every image."""
  _, reference, hf_dir, _ = case
  ours = from_pretrained(hf_dir)
  with torch.no_grad():
    want = reference.model.visual(torch.tensor(PIXELS), grid_thw=torch.tensor(GRIDS))
  got = np.asarray(jax.jit(ours.embed_images, static_argnums=1)(PIXELS, tuple(map(tuple, GRIDS))))
  assert got.shape == (18, 48)
  assert np.abs(got - want.pooler_output.numpy()).max() <= 1e-4


def test_rope_positions_match_get_rope_index(case):
  """M-RoPE positions with padding on both sides, against the reference's `get_rope_index`."""
  _, reference, hf_dir, _ = case
  ours = from_pretrained(hf_dir)
  ids = prompt([[0, 0, 5, -6, 9, -8, 4, 4, 4], [7, -4] + [3] * 7 + [0] * 9])
  mask = np.ones(ids.shape, bool)
  mask[0, :2] = False
  mask[1, -9:] = False
  want, deltas = reference.model.get_rope_index(
    torch.tensor(ids, dtype=torch.long),
    mm_token_type_ids=torch.tensor((ids == IMAGE_TOKEN_ID).astype(np.int32)),
    image_grid_thw=torch.tensor(GRIDS),
    attention_mask=torch.tensor(mask),
  )
  got = np.asarray(ours.rope_positions(jnp.asarray(ids), PIXELS, GRIDS, jnp.asarray(mask)))
  assert got.shape == (2, 3, ids.shape[1])  # batch first (the reference's are [3, B, L])
  np.testing.assert_array_equal(got.transpose(1, 0, 2)[:, mask], want.numpy()[:, mask])
  # The next text position (the cache's next_position) continues past the largest position.
  next_position = np.where(mask, got.max(axis=1), -1).max(axis=1) + 1
  np.testing.assert_array_equal(next_position, mask.sum(axis=1) + deltas.numpy()[:, 0])


def test_cache_continues_after_the_largest_position():
  """A prompt ending in an image: the next text position follows the image's largest (height /
  width) position, not its temporal one."""
  image_mask = jnp.asarray([[False, False, True, True, True, True]])  # a 2x2-token image last
  positions = mrope_positions(image_mask, jnp.ones((1, 6), bool), [(1, 4, 4)], merge=2)
  assert np.asarray(positions)[0].T[-4:].tolist() == [[2, 2, 2], [2, 2, 3], [2, 3, 2], [2, 3, 3]]
  graphdef, state = nnx.split(Decoder(presets.qwen25_vl("tiny").text, rngs=nnx.Rngs(0)))

  @jax.jit
  def next_position(state, positions):
    decoder = nnx.merge(graphdef, state)
    cache = decoder.init_cache(1, 8)
    return decoder(
      jnp.ones((1, 6), jnp.int32), positions=positions, cache=cache
    ).cache.next_position

  assert np.asarray(next_position(state, positions)).tolist() == [4]


@pytest.mark.slow
@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generation_matches_transformers(case, padded):
  _, reference, hf_dir, _ = case
  ours = from_pretrained(hf_dir)
  ids, mask = IDS, np.ones(IDS.shape, bool)
  if padded:  # row 1 left-padded by 3
    ids = np.concatenate([np.zeros((2, 3), np.int32), IDS], axis=1)
    ids[0] = np.concatenate([IDS[0], np.full(3, 11, np.int32)])
    mask = np.ones(ids.shape, bool)
    mask[1, :3] = False
  with torch.no_grad():
    want = reference.generate(
      **hf_inputs(ids, mask=mask), max_new_tokens=12, min_new_tokens=12, do_sample=False
    )[:, ids.shape[1] :].numpy()
  state = generate(ours, ids, PIXELS, GRIDS, attention_mask=mask, max_new_tokens=12)
  got = np.asarray(completions(state))
  assert got.shape == (2, 12)
  np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_image_layouts_give_the_same_model_inputs(untied_dir):
  """Flattened processor patches, `[N, H, W, C]` images and `[B, M, H, W, C]` slots agree."""
  ours = from_pretrained(untied_dir)
  images = np.random.default_rng(3).standard_normal((3, 56, 84, 3)).astype(np.float32)
  flat = patchify(images, 14, 2, 2).reshape(-1, PATCH_DIM)
  grids = np.array([[1, 4, 6]] * 3)
  ids = prompt([[5, -6, 6, -6, 7], [5, 8, -6] + [9] * 7])
  by_patches = ours.embed_inputs(jnp.asarray(ids), jnp.asarray(flat), grids)
  by_images = ours.embed_inputs(jnp.asarray(ids), jnp.asarray(images))
  slots = np.zeros((2, 2, 56, 84, 3), np.float32)
  slots[0], slots[1, 0], slots[1, 1] = images[:2], images[2], 1e3  # the last slot is padding
  by_slots = ours.embed_inputs(jnp.asarray(ids), jnp.asarray(slots))
  np.testing.assert_allclose(np.asarray(by_images), np.asarray(by_patches), atol=1e-6)
  np.testing.assert_allclose(np.asarray(by_slots), np.asarray(by_patches), atol=1e-5)
  positions = ours.rope_positions(jnp.asarray(ids), jnp.asarray(flat), grids)
  per_row = ours.rope_positions(jnp.asarray(ids), jnp.asarray(slots))
  np.testing.assert_array_equal(np.asarray(per_row), np.asarray(positions))


def test_text_to_image_maps_are_the_image_columns(untied_dir):
  ours = from_pretrained(untied_dir)
  maps = MapRequest(full_layers=(0, -2), text_to_image_layers=(0, -2))
  out = forward(ours, IDS, PIXELS, GRIDS, maps)
  keys = np.asarray(ours.map_key_positions(jnp.asarray(IDS), PIXELS, image_grid_thw=GRIDS))
  assert keys.shape == (2, 18)  # N = every image's tokens, the global-order bound
  assert keys[0, :14].tolist() == list(range(2, 8)) + list(range(10, 18))
  for layer in (0, 1):
    t2i = np.asarray(out.text_to_image_maps[layer])
    assert t2i.shape == (2, IDS.shape[1], 18)
    np.testing.assert_array_equal(t2i, np.take_along_axis(out.full_maps[layer], keys[:, None], -1))


def test_bad_inputs_are_errors(untied_dir, tmp_path):
  ours = from_pretrained(untied_dir)
  with pytest.raises(ValueError, match="hold 18 image tokens .* give 14"):
    ours(jnp.asarray(IDS), PIXELS[:56], GRIDS[:2])
  with pytest.raises(ValueError, match="need image_grid_thw"):
    ours(jnp.asarray(IDS), PIXELS)
  with pytest.raises(ValueError, match="covers 56 patches but pixel_values has 72"):
    ours(jnp.asarray(IDS), PIXELS, GRIDS[:2])
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "config.json").write_text((untied_dir / "config.json").read_text())
  tensors = safetensors.numpy.load_file(str(untied_dir / "model.safetensors"))
  (name,) = [n for n in tensors if n.endswith("visual.blocks.1.attn.qkv.bias")]
  del tensors[name]
  safetensors.numpy.save_file(tensors, str(broken / "model.safetensors"))
  with pytest.raises(CheckpointError, match=f"missing tensor '{name}'"):
    from_pretrained(broken)


def test_window_masks_split_images_into_windows():
  """A 4x6-patch image (2x3 merged tokens) with 2x2-token windows: two windows, 16 + 8 patches."""
  config = presets.qwen25_vl("tiny").vision
  full, windowed = vision_masks((1, 4, 6), config)
  assert full.all()
  assert sorted(np.unique(windowed.sum(axis=1)).tolist()) == [8, 16]
  # Patches 0-3 are merged token (0, 0), 8-11 token (0, 2): different windows.
  assert windowed[0, 7] and not windowed[0, 8]


def test_processor_matches_transformers():
  rng = np.random.default_rng(4)
  images = [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in [(50, 90), (120, 61), (30, 30)]]
  settings = processor.ImageSettings(max_pixels=28 * 28 * 12)
  pixels, grids = processor.preprocess(images, settings)
  reference = transformers.models.qwen2_vl.image_processing_pil_qwen2_vl.Qwen2VLImageProcessorPil(
    max_pixels=28 * 28 * 12
  )
  want = reference([PIL.Image.fromarray(i) for i in images], return_tensors="np")
  np.testing.assert_array_equal(grids, want["image_grid_thw"])
  assert pixels.shape == want["pixel_values"].shape
  np.testing.assert_allclose(pixels, want["pixel_values"], atol=1e-5)
  assert processor.image_token_counts(grids) == [int(g.prod()) // 4 for g in grids]
  assert processor.smart_resize(1000, 1000, max_pixels=28 * 28 * 12) == (84, 84)
  assert processor.smart_resize(10, 20) == (56, 84)  # raised to min_pixels
  with pytest.raises(ValueError, match="aspect ratio"):
    processor.smart_resize(2, 500)
  fixed = processor.ImageSettings(fixed_size=(56, 84))
  _, grids = processor.preprocess(images, fixed)
  assert grids.tolist() == [[1, 4, 6]] * 3
  with pytest.raises(ValueError, match="not a multiple of 28"):
    processor.ImageSettings(fixed_size=(50, 56))
  block = processor.image_block(2)
  assert block == "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>"


# Parameter counts of the released checkpoints (the Hub's safetensors metadata).
RELEASED = {"3B": 3_754_622_976, "7B": 8_292_166_656, "32B": 33_452_718_336, "72B": 73_410_777_344}


@functools.cache
def count_parameters(config) -> int:
  abstract = nnx.eval_shape(lambda: Qwen25VL(config, rngs=nnx.Rngs(0)))
  leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
  return sum(int(np.prod(leaf.shape)) for leaf in leaves)


def count_by_depth(config) -> int:
  """The exact count from one- and two-block copies of each tower (repeated blocks)."""

  def shallow(depth: int, layers: int) -> int:
    vision = dataclasses.replace(config.vision, depth=depth, fullatt_block_indexes=())
    text = dataclasses.replace(config.text, num_layers=layers)
    return count_parameters(dataclasses.replace(config, vision=vision, text=text))

  base = shallow(1, 1)
  return (
    base
    + (config.vision.depth - 1) * (shallow(2, 1) - base)
    + (config.text.num_layers - 1) * (shallow(1, 2) - base)
  )


def test_count_by_depth_equals_the_full_count():
  config = presets.qwen25_vl("tiny")
  assert count_by_depth(config) == count_parameters(config)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_have_the_released_parameter_counts(name):
  assert count_by_depth(presets.qwen25_vl(name)) == RELEASED[name]


def test_teacher_and_student_must_cut_images_alike():
  student = presets.qwen25_vl("3B")
  check_same_image_tokens(student, presets.qwen25_vl("72B"))
  other = dataclasses.replace(student, vision=dataclasses.replace(student.vision, patch_size=16))
  with pytest.raises(ValueError, match="image token counts differ"):
    check_same_image_tokens(student, other)


@pytest.mark.slow
def test_drive_kd_step_trains_a_qwen_student_from_a_qwen_teacher():
  """The unchanged Drive-KD step (three attention signals, AGP) with Qwen2.5-VL models: the
  batch carries `[B, M, H, W, 3]` image slots and M-RoPE positions `[B, 3, L]` (batch first, so
  the step's micro-batch slicing keeps them aligned); every loss goes down."""
  from drivekd_jax.distill.signals import DistillConfig
  from drivekd_jax.train import step as step_lib
  from drivekd_jax.train.experiment import assemble_distillation

  image_id = presets.TINY_IMAGE_TOKEN_ID
  student = Qwen25VL(presets.qwen25_vl("tiny"), rngs=nnx.Rngs(0))
  teacher_config = presets.qwen25_vl(
    "tiny", num_layers=3, hidden_size=96, num_heads=6, intermediate_size=192
  )
  teacher = Qwen25VL(teacher_config, rngs=nnx.Rngs(1))
  check_same_image_tokens(student.config, teacher.config)
  rng = np.random.default_rng(0)
  ids = rng.integers(1, 400, size=(3, 18)).astype(np.int32)
  ids[:, 2:6] = image_id  # one 56 px image: 4x4 patches, 2x2 tokens
  labels = np.full(ids.shape, -100, np.int32)
  labels[:, 10:] = ids[:, 10:]
  attn = np.ones(ids.shape, bool)
  attn[1, -3:], labels[1, -3:], ids[1, -3:] = False, -100, 0
  pixels = rng.normal(size=(3, 1, 56, 56, 3)).astype(np.float32)
  positions = student.rope_positions(jnp.asarray(ids), jnp.asarray(pixels), attention_mask=attn)
  assert np.asarray(positions)[0, :, 2:6].tolist() == [[2, 2, 2, 2], [2, 2, 3, 3], [2, 3, 2, 3]]
  batch = {
    "input_ids": ids,
    "labels": labels,
    "attention_mask": attn,
    "image_mask": ids == image_id,
    "positions": np.asarray(positions),
    "pixel_values": pixels,
    "capability": np.arange(3, dtype=np.int32),
    "example_mask": np.ones(3, bool),
  }
  config = DistillConfig(
    microbatch_size=1, grad_accum_steps=1, weights=(1e4, 1e4, 1e4), dynamic_weights=False
  )
  tx = step_lib.make_optimizer(config, 2e-3)
  distillation = assemble_distillation(config, student, [teacher], tx, jax.random.key(0))
  step = jax.jit(distillation.step_fn, donate_argnums=0)
  state, history = distillation.state, []
  for i in range(30):
    state, metrics = step(state, batch, jax.random.key(i), distillation.teacher_states)
    history.append({k: float(v) for k, v in metrics.items()})
  for name in ("sup", "perception", "reasoning", "planning"):
    first, last = history[0][f"loss/{name}"], history[-1][f"loss/{name}"]
    assert last < 0.8 * first, (name, first, last)


@pytest.mark.parametrize("arg", ["multi", "planning-72B", "tiny"])
def test_paper_config_names_qwen_presets_that_share_image_tokens(arg):
  import importlib.util
  from pathlib import Path

  from drivekd_jax.train.settings import RunSettings

  path = Path(__file__).parents[1] / "configs" / "drivekd" / "paper_qwen25vl.py"
  spec = importlib.util.spec_from_file_location("paper_qwen25vl", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  settings = RunSettings.from_config(module.get_config(arg))
  entries = [settings.student] + [settings.teachers[n] for n in settings.teacher_order]
  student, teacher = (presets.model_config(e.preset, **e.text_overrides) for e in entries)
  check_same_image_tokens(student, teacher)
  assert student.text.num_layers == {"tiny": 2}.get(arg, 36)
  assert teacher.text.num_layers == {"tiny": 3, "planning-72B": 80}.get(arg, 28)
  with pytest.raises(ValueError, match="teacher size"):
    module.get_config("multi-14B")


def test_model_config_dispatches_on_the_family_prefix():
  assert presets.model_config("qwen2.5-vl-7B") == presets.qwen25_vl("7B")
  assert presets.model_config("1B") == presets.internvl3("1B")
  with pytest.raises(ValueError, match="unknown Qwen2.5-VL preset '9B'"):
    presets.model_config("qwen2.5-vl-9B")
