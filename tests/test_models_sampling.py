"""The jitted sampler: HF greedy parity, padding, stop ids, multi-turn cache carry, no retrace."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from test_models_decoder import CASES, hf_model, random_ids

from drivekd_jax.models.config import DecoderConfig
from drivekd_jax.models.hf_import import from_pretrained
from drivekd_jax.models.qwen2 import Decoder, KVCache
from drivekd_jax.models.sampling import (
  Sampler,
  SamplerLoop,
  SamplingMethod,
  completions,
  greedy_tokens,
)

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module", params=["qwen2_untied", "llama"])
def pair(request, tmp_path_factory):
  hf = hf_model(CASES[request.param], seed=3)
  directory = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(directory)
  return CASES[request.param], hf, from_pretrained(directory)


@pytest.fixture(scope="module")
def small_model() -> Decoder:
  config = DecoderConfig(
    vocab_size=61,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    rope_theta=1e4,
  )
  model = Decoder(config, rngs=nnx.Rngs(4))
  # Sharper logits than the 0.02 init, so greedy paths are decisive and varied.
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if variable.get_value().ndim == 2:
      variable.set_value(variable.get_value() * 10.0)
  return model


def test_greedy_20_tokens_match_transformers_generate(pair):
  case, hf, model = pair
  prompts = random_ids(case["vocab_size"], 2, 7, seed=11)
  with torch.no_grad():
    expected = hf.generate(
      torch.from_numpy(prompts).long(),
      max_new_tokens=20,
      min_new_tokens=20,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )
  expected = expected[:, prompts.shape[1] :].numpy()
  sampler = Sampler(model, cache_length=32, max_new_tokens=20)
  state = sampler.generate(jnp.asarray(prompts))
  np.testing.assert_array_equal(state.tokens, expected)
  assert state.num_tokens.tolist() == [20, 20]
  # Prefill from embeddings (the multimodal path) gives the same tokens.
  by_embeds = sampler.generate(inputs_embeds=model.embed(jnp.asarray(prompts)))
  np.testing.assert_array_equal(by_embeds.tokens, expected)


def _pad(rows, width, left):
  ids = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for b, (row, is_left) in enumerate(zip(rows, left)):
    sl = slice(width - len(row), width) if is_left else slice(0, len(row))
    ids[b, sl], mask[b, sl] = row, True
  return jnp.asarray(ids), jnp.asarray(mask)


@pytest.mark.slow
def test_padded_batch_and_stop_ids_equal_rows_alone(small_model):
  rows = [random_ids(61, 1, n, seed=20 + b)[0] for b, n in enumerate((6, 3, 6))]
  ids, mask = _pad(rows, 8, left=[True, True, False])
  free = Sampler(small_model, cache_length=24, max_new_tokens=10)
  alone = [free.generate(jnp.asarray(r[None])).tokens[0] for r in rows]
  batched = free.generate(ids, attention_mask=mask)
  np.testing.assert_array_equal(batched.tokens, np.stack(alone))
  # Stop at row 0's 4th token: row 0 ends there (stop id kept), the others wherever it occurs.
  stop = int(alone[0][3])
  stopping = Sampler(
    small_model, cache_length=24, max_new_tokens=10, stop_token_ids=(stop,), pad_token_id=-1
  )
  state = stopping.generate(ids, attention_mask=mask)
  for b, row in enumerate(alone):
    row = row.tolist()
    n = row.index(stop) + 1 if stop in row else 10
    assert completions(state)[b] == row[:n]
    assert state.tokens[b, n:].tolist() == [-1] * (10 - n)
    assert bool(state.done[b]) == (stop in row)


@pytest.mark.slow
def test_multi_turn_cache_carry_equals_reencoding(small_model):
  sampler = Sampler(small_model, cache_length=48, max_new_tokens=6)
  turn1 = [random_ids(61, 1, n, seed=30 + n)[0] for n in (7, 4)]
  turn2 = [random_ids(61, 1, n, seed=40 + n)[0] for n in (3, 6)]  # both histories: 16 tokens
  ids1, mask1 = _pad(turn1, 7, left=[True, True])
  ids2, mask2 = _pad(turn2, 6, left=[False, False])
  first = sampler.generate(ids1, attention_mask=mask1)
  first_tokens = np.asarray(first.tokens)
  second = sampler.continue_(first, ids2, attention_mask=mask2)
  for b in range(2):
    history = np.concatenate([turn1[b], first_tokens[b], turn2[b]])
    scratch = sampler.generate(jnp.asarray(history[None]))
    np.testing.assert_array_equal(second.tokens[b], scratch.tokens[0])
  assert int(second.cache.length) == (7 + 1) + 5 + (1 + 6) + 5
  with pytest.raises(ValueError, match="does not fit a cache of 48"):
    sampler.continue_(second, jnp.ones((2, 23), jnp.int32))


def test_sampler_does_not_retrace(small_model, monkeypatch):
  chex.clear_trace_counter()
  monkeypatch.setattr(SamplerLoop, "turn", chex.assert_max_traces(SamplerLoop.turn, n=1))
  method = SamplingMethod(temperature=0.7, top_p=0.9)
  sampler = Sampler(
    small_model, cache_length=40, max_new_tokens=5, stop_token_ids=(1, 2), method=method
  )
  state = None
  for seed in range(3):
    ids = jnp.asarray(random_ids(61, 2, 6, seed=seed))
    state = sampler.generate(ids, rng=jax.random.key(seed))
    state = sampler.continue_(state, ids[:, :6])
  # A second sampler over the same model and settings reuses the compiled turn too.
  again = Sampler(
    small_model, cache_length=40, max_new_tokens=5, stop_token_ids=(1, 2), method=method
  )
  again.generate(jnp.asarray(random_ids(61, 2, 6, seed=9)), rng=jax.random.key(1))


def test_temperature_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.split(jax.random.key(0), 1)[0]
  greedy = SamplingMethod().next_tokens(logits[:2], keys)
  assert greedy.tolist() == [0, 0]
  nucleus = SamplingMethod(temperature=1.0, top_p=0.7).next_tokens(logits, keys)
  assert set(np.unique(nucleus).tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7
  frequency = float(jnp.mean(nucleus == 0))
  assert abs(frequency - 0.5 / 0.8) < 0.04
  full = SamplingMethod(temperature=1.0).next_tokens(logits, keys)
  assert set(np.unique(full).tolist()) == {0, 1, 2, 3}
  tiny_p = SamplingMethod(temperature=2.0, top_p=1e-6).next_tokens(logits, keys)
  assert set(np.unique(tiny_p).tolist()) == {0}
  with pytest.raises(ValueError, match="top_p"):
    SamplingMethod(top_p=0.0)


# Upper 0.1% points of the chi-square distribution (degrees of freedom -> value).
CHI_SQUARE_999 = {2: 13.816, 3: 16.266}


@pytest.mark.parametrize(
  "temperature,top_p,expected",
  [
    # p_T ∝ p^(1/T): T = 0.5 squares the probabilities, T = 2 takes their square root.
    (0.5, 1.0, np.array([0.25, 0.09, 0.0225, 0.0025]) / 0.365),
    (2.0, 1.0, np.sqrt([0.5, 0.3, 0.15, 0.05]) / np.sqrt([0.5, 0.3, 0.15, 0.05]).sum()),
    # The nucleus is taken after the temperature: at T = 2 the tempered mass before the third
    # token is 0.67 < 0.7, so three tokens stay (at T = 1 only two would).
    (2.0, 0.7, np.append(np.sqrt([0.5, 0.3, 0.15]) / np.sqrt([0.5, 0.3, 0.15]).sum(), 0.0)),
  ],
)
def test_sampled_frequencies_follow_the_tempered_distribution(temperature, top_p, expected):
  """A chi-square goodness-of-fit test on 20000 draws with a fixed key (p > 0.001)."""
  draws = 20000
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * draws))
  method = SamplingMethod(temperature=temperature, top_p=top_p)
  tokens = np.asarray(method.next_tokens(logits, jax.random.key(7)))
  counts = np.bincount(tokens, minlength=4)
  support = expected > 0
  assert np.all(counts[~support] == 0)
  want = draws * expected[support]
  statistic = float(np.sum((counts[support] - want) ** 2 / want))
  assert statistic < CHI_SQUARE_999[int(support.sum()) - 1], (counts, want)


def test_sampling_is_reproducible_per_key(small_model):
  sampler = Sampler(
    small_model, cache_length=24, max_new_tokens=8, method=SamplingMethod(temperature=1.5)
  )
  ids = jnp.asarray(random_ids(61, 3, 5, seed=2))
  a = sampler.generate(ids, rng=jax.random.key(1)).tokens
  b = sampler.generate(ids, rng=jax.random.key(1)).tokens
  c = sampler.generate(ids, rng=jax.random.key(2)).tokens
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_sharded_decoder_and_cache_generate_the_same_tokens(small_model):
  """Parameters and cache placed by their logical axes on a (data 2, fsdp 2, tensor 2) mesh."""
  from drivekd_jax.train import sharding as sharding_lib

  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.rules_from_config()
  sharded = sharding_lib.shard_module_state(small_model, mesh, rules)
  kernel = sharded.layers[0].mlp.gate_proj.kernel.get_value()
  assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
  ids = jnp.asarray(random_ids(61, 4, 6, seed=5))
  expected = Sampler(small_model, cache_length=16, max_new_tokens=6).generate(ids).tokens
  specs = KVCache.logical_axes(small_model.config.num_layers)
  shapes = jax.eval_shape(lambda: KVCache.create(small_model.config, 4, 16))
  cache_sharding = jax.tree.map(
    lambda x, names: jax.NamedSharding(
      mesh, sharding_lib.logical_to_spec(tuple(names), x.shape, mesh, rules)
    ),
    shapes,
    specs,
  )
  assert cache_sharding.k[0].spec == jax.P(("data", "fsdp"), "tensor", None, None)
  sampler = Sampler(sharded, cache_length=16, max_new_tokens=6, cache_sharding=cache_sharding)
  state = sampler.generate(ids)
  np.testing.assert_array_equal(state.tokens, expected)
  assert state.cache.k[0].sharding.is_equivalent_to(cache_sharding.k[0], 4)


def test_greedy_tokens_is_the_first_argmax():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 500)).astype(np.float32)
  logits[1, [7, 300]] = 9.0  # a tie: the first index wins, as in np.argmax
  logits[2, :] = -np.inf
  logits[3, 5] = np.inf
  np.testing.assert_array_equal(jax.jit(greedy_tokens)(logits), np.argmax(logits, axis=-1))
  logits[4, [3, 40]] = np.nan
  assert int(greedy_tokens(jnp.asarray(logits))[4]) == 3
