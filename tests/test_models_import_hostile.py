"""`from_pretrained` on hostile checkpoints: every problem is a CheckpointError naming the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import safetensors.numpy
from test_models_import import _qwen2

from drivekd_jax.models import CheckpointError, from_pretrained


@pytest.fixture(scope="module")
def good_qwen2(tmp_path_factory):
  directory = tmp_path_factory.mktemp("qwen2")
  _qwen2(tied=False).save_pretrained(directory)
  return directory


def _copy(good, tmp_path, name="c"):
  return shutil.copytree(good, tmp_path / name)


def _write_raw(path, header) -> None:
  data = json.dumps(header).encode()
  path.write_bytes(len(data).to_bytes(8, "little") + data + b"\0" * 16)


@pytest.mark.parametrize(
  "header, message",
  [
    ([1, 2], "header is list"),
    ({"x": "not an entry"}, "tensor 'x' is str"),
    ({"x": {"shape": [2], "data_offsets": [0, 8]}}, "tensor 'x' has dtype None"),
    ({"x": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, "tensor 'x' has shape '2'"),
    ({"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'x' has data_offsets"),
  ],
)
def test_malformed_safetensors_header_names_file_and_tensor(good_qwen2, tmp_path, header, message):
  directory = _copy(good_qwen2, tmp_path)
  _write_raw(directory / "model.safetensors", header)
  with pytest.raises(CheckpointError, match=f"model.safetensors: .*{message}"):
    from_pretrained(directory)


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("hidden_size", "32", "field 'hidden_size' must be a non-negative integer, got '32'"),
    ("num_hidden_layers", 2.0, "field 'num_hidden_layers' must be a non-negative integer"),
    ("vocab_size", True, "field 'vocab_size' must be a non-negative integer"),
    ("rms_norm_eps", "1e-6", "field 'rms_norm_eps' must be a number"),
  ],
)
def test_wrongly_typed_config_field_is_named(good_qwen2, tmp_path, key, value, message):
  directory = _copy(good_qwen2, tmp_path)
  config = json.loads((directory / "config.json").read_text())
  config[key] = value
  (directory / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match=f"config.json: {message}"):
    from_pretrained(directory)


def test_config_that_is_not_an_object(good_qwen2, tmp_path):
  directory = _copy(good_qwen2, tmp_path)
  (directory / "config.json").write_text("[1, 2]")
  with pytest.raises(CheckpointError, match="config.json: expected a JSON object, got list"):
    from_pretrained(directory)


def test_integer_tensor_is_not_cast_to_float(good_qwen2, tmp_path):
  directory = _copy(good_qwen2, tmp_path)
  tensors = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int32)
  safetensors.numpy.save_file(tensors, str(directory / "model.safetensors"))
  with pytest.raises(CheckpointError, match="'model.norm.weight' is stored as I32.*no silent cast"):
    from_pretrained(directory)


def test_weight_map_cannot_leave_the_checkpoint_folder(good_qwen2, tmp_path):
  directory = _copy(good_qwen2, tmp_path, "inner")
  # A file outside the checkpoint folder that would load perfectly well.
  shutil.move(directory / "model.safetensors", tmp_path / "outside.safetensors")
  names = safetensors.numpy.load_file(str(tmp_path / "outside.safetensors"))
  index = {"weight_map": {name: "../outside.safetensors" for name in names}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match="weight_map entry of tensor .* without '/'"):
    from_pretrained(directory)
  index = {"weight_map": {name: str(tmp_path / "outside.safetensors") for name in names}}
  (directory / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(CheckpointError, match="weight_map entry"):
    from_pretrained(directory)
