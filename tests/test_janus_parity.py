"""Janus parity with transformers `JanusForConditionalGeneration` (fp32, eager attention).

Each tiny random model (two shapes, `janus_fixtures.CASES`) is written by `save_pretrained` and
read back by `imug_jax.models.janus.from_pretrained`. Tolerances (fp32): logits and generation
head logits <= 1e-4 absolute (observed ~3e-6 on logits of magnitude ~4), decoded pixels <= 1e-4
(observed ~1.4e-5 on values up to ~7); VQ codes, CFG image tokens and greedy text tokens equal.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from janus_fixtures import BOI_ID, BOS_ID, CASES, IMAGE_TOKEN_ID, PAD_ID, hf_janus

from drivekd_jax.models.hf_import import CheckpointError
from imug_jax.models.janus import PRESETS, Janus, from_pretrained
from imug_jax.models.janus.generate import generate_image_tokens, generate_text

LOGIT_TOL = 1e-4
PIXEL_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
  """(transformers model, our model loaded from its save_pretrained directory)."""
  reference = hf_janus(request.param)
  directory = tmp_path_factory.mktemp(request.param)
  reference.save_pretrained(directory)
  reference.generation_config.bos_token_id = BOS_ID
  reference.generation_config.generation_kwargs = {"boi_token_id": BOI_ID}
  return reference, from_pretrained(directory)


def _nchw(pixels: np.ndarray) -> torch.Tensor:
  return torch.tensor(pixels).permute(0, 3, 1, 2)


def _understanding_inputs(seed: int):
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, 99, size=(2, 24))
  ids[0, 3:19] = IMAGE_TOKEN_ID
  ids[1, 5:21] = IMAGE_TOKEN_ID
  pixels = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  return ids, pixels


def test_understanding_logits(pair):
  reference, ours = pair
  ids, pixels = _understanding_inputs(0)
  with torch.no_grad():
    want = reference(input_ids=torch.tensor(ids), pixel_values=_nchw(pixels)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids, jnp.int32), jnp.asarray(pixels)).logits)
  np.testing.assert_allclose(got, want, atol=LOGIT_TOL, rtol=0)


def test_vq_round_trip(pair):
  reference, ours = pair
  pixels = np.random.default_rng(1).uniform(-1, 1, size=(3, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    encoded = reference.model.vqmodel.encode(_nchw(pixels)).image_tokens.numpy().reshape(3, -1)
    decoded = reference.decode_image_tokens(torch.tensor(encoded)).numpy()
  codes = np.asarray(ours.vqmodel.encode(jnp.asarray(pixels)))
  assert len(set(codes.ravel().tolist())) > 4  # a real test of the nearest-code search
  np.testing.assert_array_equal(codes, encoded)
  np.testing.assert_allclose(
    np.asarray(ours.vqmodel.decode(jnp.asarray(codes))), decoded, atol=PIXEL_TOL, rtol=0
  )


def test_generation_embeddings_and_head(pair):
  reference, ours = pair
  rng = np.random.default_rng(2)
  hidden = rng.normal(size=(2, 5, 48)).astype(np.float32)
  codes = rng.integers(0, 64, size=(2, 5))
  with torch.no_grad():
    want_logits = reference.model.generation_head(torch.tensor(hidden)).numpy()
    want_embeds = reference.prepare_embeddings_for_image_generation(torch.tensor(codes)).numpy()
  got_logits = np.asarray(ours.generation_head(jnp.asarray(hidden)))
  np.testing.assert_allclose(got_logits, want_logits, atol=LOGIT_TOL, rtol=0)
  got_embeds = np.asarray(ours.image_token_embeds(jnp.asarray(codes)))
  np.testing.assert_allclose(got_embeds, want_embeds, atol=1e-5, rtol=0)


def test_cfg_image_generation_greedy(pair):
  reference, ours = pair
  rng = np.random.default_rng(3)
  ids = rng.integers(3, 99, size=(2, 10))
  ids[:, 0], ids[:, -1] = BOS_ID, BOI_ID
  want = reference.generate(
    torch.tensor(ids),
    attention_mask=torch.ones(ids.shape, dtype=torch.long),
    generation_mode="image",
    do_sample=False,
    guidance_scale=3.0,
  ).numpy()
  got = generate_image_tokens(ours, ids, bos_id=BOS_ID, boi_id=BOI_ID, pad_id=PAD_ID, guidance=3.0)
  assert got.shape == (2, 16)
  np.testing.assert_array_equal(got, want)


def test_text_generation_greedy(pair):
  reference, ours = pair
  ids, pixels = _understanding_inputs(4)
  want = reference.generate(
    torch.tensor(ids), pixel_values=_nchw(pixels), max_new_tokens=12, do_sample=False
  ).numpy()[:, ids.shape[1] :]
  got = np.asarray(generate_text(ours, ids, pixels, max_new_tokens=12).tokens)
  np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("janus_saved")
  hf_janus("untied_gqa").save_pretrained(directory)
  config = json.loads((directory / "config.json").read_text())
  tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  return config, tensors


def _write(directory, config, tensors):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  return directory


def test_sharded_checkpoint_loads_the_same(saved, tmp_path):
  config, tensors = saved
  (tmp_path / "config.json").write_text(json.dumps(config))
  names = sorted(tensors)
  weight_map = {}
  for i in range(3):
    filename = f"model-{i + 1:05d}-of-00003.safetensors"
    chunk = {n: tensors[n] for n in names[i::3]}
    safetensors.numpy.save_file(chunk, str(tmp_path / filename))
    weight_map.update(dict.fromkeys(chunk, filename))
  (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
  model = from_pretrained(tmp_path)
  np.testing.assert_array_equal(
    np.asarray(model.vqmodel.quantize.embedding.embedding[...]),
    tensors["model.vqmodel.quantize.embedding.weight"],
  )


@pytest.mark.parametrize(
  "edit, message",
  [
    (
      lambda c, t: t.pop("model.vqmodel.decoder.conv_out.bias"),
      "model.vqmodel.decoder.conv_out.bias",
    ),
    (
      lambda c, t: t.update({"model.generation_head.vision_head.weight": np.zeros((63, 48), "f4")}),
      "'model.generation_head.vision_head.weight' has shape [63, 48], expected [64, 48]",
    ),
    (lambda c, t: t.update({"model.extra.weight": np.zeros(2, "f4")}), "'model.extra.weight'"),
    (lambda c, t: c["vision_config"].update(use_qk_norm=True), "use_qk_norm"),
    (lambda c, t: c["vq_config"].update(base_channels=40), "multiples of 32"),
    (lambda c, t: c.update(architectures=["LlavaForConditionalGeneration"]), "is not Janus"),
    (lambda c, t: c.pop("vq_config"), "'vq_config'"),
  ],
  ids=["missing", "shape", "unexpected", "qk_norm", "groupnorm", "architecture", "no_vq"],
)
def test_bad_checkpoints_name_the_problem(saved, tmp_path, edit, message):
  config, tensors = json.loads(json.dumps(saved[0])), dict(saved[1])
  edit(config, tensors)
  with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
    from_pretrained(_write(tmp_path / "ckpt", config, tensors))


# -------------------------------------------------------------------------------- presets


def _param_count(config) -> int:
  abstract = nnx.eval_shape(lambda: Janus(config, rngs=nnx.Rngs(0)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def _torch_param_count(config) -> int:
  """transformers' count for the same shapes, built on the meta device (no memory)."""
  text, vision, vq = config.text, config.vision, config.vq
  hf = transformers.JanusConfig(
    vision_config=dict(
      hidden_size=vision.encoder.hidden_size,
      num_hidden_layers=vision.encoder.num_layers,
      num_attention_heads=vision.encoder.num_heads,
      image_size=vision.encoder.image_size,
      patch_size=vision.encoder.patch_size,
      mlp_ratio=vision.encoder.intermediate_size / vision.encoder.hidden_size,
      projection_dim=vision.projection_dim,
      depth=vision.depth,
    ),
    vq_config=dict(
      projection_dim=vq.projection_dim, image_token_embed_dim=vq.image_token_embed_dim
    ),
    text_config=dict(
      model_type="llama",
      vocab_size=text.vocab_size,
      hidden_size=text.hidden_size,
      num_hidden_layers=text.num_layers,
      num_attention_heads=text.num_heads,
      num_key_value_heads=text.num_kv_heads,
      intermediate_size=text.intermediate_size,
    ),
    tie_word_embeddings=False,
  )
  with torch.device("meta"):
    model = transformers.JanusForConditionalGeneration(hf)
  return sum(p.numel() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize(
  "name, expected", [("janus-pro-1b", 2_076_636_811), ("janus-pro-7b", 7_407_773_323)]
)
def test_preset_parameter_counts(name, expected):
  count = _param_count(PRESETS[name])
  assert count == _torch_param_count(PRESETS[name])
  assert count == expected
