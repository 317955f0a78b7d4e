"""Attention's memory-saving forms equal the plain softmax attention: query blocks, fused."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from drivekd_jax.bench import hlo_stats
from drivekd_jax.models import layers, presets
from drivekd_jax.models.config import EXECUTION_FIELDS, DecoderConfig, MapRequest
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.models.qwen2 import Decoder
from drivekd_jax.train import sharding as sharding_lib


def _inputs(length=13, heads=6, kv_heads=2, head_dim=8, batch=2, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
  k = jnp.asarray(rng.normal(size=(batch, kv_heads, length, head_dim)), dtype)
  v = jnp.asarray(rng.normal(size=(batch, kv_heads, length, head_dim)), dtype)
  # Causal, with padding inside row 1 and a leading pad in row 0 (its first query sees nothing).
  real = np.ones((batch, length), bool)
  real[0, 0] = False
  real[-1, 4:6] = False
  allowed = jnp.asarray(real[:, None, :] & np.tril(np.ones((length, length), bool))[None])
  return q, k, v, allowed


def _numpy_head_mean(q, k, allowed):
  """The head-averaged probabilities `[B, T, S]` in float64, query heads grouped over KV heads."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  groups = q.shape[2] // k.shape[1]
  k = np.repeat(k, groups, axis=1)  # [B, H, S, Dh]
  scores = np.einsum("bthd,bhsd->bhts", q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.asarray(allowed)[:, None], scores, -1e30)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return probs.mean(axis=1)


@pytest.mark.parametrize("query_block", [1, 4, 5, 12])
def test_query_blocks_give_the_whole_attention_and_its_head_mean(query_block):
  q, k, v, allowed = _inputs()
  out, head_mean = layers.attention(q, k, v, allowed, want_map=True)
  blocked = jax.jit(lambda *a: layers.attention(*a, want_map=True, query_block=query_block))
  out_b, head_mean_b = blocked(q, k, v, allowed)
  np.testing.assert_allclose(out_b, out, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(head_mean_b, head_mean, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(head_mean_b, _numpy_head_mean(q, k, allowed), rtol=1e-5, atol=1e-6)
  out_only, none = layers.attention(q, k, v, allowed, query_block=query_block)
  assert none is None
  np.testing.assert_allclose(out_only, out, rtol=1e-6, atol=1e-6)


def test_query_blocks_give_the_same_gradients():
  q, k, v, allowed = _inputs(seed=1)
  rng = np.random.default_rng(2)
  d_out = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
  d_map = jnp.asarray(rng.normal(size=allowed.shape), jnp.float32)

  def loss(query_block):
    def f(q, k, v):
      out, head_mean = layers.attention(q, k, v, allowed, want_map=True, query_block=query_block)
      return jnp.sum(out * d_out) + jnp.sum(head_mean * d_map)

    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  for got, want in zip(loss(4)(q, k, v), loss(0)(q, k, v)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_query_blocks_never_hold_every_heads_whole_map():
  """The compiled gradient's temporaries: the plain path keeps `[B, H, T, S]` probabilities for
  the backward pass, the blocked one a block's worth at a time."""
  batch, length, heads = 1, 512, 8
  q, k, v, allowed = _inputs(length=length, heads=heads, kv_heads=2, head_dim=16, batch=batch)

  def temp_bytes(query_block):
    def f(q, k, v):
      out, head_mean = layers.attention(q, k, v, allowed, want_map=True, query_block=query_block)
      return jnp.sum(out) + jnp.sum(head_mean * head_mean)

    compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  whole_probs = batch * heads * length * length * 4
  assert temp_bytes(0) >= 2 * whole_probs
  assert temp_bytes(64) < whole_probs


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_attention_equals_the_softmax_attention(dtype):
  q, k, v, allowed = _inputs(seed=3, dtype=dtype)
  want, _ = layers.attention(q, k, v, allowed)
  got, none = jax.jit(lambda *a: layers.attention(*a, fused=True))(q, k, v, allowed)
  assert none is None and got.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
  real_rows = np.asarray(allowed.any(-1))  # a query that sees no key is garbage either way
  np.testing.assert_allclose(
    np.asarray(got, np.float32)[real_rows],
    np.asarray(want, np.float32)[real_rows],
    rtol=tolerance,
    atol=tolerance,
  )
  # Asking for a map takes the softmax path: the fused kernel returns none.
  _, head_mean = layers.attention(q, k, v, allowed, want_map=True, fused=True)
  assert head_mean.shape == allowed.shape


def _decoder(num_layers=3, **options):
  config = DecoderConfig(
    vocab_size=61,
    hidden_size=32,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=48,
    **options,
  )
  return Decoder(config, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_a_decoder_with_blocks_and_fused_layers_computes_the_same():
  plain = _decoder()
  ids = jnp.asarray(np.random.default_rng(4).integers(0, 61, size=(2, 11)), jnp.int32)
  mask = jnp.ones((2, 11), bool).at[1, :3].set(False)
  request = MapRequest(full_layers=(0,), text_to_image_layers=(1,), hidden_layers=(2,))
  keys = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
  run = lambda model: jax.jit(
    lambda ids, mask: model(ids, attention_mask=mask, maps=request, image_key_positions=keys)
  )(ids, mask)
  want = run(plain)
  other = _decoder(attention_query_block=4, fused_attention=True)
  nnx.update(other, nnx.state(plain))
  assert dataclasses.replace(other.config, attention_query_block=0, fused_attention=False) == (
    plain.config
  )
  got = run(other)
  real = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(got.logits)[real], np.asarray(want.logits)[real], atol=1e-5)
  np.testing.assert_allclose(got.full_maps[0], want.full_maps[0], atol=1e-6)
  np.testing.assert_allclose(got.text_to_image_maps[1], want.text_to_image_maps[1], atol=1e-6)
  np.testing.assert_allclose(
    np.asarray(got.hidden_states[2])[real], np.asarray(want.hidden_states[2])[real], atol=1e-5
  )

  # Prefill and one decode step through the cache (the fused path with cache slots).
  def generate(model):
    cache = model.init_cache(2, 16)
    first = model(ids, attention_mask=mask, cache=cache)
    nxt = jnp.argmax(first.logits[:, -1], axis=-1)[:, None]
    return model(nxt, cache=first.cache).logits

  np.testing.assert_allclose(
    jax.jit(lambda: generate(other))(), jax.jit(lambda: generate(plain))(), atol=1e-5
  )


def _grads_and_outputs(model, ids, request, keys):
  graphdef, params = nnx.split(model)

  def loss(params):
    out = nnx.merge(graphdef, params)(ids, maps=request, image_key_positions=keys)
    signal = sum(jnp.sum(m * m) for m in out.full_maps.values())
    signal += sum(jnp.sum(m) for m in out.text_to_image_maps.values())
    signal += sum(jnp.sum(h * h) for h in out.hidden_states.values())
    return jnp.mean(out.logits**2) + signal, out

  return jax.jit(jax.grad(loss, has_aux=True))(params)


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_and_rematerialised_layers_compute_the_same(remat):
  """Runs of layers (maps at 0, 2, 3; hidden state at 4; plain 1, 5) as scans, with each layer
  rematerialised: the outputs and every parameter's gradient of the layer-by-layer decoder."""
  plain = _decoder(num_layers=6)
  scanned = _decoder(num_layers=6, scan_layers=True, layer_remat=remat)
  nnx.update(scanned, nnx.state(plain))
  ids = jnp.asarray(np.random.default_rng(5).integers(0, 61, size=(2, 9)), jnp.int32)
  request = MapRequest(full_layers=(0, 2, 3), text_to_image_layers=(3,), hidden_layers=(4,))
  keys = jnp.array([[0, 1], [2, 3]], jnp.int32)
  want_grads, want = _grads_and_outputs(plain, ids, request, keys)
  got_grads, got = _grads_and_outputs(scanned, ids, request, keys)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  close(got.logits, want.logits)
  assert sorted(got.full_maps) == [0, 2, 3] and sorted(got.hidden_states) == [4]
  for layer in (0, 2, 3):
    close(got.full_maps[layer], want.full_maps[layer])
  close(got.text_to_image_maps[3], want.text_to_image_maps[3])
  close(got.hidden_states[4], want.hidden_states[4])
  jax.tree.map(close, got_grads, want_grads)


def test_a_scanned_decoder_holds_one_layer_whatever_its_depth():
  def products(num_layers, scan):
    model = _decoder(num_layers=num_layers, scan_layers=scan)
    graphdef, params = nnx.split(model)
    ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    step = jax.jit(jax.grad(lambda p, ids: jnp.sum(nnx.merge(graphdef, p)(ids).logits)))
    return step.lower(params, ids).as_text().count("dot_general")

  assert products(8, scan=True) == products(2, scan=True)
  assert products(8, scan=False) > 2 * products(2, scan=False)


def test_rematerialised_layers_keep_less_for_the_backward_pass():
  """What the backward pass keeps: every layer's attention probabilities without remat; under
  "full" the layers' inputs only (and the shared mask and rotary tables)."""
  length = 128

  def kept_bytes(remat):
    graphdef, params = nnx.split(_decoder(num_layers=3, layer_remat=remat))
    ids = jnp.zeros((1, length), jnp.int32)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(ids).logits ** 2)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
      print_saved_residuals(loss, params)
    kept = 0
    for line in printed.getvalue().splitlines():  # "f32[1,128,32] output of ..."
      dtype, dims = re.match(r"(\w+)\[([\d,]*)\]", line).groups()
      if "from the argument" not in line:
        itemsize = 1 if dtype == "bool" else int(re.sub(r"\D", "", dtype)) // 8  # f32, bf16, ...
        kept += math.prod(int(d) for d in dims.split(",") if d) * itemsize
    return kept

  probabilities = 3 * 4 * length * length * 4  # layers x heads x [T, S] fp32
  assert kept_bytes("none") > probabilities
  assert kept_bytes("full") < probabilities / 4
  assert kept_bytes("dots") < kept_bytes("none") - probabilities


def test_query_blocks_split_a_sharded_sequence_in_place():
  """With the queries split over 8 devices in contiguous ranges (sequence sharding), the strided
  blocks give every device its own share of each block: the blocked attention, its map included,
  runs without moving any data between devices (keys and values are whole on each)."""
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  place = sharding_lib.activation_placement(mesh, sharding_lib.rules_from_config())
  by_query = NamedSharding(mesh, P(None, "fsdp"))
  whole = NamedSharding(mesh, P())
  q, k, v, allowed = _inputs(length=128, heads=4, kv_heads=2, head_dim=16, batch=1)

  def blocked(q, k, v, allowed):
    with layers.activation_sharding(place):
      return layers.attention(q, k, v, allowed, want_map=True, query_block=32)

  step = jax.jit(
    blocked, in_shardings=(by_query, whole, whole, by_query), out_shardings=(by_query, by_query)
  )
  compiled = step.lower(q, k, v, allowed).compile()
  assert hlo_stats.analyze(compiled.as_text()).collective_bytes == 0
  out, head_mean = step(q, k, v, allowed)
  np.testing.assert_allclose(head_mean, _numpy_head_mean(q, k, allowed), rtol=1e-5, atol=1e-6)
  want, _ = layers.attention(q, k, v, allowed)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_dots_remat_recomputes_attention_only():
  """Under "dots" the backward pass keeps the layers' weight products (`layers.dense`, a custom-VJP
  call no dot policy sees) and recomputes the attention products alone; "full" also redoes the
  weight products."""
  length, num_layers, heads, head_dim = 64, 3, 4, 8

  def flops(remat):
    graphdef, params = nnx.split(_decoder(num_layers=num_layers, layer_remat=remat))
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
    loss = lambda p, ids: jnp.sum(nnx.merge(graphdef, p)(ids).logits ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return hlo_stats.analyze(compiled.as_text()).flops

  attention_products = num_layers * 2 * (2 * length * length * heads * head_dim)  # QK^T and PV
  none, dots, full = flops("none"), flops("dots"), flops("full")
  assert 0 < dots - none <= attention_products
  assert full - dots >= attention_products


@pytest.mark.slow
def test_a_scanned_vision_tower_computes_the_same():
  config = presets.internvl3("tiny")
  plain = InternVL(config, rngs=nnx.Rngs(0))
  text = dataclasses.replace(config.text, scan_layers=True, layer_remat="full")
  scanned = InternVL(dataclasses.replace(config, text=text), rngs=nnx.Rngs(1))
  nnx.update(scanned, nnx.state(plain))
  size = config.vision.image_size
  pixels = jnp.asarray(np.random.default_rng(6).normal(size=(2, size, size, 3)), jnp.float32)

  def embed_and_grad(model):
    graphdef, params = nnx.split(model)
    embed = lambda p: nnx.merge(graphdef, p).embed_images(pixels)
    return jax.jit(lambda p: (embed(p), jax.grad(lambda p: jnp.sum(embed(p) ** 2))(p)))(params)

  got, got_grads = embed_and_grad(scanned)
  want, want_grads = embed_and_grad(plain)
  assert config.vision.num_layers > 1
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, got_grads["vision_model"], want_grads["vision_model"])


def test_the_vision_towers_tokens_split_over_devices_unevenly():
  """An InternViT's 65 tokens per image over 8 devices (the last shard padded by the compiler):
  each device computes about its share of the tower's forward pass, and the features and
  gradients are those of the unsharded tower."""
  config = presets.internvl3("tiny")
  config = dataclasses.replace(config, vision=dataclasses.replace(config.vision, image_size=112))
  graphdef, params = nnx.split(InternVL(config, rngs=nnx.Rngs(0)))
  pixels = jnp.asarray(np.random.default_rng(7).normal(size=(3, 112, 112, 3)), jnp.float32)
  assert 1 + (112 // config.vision.patch_size) ** 2 == 65
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  place = sharding_lib.activation_placement(mesh, sharding_lib.rules_from_config())

  def run(placement):
    def embed(p):
      with layers.activation_sharding(placement):
        return nnx.merge(graphdef, p).embed_images(pixels)

    forward = jax.jit(embed)
    devices = mesh.size if placement else 1
    flops = hlo_stats.analyze(forward.lower(params).compile().as_text()).flops * devices
    grads = jax.jit(jax.grad(lambda p: jnp.sum(embed(p) ** 2)))(params)
    return flops, forward(params), grads

  whole_flops, want, want_grads = run(None)
  split_flops, got, got_grads = run(place)
  assert split_flops < 1.3 * whole_flops
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, got_grads["vision_model"], want_grads["vision_model"])


def test_a_loaded_model_takes_the_execution_options_around_its_own_parameters():
  from drivekd_jax.train.experiment import with_execution_options

  model = InternVL(presets.internvl3("tiny"), rngs=nnx.Rngs(0))
  options = {name: value for name, value in zip(EXECUTION_FIELDS, (4, True, True, "dots"))}
  rebuilt = with_execution_options(model, options)
  assert rebuilt.config.text == dataclasses.replace(model.config.text, **options)
  assert rebuilt.language_model.layers[0].self_attn.query_block == 4
  assert rebuilt.language_model.config.scan_layers
  same = lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  jax.tree.map(same, nnx.state(rebuilt, nnx.Param), nnx.state(model, nnx.Param))
