"""`save_pretrained`: our models written in the HuggingFace layout, read by transformers.

A tiny random InternVL of ours (every parameter randomised) is exported; transformers'
`InternVLForConditionalGeneration.from_pretrained` must give the same logits (<= 1e-4 fp32), and
our own `from_pretrained` must give back every parameter bit for bit.
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

from drivekd_jax.models import export, from_pretrained, save_pretrained
from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.models.qwen2 import Decoder

pytestmark = pytest.mark.usefixtures("fast_compiles")

IMAGE_TOKEN_ID = 120

CASES = {
  # 300M-style ViT, untied head, GQA 3, Qwen2 (qkv bias).
  "layer_norm_untied": dict(
    vision=dict(norm_type="layer_norm", qkv_bias=True, qk_normalization=False),
    text=dict(num_heads=6, num_kv_heads=2, tie_word_embeddings=False),
    select_layer=-1,
  ),
  # 6B-style ViT (RMSNorm, q/k norm), tied head, features from layer -2.
  "rms_norm_tied": dict(
    vision=dict(norm_type="rms_norm", qkv_bias=False, qk_normalization=True),
    text=dict(num_heads=4, num_kv_heads=2, tie_word_embeddings=True),
    select_layer=-2,
  ),
}


def random_internvl(case: str, seed: int = 0) -> InternVL:
  """A tiny InternVL (56 px images -> 4 tokens) with every parameter drawn at random."""
  spec = CASES[case]
  config = InternVLConfig(
    vision=VisionConfig(
      image_size=56,
      patch_size=14,
      hidden_size=32,
      num_layers=3,
      num_heads=4,
      intermediate_size=64,
      **spec["vision"],
    ),
    text=DecoderConfig(
      vocab_size=128,
      hidden_size=48,
      num_layers=3,
      intermediate_size=96,
      rope_theta=1e6,
      max_position_embeddings=512,
      **spec["text"],
    ),
    image_token_id=IMAGE_TOKEN_ID,
    vision_select_layer=spec["select_layer"],
  )
  model = InternVL(config, rngs=nnx.Rngs(seed))
  randomise(model, seed)
  return model


def randomise(model, seed: int) -> None:
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [x + 0.15 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))


def _ids() -> np.ndarray:
  """Two rows: text, image, text, image, text / text, two images, text (4 tokens per image)."""
  rows = [[5, 9, -1, 17, 33, -1, 40, 41, 42], [7, -2, 8, 99, 3, 4, 5, 6]]
  out = []
  for row in rows:
    ids = []
    for item in row:
      ids.extend([IMAGE_TOKEN_ID] * 4 * -item if item < 0 else [item])
    out.append(ids)
  return np.asarray(out, np.int32)


IDS = _ids()
PIXELS = np.random.default_rng(0).standard_normal((4, 56, 56, 3)).astype(np.float32)


def _params(model) -> dict:
  return {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_transformers_loads_the_export_with_equal_logits(case, tmp_path):
  ours = random_internvl(case)
  tokenizer_src = tmp_path / "source"
  tokenizer_src.mkdir()
  (tokenizer_src / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}))
  (tokenizer_src / "added_tokens.json").write_text(json.dumps({"<IMG_CONTEXT>": IMAGE_TOKEN_ID}))
  (tokenizer_src / "model.safetensors").write_bytes(b"not copied")
  out = tmp_path / "export"
  written = save_pretrained(ours, out, tokenizer_dir=tokenizer_src)
  assert set(written) == {
    "model.safetensors",
    "config.json",
    "tokenizer_config.json",
    "added_tokens.json",
  }
  assert sorted(p.name for p in out.iterdir()) == sorted(written)
  names = set(safetensors.numpy.load_file(str(out / "model.safetensors")))
  assert ("lm_head.weight" in names) != CASES[case]["text"]["tie_word_embeddings"]

  reference = transformers.InternVLForConditionalGeneration.from_pretrained(
    out, attn_implementation="eager"
  ).eval()
  assert set(reference.state_dict()) - {"lm_head.weight"} <= names
  with torch.no_grad():
    want = reference(
      input_ids=torch.tensor(IDS, dtype=torch.long),
      pixel_values=torch.tensor(PIXELS).permute(0, 3, 1, 2),
    ).logits.numpy()
  got = np.asarray(ours(jnp.asarray(IDS), jnp.asarray(PIXELS)).logits)
  assert np.abs(got - want).max() <= 1e-4
  assert np.abs(want).max() > 0.1  # the logits are not trivially zero

  back = from_pretrained(out)
  assert back.config == ours.config
  mine, theirs = _params(ours), _params(back)
  assert mine.keys() == theirs.keys()
  for key in mine:
    np.testing.assert_array_equal(theirs[key], mine[key], err_msg=str(key))


def test_sharded_bf16_export_round_trip(tmp_path):
  ours = random_internvl("layer_norm_untied", seed=1)
  written = save_pretrained(ours, tmp_path, dtype="bfloat16", max_shard_bytes=20_000)
  shards = [n for n in written if n.endswith(".safetensors")]
  assert len(shards) > 2 and "model.safetensors" not in written
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  assert set(index["weight_map"].values()) == set(shards)
  assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
  back = from_pretrained(tmp_path, dtype="bfloat16")
  mine, theirs = _params(ours), _params(back)
  for key in mine:
    want = mine[key].astype(jnp.bfloat16)
    np.testing.assert_array_equal(theirs[key], want, err_msg=str(key))
  # A second, unsharded export into the same directory leaves no stale shard behind.
  save_pretrained(ours, tmp_path)
  assert not list(tmp_path.glob("model-*")) and (tmp_path / "model.safetensors").exists()
  reference = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path)
  assert reference.config.text_config.num_key_value_heads == 2


@pytest.mark.slow
def test_decoder_export_loads_as_qwen2_and_llama(tmp_path):
  for qkv_bias, arch in ((True, "Qwen2ForCausalLM"), (False, "LlamaForCausalLM")):
    config = DecoderConfig(
      vocab_size=64,
      hidden_size=32,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      intermediate_size=48,
      qkv_bias=qkv_bias,
      rope_theta=1e4,
    )
    ours = Decoder(config, rngs=nnx.Rngs(0))
    randomise(ours, 3)
    save_pretrained(ours, tmp_path / arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / arch).eval()
    assert type(reference).__name__ == arch
    ids = np.arange(10, dtype=np.int32).reshape(1, 10) * 5
    with torch.no_grad():
      want = reference(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)).logits)
    assert np.abs(got - want).max() <= 1e-4, arch


def test_every_inverse_is_checked_against_the_import_spec():
  spec = export.hf_import._Spec(("w",), ((3, 2),), export.hf_import._linear_t)
  param = np.arange(6, dtype=np.float32).reshape(2, 3)
  assert export._invert(("x",), spec, param)["w"].tolist() == param.T.tolist()
  wrong = export.hf_import._Spec(("w",), ((6,),), lambda x: x.reshape(3, 2).T[::-1])
  with pytest.raises(AssertionError, match="do not load back"):
    export._invert(("x",), wrong, param)


def test_unknown_model_is_a_type_error(tmp_path):
  with pytest.raises(TypeError, match="save_pretrained takes an InternVL"):
    save_pretrained(object(), tmp_path)
