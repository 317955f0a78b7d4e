"""Decoder parity with transformers Qwen2 / LLaMA, attention maps, padding and the KV cache."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from drivekd_jax.models.config import DecoderConfig, MapRequest
from drivekd_jax.models.hf_import import from_pretrained
from drivekd_jax.models.qwen2 import NO_MAPS, Decoder, KVCache

# (name, HF class, DecoderConfig): untied + GQA 2 + qkv bias; tied + GQA 3 + bias; LLaMA untied.
CASES = {
  "qwen2_untied": dict(
    arch="qwen2",
    vocab_size=101,
    hidden_size=48,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=80,
    rope_theta=1e6,
    qkv_bias=True,
    tie_word_embeddings=False,
  ),
  "qwen2_tied": dict(
    arch="qwen2",
    vocab_size=89,
    hidden_size=48,
    num_layers=2,
    num_heads=6,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=1e6,
    qkv_bias=True,
    tie_word_embeddings=True,
  ),
  "llama": dict(
    arch="llama",
    vocab_size=97,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    rope_theta=1e4,
    qkv_bias=False,
    tie_word_embeddings=False,
  ),
}


pytestmark = pytest.mark.usefixtures("fast_compiles")


def hf_model(case: dict, seed: int = 0):
  """A tiny random HF model with eager attention and non-trivial biases and norm scales."""
  common = dict(
    vocab_size=case["vocab_size"],
    hidden_size=case["hidden_size"],
    intermediate_size=case["intermediate_size"],
    num_hidden_layers=case["num_layers"],
    num_attention_heads=case["num_heads"],
    num_key_value_heads=case["num_kv_heads"],
    rope_theta=case["rope_theta"],
    rms_norm_eps=1e-6,
    tie_word_embeddings=case["tie_word_embeddings"],
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
  )
  if case["arch"] == "qwen2":
    config = transformers.Qwen2Config(**common)
    cls = transformers.Qwen2ForCausalLM
  else:
    config = transformers.LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    cls = transformers.LlamaForCausalLM
  config._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = cls(config).eval()
  with torch.no_grad():
    for name, tensor in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        tensor.copy_(torch.randn_like(tensor) * 0.5 + (1.0 if "norm" in name else 0.0))
      else:
        tensor.copy_(torch.randn_like(tensor) * 0.15)
  return model


@functools.partial(jax.jit, static_argnames=("graphdef", "maps"))
def _jit_forward(graphdef, params, input_ids, maps, kwargs):
  return nnx.merge(graphdef, params)(input_ids, maps=maps, **kwargs)


def _run(model: Decoder, input_ids, *, maps: MapRequest = NO_MAPS, **kwargs):
  """`model(input_ids, maps=maps, **kwargs)`, jitted (eager dispatch is slow on a busy CPU)."""
  graphdef, params = nnx.split(model)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  return _jit_forward(graphdef, params, jnp.asarray(input_ids), maps, kwargs)


def _decoder_config(case: dict) -> DecoderConfig:
  """What from_pretrained should build for a case."""
  keys = (
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "rope_theta",
    "qkv_bias",
    "tie_word_embeddings",
  )
  return DecoderConfig(**{k: case[k] for k in keys}, rms_norm_eps=1e-6, max_position_embeddings=256)


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
  """(name, case, HF model, our Decoder loaded by from_pretrained from HF's save_pretrained)."""
  case = CASES[request.param]
  hf = hf_model(case)
  directory = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(directory)
  model = from_pretrained(directory, dtype="float32")
  assert isinstance(model, Decoder)
  expected = _decoder_config(case)
  assert dataclasses.replace(model.config, head_dim=None) == expected
  assert model.config.resolved_head_dim == expected.resolved_head_dim
  assert (model.lm_head is None) == case["tie_word_embeddings"]
  return request.param, case, hf, model


def random_ids(vocab: int, batch: int, length: int, seed: int = 1) -> np.ndarray:
  return np.random.default_rng(seed).integers(3, vocab, size=(batch, length), dtype=np.int32)


def test_logits_and_every_attention_map_match_transformers(pair):
  _, case, hf, model = pair
  ids = random_ids(case["vocab_size"], 2, 13)
  with torch.no_grad():
    ref = hf(torch.from_numpy(ids).long(), output_attentions=True, output_hidden_states=True)
  every = tuple(range(case["num_layers"]))
  out = _run(model, jnp.asarray(ids), maps=MapRequest(full_layers=every, hidden_layers=every))
  assert out.logits.dtype == jnp.float32
  np.testing.assert_allclose(out.logits, ref.logits.numpy(), atol=1e-4, rtol=0)
  assert sorted(out.full_maps) == list(every)
  for layer in every:
    expected = ref.attentions[layer].float().mean(dim=1).numpy()
    assert out.full_maps[layer].shape == (2, 13, 13)
    assert out.full_maps[layer].dtype == jnp.float32
    np.testing.assert_allclose(out.full_maps[layer], expected, atol=1e-5, rtol=0)
  # HF's hidden_states[i + 1] is block i's output, except the last entry, which is final-normed.
  for layer in every[:-1]:
    expected = ref.hidden_states[layer + 1].numpy()
    np.testing.assert_allclose(out.hidden_states[layer], expected, atol=1e-4, rtol=1e-5)
  plain = _run(model, jnp.asarray(ids))
  assert not plain.full_maps and not plain.text_to_image_maps and not plain.hidden_states
  np.testing.assert_allclose(plain.logits, out.logits, atol=1e-6, rtol=0)


def test_text_to_image_block_is_the_gathered_full_map(pair):
  _, case, _, model = pair
  ids = jnp.asarray(random_ids(case["vocab_size"], 2, 12, seed=3))
  image_keys = jnp.array([[2, 3, 4, 5], [1, 2, 7, 8]], jnp.int32)
  request = MapRequest(full_layers=(0, -1), text_to_image_layers=(-1,), hidden_layers=(0,))
  out = _run(model, ids, maps=request, image_key_positions=image_keys)
  last = case["num_layers"] - 1
  assert sorted(out.full_maps) == [0, last] and list(out.text_to_image_maps) == [last]
  gathered = np.take_along_axis(
    np.asarray(out.full_maps[last]), np.asarray(image_keys)[:, None, :], axis=-1
  )
  np.testing.assert_array_equal(out.text_to_image_maps[last], gathered)
  assert out.hidden_states[0].shape == (2, 12, case["hidden_size"])
  only_t2i = _run(
    model, ids, maps=MapRequest(text_to_image_layers=(last,)), image_key_positions=image_keys
  )
  assert not only_t2i.full_maps
  np.testing.assert_array_equal(only_t2i.text_to_image_maps[last], gathered)
  with pytest.raises(ValueError, match="image_key_positions"):
    model(ids, maps=MapRequest(text_to_image_layers=(0,)))


def test_padded_batch_equals_unpadded_rows(pair):
  """Rows 0-1 left-padded, rows 2-3 right-padded: real positions match each row run alone."""
  _, case, _, model = pair
  width = 11
  rows = [random_ids(case["vocab_size"], 1, n, seed=10 + b)[0] for b, n in enumerate([9, 5, 5, 9])]
  ids = np.zeros((4, width), np.int32)
  mask = np.zeros((4, width), bool)
  for b, row in enumerate(rows):
    sl = slice(width - len(row), width) if b < 2 else slice(0, len(row))
    ids[b, sl], mask[b, sl] = row, True
  every = tuple(range(case["num_layers"]))
  out = _run(model, ids, attention_mask=jnp.asarray(mask), maps=MapRequest(full_layers=every))
  for b, row in enumerate(rows):
    alone = _run(model, row[None], maps=MapRequest(full_layers=every))
    real, pad = np.flatnonzero(mask[b]), np.flatnonzero(~mask[b])
    np.testing.assert_allclose(out.logits[b, real], alone.logits[0], atol=1e-5, rtol=0)
    for layer in every:
      padded_map = np.asarray(out.full_maps[layer][b])
      np.testing.assert_allclose(
        padded_map[np.ix_(real, real)], alone.full_maps[layer][0], atol=1e-6, rtol=0
      )
      assert np.all(padded_map[np.ix_(real, pad)] == 0)  # padding keys are never attended


def test_cache_prefill_decode_and_chunk_append_equal_one_pass(pair):
  _, case, _, model = pair
  ids = jnp.asarray(random_ids(case["vocab_size"], 2, 14, seed=5))
  full = _run(model, ids)
  cache = model.init_cache(2, 24)
  parts = [ids[:, :6], ids[:, 6:7], ids[:, 7:8], ids[:, 8:14]]  # prefill, 2 decodes, a new chunk
  logits = []
  for part in parts:
    out = _run(model, part, cache=cache)
    cache = out.cache
    logits.append(out.logits)
  np.testing.assert_allclose(jnp.concatenate(logits, axis=1), full.logits, atol=1e-5, rtol=0)
  assert int(cache.length) == 14 and cache.next_position.tolist() == [14, 14]
  assert cache.key_mask[:, :14].all() and not cache.key_mask[:, 14:].any()


def test_padded_chunks_in_the_cache_equal_the_concatenated_real_tokens(pair):
  """Left-padded turn 1, right-padded turn 2 through the cache == the real tokens in one pass."""
  _, case, _, model = pair
  turn1 = random_ids(case["vocab_size"], 2, 6, seed=7)
  turn2 = random_ids(case["vocab_size"], 2, 5, seed=8)
  mask1 = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool)
  mask2 = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
  cache = model.init_cache(2, 16)
  out1 = _run(model, jnp.asarray(turn1), attention_mask=jnp.asarray(mask1), cache=cache)
  out2 = _run(
    model,
    jnp.asarray(turn2),
    attention_mask=jnp.asarray(mask2),
    cache=out1.cache,
    maps=MapRequest(full_layers=(0,)),
  )
  assert out2.full_maps[0].shape == (2, 5, 16)
  for b in range(2):
    real = np.concatenate([turn1[b][mask1[b]], turn2[b][mask2[b]]])
    alone = _run(model, jnp.asarray(real[None]))
    got = np.concatenate(
      [np.asarray(out1.logits[b])[mask1[b]], np.asarray(out2.logits[b])[mask2[b]]]
    )
    np.testing.assert_allclose(got, alone.logits[0], atol=1e-5, rtol=0)
  assert out2.cache.next_position.tolist() == [4 + 3, 6 + 4]


def test_logits_indices_and_cache_logical_axes():
  config = DecoderConfig(
    vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=32
  )
  model = Decoder(config, rngs=nnx.Rngs(1))
  ids = jnp.asarray(random_ids(50, 2, 7))
  full = _run(model, ids).logits
  picked = _run(model, ids, logits_indices=jnp.array([[6], [3]])).logits
  np.testing.assert_allclose(picked[:, 0], full[jnp.arange(2), jnp.array([6, 3])], atol=1e-6)
  cache = model.init_cache(2, 8)
  axes = KVCache.logical_axes(config.num_layers)
  leaves, specs = jax.tree.leaves(cache), jax.tree.leaves(axes)
  assert len(leaves) == len(specs) == 2 * config.num_layers + 3
  for leaf, spec in zip(leaves, specs):
    assert isinstance(spec, jax.P) and leaf.ndim == len(spec)


def test_every_parameter_has_logical_axes():
  config = DecoderConfig(
    vocab_size=50,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=32,
    tie_word_embeddings=True,
  )
  model = Decoder(config, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
  assert model.lm_head is None
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    axes = variable.get_metadata()["out_sharding"]
    assert len(axes) == variable.get_value().ndim and all(isinstance(a, str) for a in axes)
    assert variable.get_value().dtype == jnp.float32
  out = _run(model, jnp.asarray(random_ids(50, 1, 5)), maps=MapRequest(full_layers=(1,)))
  assert out.logits.dtype == jnp.float32 and out.full_maps[1].dtype == jnp.float32


def test_cross_entropy_gradients_match_transformers(pair):
  """Every projection's gradient (our `dense` VJP) and the head's equal torch autograd's."""
  from drivekd_jax.distill.losses import cross_entropy

  _, case, hf, model = pair
  ids = random_ids(case["vocab_size"], 2, 12)
  labels = ids.copy()
  labels[:, :5] = -100
  hf.zero_grad()
  hf(input_ids=torch.from_numpy(ids).long(), labels=torch.from_numpy(labels).long()).loss.backward()
  graphdef, params = nnx.split(model)

  @jax.jit
  def grads(params):
    loss = lambda p: cross_entropy(nnx.merge(graphdef, p)(jnp.asarray(ids)).logits, labels)
    return jax.grad(loss)(params)

  ours = grads(params)
  hf_grads = dict(hf.named_parameters())
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())
  for i in range(case["num_layers"]):
    layer = ours["layers"][i]
    for block, names in (
      ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
      ("mlp", ("gate_proj", "up_proj", "down_proj")),
    ):
      for name in names:
        expected = hf_grads[f"model.layers.{i}.{block}.{name}.weight"].grad.numpy().T
        close(np.asarray(layer[block][name]["kernel"][...]), expected)
  if not case["tie_word_embeddings"]:
    close(np.asarray(ours["lm_head"]["kernel"][...]), hf_grads["lm_head.weight"].grad.numpy().T)
  embed = hf_grads["model.embed_tokens.weight"].grad.numpy()
  close(np.asarray(ours["embed_tokens"]["embedding"][...]), embed)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_gradients_equal_the_plain_products(dtype):
  """`dense` (custom kernel gradient) against autodiff of the same einsum, 3-D input, an fp32
  output like the LM head's: with bf16 operands the fp32 cotangent must not be rounded first."""
  from drivekd_jax.models.layers import dense

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 64, 48)), dtype)
  kernel = jnp.asarray(rng.normal(size=(48, 96)) * 0.1, dtype)
  cotangent = jnp.asarray(rng.normal(size=(2, 64, 96)), jnp.float32)
  plain = lambda a, b: jnp.einsum("btd,dv->btv", a, b, preferred_element_type=jnp.float32)
  ours = jax.jit(lambda a, b: jax.vjp(lambda a, b: dense(a, b, jnp.float32), a, b)[1](cotangent))
  reference = jax.jit(lambda a, b: jax.vjp(plain, a, b)[1](cotangent))
  for got, want in zip(ours(x, kernel), reference(x, kernel)):
    assert got.dtype == want.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.mean(np.abs(got - want)) <= 1e-4 * np.mean(np.abs(want))
