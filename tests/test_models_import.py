"""`from_pretrained`: Qwen2 / LLaMA causal LMs, bf16 files, sharded placement and bad input."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx
from test_models_decoder import CASES, hf_model

from drivekd_jax.models import CheckpointError, from_pretrained
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.models.qwen2 import Decoder


def _qwen2(tied: bool, seed: int = 0) -> transformers.Qwen2ForCausalLM:
  case = dict(
    CASES["qwen2_untied"],
    vocab_size=96,
    hidden_size=32,
    num_layers=2,
    intermediate_size=64,
    tie_word_embeddings=tied,
  )
  return hf_model(case, seed)


def _internvl_dir(directory) -> None:
  """A tiny `-hf` InternVL checkpoint (transformers' own init) for the bad-input tests."""
  config = transformers.InternVLConfig(
    vision_config=dict(
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      intermediate_size=32,
      image_size=28,
      patch_size=14,
      attention_bias=True,
    ),
    text_config=dict(
      model_type="qwen2",
      vocab_size=64,
      hidden_size=16,
      num_hidden_layers=1,
      num_attention_heads=2,
      num_key_value_heads=1,
      intermediate_size=32,
      tie_word_embeddings=False,
    ),
    image_token_id=60,
    tie_word_embeddings=False,
  )
  torch.manual_seed(0)
  transformers.InternVLForConditionalGeneration(config).save_pretrained(directory)


IDS = np.array([[3, 17, 5, 88, 41, 2, 9, 60, 11, 12], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], np.int32)


@pytest.mark.parametrize("tied", [False, True])
def test_qwen2_causal_lm_matches_transformers(tmp_path, tied):
  reference = _qwen2(tied)
  reference.save_pretrained(tmp_path)
  ours = from_pretrained(tmp_path)
  assert isinstance(ours, Decoder)
  assert (ours.lm_head is None) == tied
  with torch.no_grad():
    want = reference(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(IDS)).logits)
  assert np.abs(got - want).max() <= 1e-4


def test_bf16_checkpoint_loads_exactly_and_casts(tmp_path):
  """bf16 tensors are read without torch; values equal the bf16 weights cast up."""
  reference = _qwen2(tied=False).to(torch.bfloat16)
  reference.save_pretrained(tmp_path)
  ours = from_pretrained(tmp_path, dtype="float32")
  want = reference.model.layers[1].mlp.up_proj.weight.detach().float().numpy().T
  np.testing.assert_array_equal(np.asarray(ours.layers[1].mlp.up_proj.kernel[...]), want)
  half = from_pretrained(tmp_path, dtype="bfloat16")
  kernel = half.layers[0].self_attn.q_proj.kernel[...]
  assert kernel.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
    np.asarray(kernel).astype(np.float32),
    reference.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T,
  )
  assert half(jnp.asarray(IDS)).logits.dtype == jnp.float32


def test_sharded_index_and_placement(tmp_path):
  """A two-file checkpoint with an index, loaded straight into a sharding over 8 devices."""
  reference = _qwen2(tied=False)
  reference.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  mesh = jax.make_mesh((2, 4), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = {"vocab": "tensor", "mlp": "tensor", "q_heads": "tensor"}
  seen = {}

  def sharding(path, logical_axes, shape):
    seen[path] = logical_axes
    spec = jax.sharding.PartitionSpec(*(rules.get(a) for a in logical_axes))
    return jax.sharding.NamedSharding(mesh, spec)

  ours = from_pretrained(tmp_path, sharding=sharding)
  up = ours.layers[0].mlp.up_proj.kernel[...]
  assert seen["layers/0/mlp/up_proj/kernel"] == ("embed", "mlp")
  assert up.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
  assert len(up.addressable_shards) == 8 and up.addressable_shards[0].data.shape == (32, 16)
  with torch.no_grad():
    want = reference(torch.tensor(IDS, dtype=torch.long)).logits.numpy()
  assert np.abs(np.asarray(ours(jnp.asarray(IDS)).logits) - want).max() <= 1e-4

  # The same placement from a pytree of shardings (as nnx.get_named_sharding produces).
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  tree = jax.tree.map(lambda _: replicated, nnx.to_pure_dict(nnx.state(ours, nnx.Param)))
  tree["embed_tokens"]["embedding"] = jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec("tensor", None)
  )
  again = from_pretrained(tmp_path, sharding=tree)
  assert again.embed_tokens.embedding[...].sharding.spec == jax.sharding.PartitionSpec(
    "tensor", None
  )
  assert again.norm.scale[...].sharding == replicated


@pytest.fixture(scope="module")
def good_internvl(tmp_path_factory):
  directory = tmp_path_factory.mktemp("internvl")
  _internvl_dir(directory)
  assert isinstance(from_pretrained(directory), InternVL)
  return directory


def _rewrite(src, dst, edit) -> None:
  """Copies a single-file checkpoint, editing its tensor dict in place with `edit`."""
  shutil.copytree(src, dst)
  tensors = safetensors.numpy.load_file(str(dst / "model.safetensors"))
  edit(tensors)
  safetensors.numpy.save_file(tensors, str(dst / "model.safetensors"))


VIT_Q = "vision_tower.encoder.layer.0.attention.q_proj.weight"


def test_missing_tensor_names_it(good_internvl, tmp_path):
  _rewrite(good_internvl, tmp_path / "c", lambda t: t.pop(VIT_Q))
  with pytest.raises(
    CheckpointError, match=rf"missing tensor '{VIT_Q}' \(expected shape \[16, 16\]"
  ):
    from_pretrained(tmp_path / "c")


def test_unexpected_tensor_names_it(good_internvl, tmp_path):
  def add(tensors):
    tensors["vision_tower.encoder.layer.7.mlp.fc9.weight"] = np.zeros((2, 3), np.float32)

  _rewrite(good_internvl, tmp_path / "c", add)
  with pytest.raises(
    CheckpointError, match=r"unexpected tensor.*layer\.7\.mlp\.fc9\.weight' \[2, 3\]"
  ):
    from_pretrained(tmp_path / "c")


def test_wrong_shape_names_tensor_found_and_expected(good_internvl, tmp_path):
  name = "language_model.model.layers.0.mlp.up_proj.weight"

  def reshape(tensors):
    tensors[name] = np.zeros((31, 16), np.float32)

  _rewrite(good_internvl, tmp_path / "c", reshape)
  with pytest.raises(CheckpointError, match=rf"'{name}' has shape \[31, 16\], expected \[32, 16\]"):
    from_pretrained(tmp_path / "c")


def test_unknown_architecture_and_bad_config(good_internvl, tmp_path):
  shutil.copytree(good_internvl, tmp_path / "c")
  config = json.loads((tmp_path / "c" / "config.json").read_text())
  config["architectures"] = ["MistralForCausalLM"]
  config["model_type"] = "mistral"
  (tmp_path / "c" / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="unknown architecture 'MistralForCausalLM'"):
    from_pretrained(tmp_path / "c")
  with pytest.raises(CheckpointError, match="config.json does not exist"):
    from_pretrained(tmp_path)
  shutil.copytree(good_internvl, tmp_path / "d")
  (tmp_path / "d" / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
  with pytest.raises(CheckpointError, match="model.safetensors: .*header"):
    from_pretrained(tmp_path / "d")


def test_index_pointing_at_missing_file(tmp_path):
  _qwen2(tied=True).save_pretrained(tmp_path, max_shard_size="20KB")
  index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
  victim = sorted(set(index["weight_map"].values()))[-1]
  (tmp_path / victim).unlink()
  with pytest.raises(CheckpointError, match=rf"mapped to {victim}, which does not exist"):
    from_pretrained(tmp_path)


def test_bf16_reader_matches_ml_dtypes(tmp_path):
  """The raw reader decodes bf16 bit patterns exactly (no torch in the loading path)."""
  values = np.array([[1.5, -2.25], [3.0e-3, 65504.0]], np.float32)
  torch_bf16 = torch.tensor(values).to(torch.bfloat16)
  from safetensors.torch import save_file

  save_file({"x": torch_bf16}, str(tmp_path / "t.safetensors"))
  from drivekd_jax.models.hf_import import _SafetensorsFile

  got = _SafetensorsFile(str(tmp_path / "t.safetensors")).get("x")
  assert got.dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got.astype(np.float32), torch_bf16.float().numpy())
