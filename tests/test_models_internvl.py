"""InternVL3 parity with transformers `InternVLForConditionalGeneration` (eager attention).

Every checkpoint is written by `save_pretrained` (the `-hf` layout) or rewritten from it into the
original `InternVLChatModel` layout, then loaded through `from_pretrained`. Compared: logits
(<= 1e-4 fp32), every decoder layer's head-averaged attention map (<= 1e-5), 20 greedy tokens.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from drivekd_jax.models import from_pretrained
from drivekd_jax.models.config import MapRequest
from drivekd_jax.models.internvl import (
  NO_MAPS,
  InternVL,
  embed_inputs_jit,
  generate,
  image_key_positions,
  pixel_shuffle,
)
from drivekd_jax.models.sampling import completions

IMAGE_TOKEN_ID = 120

# Two tiny configs: (1) 300M-style ViT (LayerNorm, qkv bias), untied head, GQA 3, qkv bias;
# (2) 6B-style ViT (RMSNorm, q/k norm, no qkv bias), tied head, GQA 2, features from layer -2.
CASES = {
  "vit300m_untied_gqa3": dict(
    vision=dict(norm_type="layer_norm", attention_bias=True, use_qk_norm=False),
    text=dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False),
    vision_feature_layer=-1,
  ),
  "vit6b_tied_gqa2": dict(
    vision=dict(norm_type="rms_norm", attention_bias=False, use_qk_norm=True),
    text=dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    vision_feature_layer=-2,
  ),
}


def hf_internvl(case: str, seed: int = 0) -> transformers.InternVLForConditionalGeneration:
  """A tiny random InternVL (56 px images -> 4 tokens each) with every weight randomised."""
  spec = CASES[case]
  tied = spec["text"]["tie_word_embeddings"]
  config = transformers.InternVLConfig(
    vision_config=dict(
      hidden_size=32,
      num_hidden_layers=3,
      num_attention_heads=4,
      intermediate_size=64,
      image_size=56,
      patch_size=14,
      layer_norm_eps=1e-6,
      **spec["vision"],
    ),
    text_config=dict(
      model_type="qwen2",
      vocab_size=128,
      hidden_size=48,
      num_hidden_layers=3,
      intermediate_size=96,
      rope_theta=1e6,
      max_position_embeddings=512,
      **spec["text"],
    ),
    image_token_id=IMAGE_TOKEN_ID,
    vision_feature_layer=spec["vision_feature_layer"],
    tie_word_embeddings=tied,
  )
  torch.manual_seed(seed)
  model = transformers.InternVLForConditionalGeneration(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("lm_head.weight") and tied:
        continue
      is_scale = any(k in name for k in ("norm", "lambda")) and name.endswith(
        ("weight", "_1", "_2")
      )
      p.copy_((1.0 if is_scale else 0.0) + 0.15 * torch.randn_like(p))
  model.config._attn_implementation = "eager"
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  return model.eval()


def _to_original_name(name: str) -> str:
  """One transformers InternVL tensor name -> the original `InternVLChatModel` name."""
  for hf, orig in (
    ("model.vision_tower.", "vision_model."),
    ("vision_tower.", "vision_model."),
    ("model.multi_modal_projector.", "mlp1."),
    ("multi_modal_projector.", "mlp1."),
    ("model.language_model.", "language_model.model."),
  ):
    if name.startswith(hf):
      name = orig + name[len(hf) :]
      break
  if name == "lm_head.weight":
    name = "language_model.lm_head.weight"
  for hf, orig in (
    (".encoder.layer.", ".encoder.layers."),
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("attention.projection_layer.", "attn.proj."),
    ("attention.q_norm.", "attn.q_norm."),
    ("attention.k_norm.", "attn.k_norm."),
    ("lambda_1", "ls1"),
    ("lambda_2", "ls2"),
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("mlp1.layer_norm.", "mlp1.0."),
    ("mlp1.linear_1.", "mlp1.1."),
    ("mlp1.linear_2.", "mlp1.3."),
  ):
    name = name.replace(hf, orig)
  return name


def write_original_layout(model, directory, *, shards: int = 1) -> None:
  """Writes `model` as an `OpenGVLab/InternVL3-*` (InternVLChatModel) checkpoint."""
  directory.mkdir(parents=True, exist_ok=True)
  hf_tensors = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  if model.config.tie_word_embeddings:
    hf_tensors.pop("lm_head.weight", None)
  tensors = {}
  fused: dict[str, dict[str, np.ndarray]] = {}
  for name, value in hf_tensors.items():
    name = _to_original_name(name)
    for part in ("q", "k", "v"):
      marker = f".attention.{part}_proj."
      if marker in name:
        fused.setdefault(name.replace(marker, ".attn.qkv."), {})[part] = value
        break
    else:
      tensors[name] = value
  for name, parts in fused.items():
    tensors[name] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
  vision, text = model.config.vision_config, model.config.text_config
  text_dict = text.to_dict()
  text_dict["architectures"] = ["Qwen2ForCausalLM"]
  config = {
    "architectures": ["InternVLChatModel"],
    "model_type": "internvl_chat",
    "template": "internvl2_5",
    "downsample_ratio": model.config.downsample_ratio,
    "select_layer": model.config.vision_feature_layer,
    "ps_version": "v2",
    "vision_config": {
      "architectures": ["InternVisionModel"],
      "model_type": "intern_vit_6b",
      "hidden_size": vision.hidden_size,
      "num_hidden_layers": vision.num_hidden_layers,
      "num_attention_heads": vision.num_attention_heads,
      "intermediate_size": vision.intermediate_size,
      "qkv_bias": vision.attention_bias,
      "qk_normalization": vision.use_qk_norm,
      "norm_type": vision.norm_type,
      "layer_norm_eps": vision.layer_norm_eps,
      "image_size": vision.image_size[0],
      "patch_size": vision.patch_size[0],
      "num_channels": 3,
      "hidden_act": "gelu",
      "drop_path_rate": 0.0,
    },
    "llm_config": text_dict,
  }
  (directory / "config.json").write_text(json.dumps(config))
  (directory / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": IMAGE_TOKEN_ID}))
  names = sorted(tensors)
  if shards == 1:
    safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
    return
  weight_map = {}
  for i in range(shards):
    filename = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
    chunk = {n: tensors[n] for n in names[i::shards]}
    safetensors.numpy.save_file(chunk, str(directory / filename))
    weight_map.update({n: filename for n in chunk})
  index = {"metadata": {}, "weight_map": weight_map}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def prompt(batch_rows: list[list[int]]) -> np.ndarray:
  """Rows of (text id | -k for k images of 4 tokens) -> int32 ids with image tokens expanded."""
  rows = []
  for row in batch_rows:
    ids = []
    for item in row:
      ids.extend([IMAGE_TOKEN_ID] * 4 * -item if item < 0 else [item])
    rows.append(ids)
  return np.asarray(rows, np.int32)


# Row 0: text, 1 image, text, 1 image, text; row 1: text, 2 images back to back, text.
IDS = prompt([[5, 9, -1, 17, 33, -1, 40, 41, 42, 43, 44], [7, -2, 8, 99, 3, 4, 5, 6, 1, 2]])
PIXELS = np.random.default_rng(0).standard_normal((4, 56, 56, 3)).astype(np.float32)


def hf_outputs(model, ids=IDS, pixels=PIXELS):
  with torch.no_grad():
    return model(
      input_ids=torch.tensor(ids, dtype=torch.long),
      pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
      output_attentions=True,
    )


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(case name, transformers model, -hf directory, original-layout directory)."""
  model = hf_internvl(request.param)
  root = tmp_path_factory.mktemp(request.param)
  model.save_pretrained(root / "hf")
  write_original_layout(model, root / "original", shards=2)
  return request.param, model, root / "hf", root / "original"


@functools.partial(jax.jit, static_argnums=(0, 4))
def _forward_jit(graphdef, state, ids, pixels, maps, cache):
  return nnx.merge(graphdef, state)(ids, pixels, maps=maps, cache=cache)


def forward(model: InternVL, ids, pixels, maps: MapRequest = NO_MAPS, cache=None):
  """The model's forward pass, compiled once per config and shape (faster than eager here)."""
  graphdef, state = nnx.split(model)
  return _forward_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(pixels), maps, cache)


def _check_parity(ours: InternVL, reference, hf_out) -> None:
  num_layers = ours.config.text.num_layers
  out = forward(ours, IDS, PIXELS, MapRequest(full_layers=tuple(range(num_layers))))
  logits_err = np.abs(np.asarray(out.logits) - hf_out.logits.numpy()).max()
  assert logits_err <= 1e-4, logits_err
  assert len(hf_out.attentions) == num_layers
  for layer in range(num_layers):
    want = hf_out.attentions[layer].mean(dim=1).numpy()
    map_err = np.abs(np.asarray(out.full_maps[layer]) - want).max()
    assert map_err <= 1e-5, (layer, map_err)
  # The maps are not trivially uniform, so the tolerance means something.
  assert np.asarray(out.full_maps[0]).max() > 0.3


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_logits_and_attention_maps_match_transformers(case, layout):
  name, reference, hf_dir, original_dir = case
  ours = from_pretrained(hf_dir if layout == "hf" else original_dir, dtype="float32")
  assert isinstance(ours, InternVL)
  assert ours.config.image_token_id == IMAGE_TOKEN_ID
  tied = CASES[name]["text"]["tie_word_embeddings"]
  assert (ours.language_model.lm_head is None) == tied
  assert ours.config.vision.qk_normalization == (CASES[name]["vision"]["use_qk_norm"])
  _check_parity(ours, reference, hf_outputs(reference))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["hf", "original"])
def test_greedy_generation_matches_transformers(case, layout):
  _, reference, hf_dir, original_dir = case
  ours = from_pretrained(hf_dir if layout == "hf" else original_dir, dtype="float32")
  with torch.no_grad():
    want = reference.generate(
      input_ids=torch.tensor(IDS, dtype=torch.long),
      pixel_values=torch.tensor(PIXELS).permute(0, 3, 1, 2),
      attention_mask=torch.ones(IDS.shape, dtype=torch.long),
      max_new_tokens=20,
      min_new_tokens=20,
      do_sample=False,
    )[:, IDS.shape[1] :].numpy()
  state = generate(ours, jnp.asarray(IDS), jnp.asarray(PIXELS), max_new_tokens=20)
  got = np.asarray(completions(state))
  assert got.shape == (2, 20)
  np.testing.assert_array_equal(got, want)


def test_per_row_slots_equal_global_order(case):
  """`[B, M, H, W, 3]` with a padding slot gives the same embeddings as the global layout."""
  _, _, hf_dir, _ = case
  model = from_pretrained(hf_dir)
  ids = prompt([[5, -1, 6, 7, 8, 9, 10, 11, 12], [7, -2, 8, 9, 10]])
  pixels = PIXELS[:3]
  slots = np.zeros((2, 2, 56, 56, 3), np.float32)
  slots[0, 0], slots[0, 1] = pixels[0], 1e3  # row 0's second slot is padding: must be ignored
  slots[1, 0], slots[1, 1] = pixels[1], pixels[2]
  global_order = embed_inputs_jit(model, jnp.asarray(ids), jnp.asarray(pixels))
  per_row = embed_inputs_jit(model, jnp.asarray(ids), jnp.asarray(slots))
  # (The ViT runs on batches of 3 vs 4 images, so reductions may differ in the last bits.)
  np.testing.assert_allclose(np.asarray(per_row), np.asarray(global_order), atol=2e-5, rtol=1e-5)
  # Image positions really carry image embeddings, text positions the token table.
  table = np.asarray(model.language_model.embed_tokens.embedding[...])
  emb = np.asarray(per_row)
  assert np.allclose(emb[0, 0], table[5]) and not np.allclose(emb[0, 1], table[IMAGE_TOKEN_ID])


def test_text_to_image_maps_are_the_image_columns(case):
  _, _, hf_dir, _ = case
  model = from_pretrained(hf_dir)
  maps = MapRequest(full_layers=(0, -1), text_to_image_layers=(0, -1))
  out = forward(model, IDS, PIXELS, maps)
  positions, valid = image_key_positions(jnp.asarray(IDS), 16, IMAGE_TOKEN_ID)
  last = model.config.text.num_layers - 1
  for layer in (0, last):
    assert out.text_to_image_maps[layer].shape == (2, IDS.shape[1], 16)
    want = np.take_along_axis(np.asarray(out.full_maps[layer]), np.asarray(positions)[:, None], -1)
    np.testing.assert_allclose(np.asarray(out.text_to_image_maps[layer]), want, atol=0)
  assert set(out.full_maps) == {0, last} and not out.hidden_states
  # Prefilled into a KV cache, the maps span cache slots and the image columns follow them.
  cached = forward(model, IDS, PIXELS, maps, cache=model.init_cache(2, IDS.shape[1] + 5))
  assert cached.full_maps[0].shape == (2, IDS.shape[1], IDS.shape[1] + 5)
  for layer in (0, last):
    np.testing.assert_allclose(
      np.asarray(cached.text_to_image_maps[layer]),
      np.asarray(out.text_to_image_maps[layer]),
      atol=1e-6,
    )
  # N = 4 images x 4 tokens columns (the global-order bound); each row holds 2 images.
  assert np.asarray(valid).sum(axis=1).tolist() == [8, 8]
  assert np.asarray(positions)[0, :8].tolist() == [2, 3, 4, 5, 8, 9, 10, 11]


def test_image_key_positions_from_mask_and_method():
  mask = np.zeros((2, 7), bool)
  mask[0, [1, 2, 5]] = True
  mask[1, [0, 6]] = True
  positions, valid = image_key_positions(jnp.asarray(mask), 4)
  assert np.asarray(positions).tolist() == [[1, 2, 5, 0], [0, 6, 0, 0]]
  assert np.asarray(valid).tolist() == [[True, True, True, False], [True, True, False, False]]
  with pytest.raises(ValueError, match="image_token_id"):
    image_key_positions(jnp.zeros((1, 3), jnp.int32), 2)


def test_pixel_shuffle_matches_reference_permutation():
  features = np.random.default_rng(1).standard_normal((2, 6, 4, 5)).astype(np.float32)
  reference = transformers.models.internvl.modeling_internvl.InternVLModel.pixel_shuffle
  want = reference(None, torch.tensor(features), scale_factor=0.5).numpy()
  got = np.asarray(pixel_shuffle(jnp.asarray(features), 0.5))
  assert got.shape == (2, 3, 2, 20)
  np.testing.assert_array_equal(got, want)


def test_vision_tower_resizes_position_embeddings_like_reference(case):
  """70 px images (5x5 patches instead of the checkpoint's 4x4): bicubic-resized positions."""
  _, reference, hf_dir, _ = case
  ours = from_pretrained(hf_dir)
  pixels = np.random.default_rng(2).standard_normal((2, 70, 70, 3)).astype(np.float32)
  with torch.no_grad():
    want = reference.model.vision_tower(
      pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)
    ).last_hidden_state.numpy()
  got = np.asarray(ours.vision_model(jnp.asarray(pixels)))
  assert got.shape == want.shape == (2, 26, 32)
  assert np.abs(got - want).max() <= 1e-4
  # The same resize done once at load time (InternViT's resize_pos_embeddings), at 84 px (a 6x6
  # grid, which the pixel shuffle can halve), checked through the whole image path.
  resized = from_pretrained(hf_dir, image_size=84)
  assert resized.config.vision.image_size == 84 and resized.config.tokens_per_image == 9
  assert resized.vision_model.embeddings.position_embedding.shape == (37, 32)
  pixels = np.random.default_rng(3).standard_normal((2, 84, 84, 3)).astype(np.float32)
  with torch.no_grad():
    want = reference.model.get_image_features(
      pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2)
    ).pooler_output.numpy()
  got = np.asarray(resized.embed_images(jnp.asarray(pixels)))
  assert got.shape == want.shape == (2, 9, 48)
  assert np.abs(got - want).max() <= 1e-4
  for bad in (63, 70):
    with pytest.raises(ValueError, match=f"image_size {bad} must be a multiple of the patch"):
      from_pretrained(hf_dir, image_size=bad)


def test_wrong_number_of_image_tokens_is_an_error(case):
  _, _, hf_dir, _ = case
  model = from_pretrained(hf_dir)
  with pytest.raises(ValueError, match="16 image-context tokens .* 3 images x 4 tokens = 12"):
    model(jnp.asarray(IDS), jnp.asarray(PIXELS[:3]))
  slots = jnp.zeros((2, 1, 56, 56, 3))
  with pytest.raises(ValueError, match="row 0 of input_ids holds 8 image-context tokens"):
    model.embed_inputs(jnp.asarray(IDS), slots)
