"""Small pieces of the trainer: sharding rules, meshes, checkpoints, schedule, parsing, FLOPs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from drivekd_jax.eval import heldout
from drivekd_jax.models import presets
from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import distributed
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train import optimizer as optimizer_lib
from drivekd_jax.train import sharding as sharding_lib


def test_mesh_shape_fills_minus_one_and_rejects_misfits():
  assert sharding_lib.mesh_shape({"data": -1, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  assert sharding_lib.mesh_shape(None, 8) == (8, 1, 1)
  with pytest.raises(ValueError, match="does not fit"):
    sharding_lib.mesh_shape({"data": 3, "fsdp": 1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="at most one"):
    sharding_lib.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


def test_logical_rules_use_each_mesh_axis_once_and_skip_indivisible_dims():
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding_lib.rules_from_config([("head_dim", "tensor")])
  P = jax.sharding.PartitionSpec
  assert sharding_lib.logical_to_spec(("embed", "mlp"), (8, 16), mesh, rules) == P("fsdp", "tensor")
  # kv_heads takes tensor first; head_dim may not reuse it.
  assert sharding_lib.logical_to_spec(("kv_heads", "head_dim"), (2, 8), mesh, rules) == P(
    "tensor", None
  )
  # 3 is not divisible by 2: that dimension stays whole.
  assert sharding_lib.logical_to_spec(("vocab", "embed"), (3, 8), mesh, rules) == P(None, "fsdp")
  assert sharding_lib.logical_to_spec(("batch", "length"), (8, 4), mesh, rules) == P(
    ("data", "fsdp"), None
  )
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding_lib.logical_to_spec(("nonsense",), (4,), mesh, rules)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    sharding_lib.rules_from_config([("embed", "model")])


def test_activation_placement_splits_unevenly_but_never_below_one_row_per_device():
  mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
  rules = sharding_lib.rules_from_config()
  P = jax.sharding.PartitionSpec
  # Parameters keep to even splits; activations may leave the last shard short.
  assert sharding_lib.logical_to_spec((None, "vit_tokens"), (6, 1025), mesh, rules) == P(None, None)
  place = sharding_lib.activation_placement(mesh, rules)
  assert place((6, 1025, 64), (None, "vit_tokens", "activation_embed")).spec == P(
    None, "fsdp", None
  )
  # One sample over four devices: the batch stays whole and the sequence takes fsdp.
  spec = place((1, 3072, 64), ("batch", "activation_length", "activation_embed")).spec
  assert spec == P(None, "fsdp", None)
  assert place((3, 2, 64), ("batch", "activation_length", "activation_embed")) is None
  one = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
  assert sharding_lib.activation_placement(one, rules)((1, 3072, 64), ("batch",) * 3) is None


def test_checkpoint_roundtrip_keeps_values_shardings_keys_and_data_state(tmp_path):
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
  state = {
    "w": jax.device_put(jnp.arange(32.0).reshape(4, 8), sharding),
    "key": jax.random.key(3),
    "step": jnp.int32(7),
  }
  with ckpt_lib.Checkpointer(str(tmp_path / "ck"), save_interval_steps=5, max_to_keep=2) as ck:
    assert not ck.save(3, state, rng=jax.random.key(1))  # not on the interval
    for step in (5, 10, 15):
      assert ck.save(
        step, state, rng=jax.random.key(step), data_state=b"\x00grain", metadata={"note": "x"}
      )
    ck.wait()
    assert ck.all_steps() == [10, 15]
    abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), state
    )
    restored = ck.restore_latest(abstract, jax.eval_shape(lambda: jax.random.key(0)))
  assert restored.step == 15 and restored.data_state == b"\x00grain"
  assert restored.metadata["note"] == "x"
  np.testing.assert_array_equal(restored.state["w"], state["w"])
  assert restored.state["w"].sharding == sharding
  np.testing.assert_array_equal(
    jax.random.key_data(restored.state["key"]), jax.random.key_data(state["key"])
  )
  np.testing.assert_array_equal(
    jax.random.key_data(restored.rng), jax.random.key_data(jax.random.key(15))
  )


def test_schedule_warmup_cosine_floor_and_constant():
  cfg = optimizer_lib.OptimizerSettings(learning_rate=1.0, warmup_steps=10, lr_floor_ratio=0.1)
  schedule = optimizer_lib.learning_rate_schedule(cfg, 110)
  assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(110)) == pytest.approx(0.1)
  assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)
  const = optimizer_lib.learning_rate_schedule(
    optimizer_lib.OptimizerSettings(learning_rate=0.5, schedule="constant"), 9
  )
  assert float(const(5)) == 0.5


def test_mcq_letter_and_scores():
  assert heldout.mcq_letter("Final: C. Going ahead.") == "C"
  assert heldout.mcq_letter("B") == "B"
  assert heldout.mcq_letter("(a) left") == "A"
  assert heldout.mcq_letter("A car is ahead") is None
  assert heldout.mcq_letter("Dangerous") is None
  records = [
    {"capability": b"perception", "question": b"q", "answer": b"Final: B. x"},
    {"capability": b"perception", "question": b"q", "answer": b"Final: A. y"},
    {"capability": b"planning", "question": b"q", "answer": b"Stop."},
  ]
  summary, rows = heldout.score(records, ["B. x", "Final: C", "Stop."])
  assert summary["perception"]["mcq"] == 2 and summary["perception"]["mcq_correct"] == 1
  assert summary["planning"]["mcq_accuracy"] is None
  assert summary["overall"]["mcq_accuracy"] == 0.5
  assert rows[0]["correct"] and not rows[1]["correct"]


def test_distributed_kwargs_from_config():
  explicit = ConfigDict(
    dict(
      coordinator_address="10.0.0.1:1234", num_processes=4, process_id=2, local_device_ids=[0, 1]
    )
  )
  assert distributed.initialize_kwargs(explicit) == {
    "coordinator_address": "10.0.0.1:1234",
    "num_processes": 4,
    "process_id": 2,
    "local_device_ids": [0, 1],
  }
  with pytest.raises(ValueError, match="process_id is required"):
    distributed.initialize_kwargs(
      ConfigDict(dict(coordinator_address="h:1", num_processes=2, process_id=None))
    )
  assert distributed.initialize_kwargs(ConfigDict(dict(coordinator_address=""))) == {}


def test_flops_estimate_matches_hand_count():
  cfg = presets.internvl3("1B")
  text = cfg.text
  per_token = 2 * metrics_lib.decoder_matmul_params(text) + 4 * text.num_layers * 10 * (
    text.num_heads * text.resolved_head_dim
  )
  assert metrics_lib.train_step_flops(text, [], batch_size=1, seq_len=10) == pytest.approx(
    3 * 10 * per_token
  )
  # A teacher adds its forward; more cotangents add backward passes.
  with_teacher = metrics_lib.train_step_flops(
    text, [text], batch_size=2, seq_len=10, num_cotangents=4
  )
  assert with_teacher == pytest.approx(2 * 10 * per_token * (1 + 1 + 8))
  # Qwen2.5-0.5B: ~0.36B matmul weights in the blocks plus the 136M head.
  assert 4.5e8 < metrics_lib.decoder_matmul_params(text) < 5.5e8
  assert metrics_lib.detect_peak_flops(jax.devices()[0]) is None  # CPU: no MFU


def test_checkpoint_keeps_zero_size_arrays(tmp_path):
  """An AGP state without capabilities holds an empty order, which Orbax will not write: it is
  left out on save and comes back, empty and sharded, on restore."""
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  repl = sharding_lib.replicated(mesh)
  state = {"a": jnp.arange(3.0), "order": jnp.zeros((0,), jnp.int32)}
  state = jax.device_put(state, repl)
  with ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False) as checkpointer:
    assert checkpointer.save(1, state, rng=jax.random.key(0), force=True)
    checkpointer.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl), state)
    restored = checkpointer.restore_latest(abstract, jax.eval_shape(lambda: jax.random.key(0)))
  assert restored.state["order"].shape == (0,) and restored.state["order"].dtype == jnp.int32
  assert restored.state["order"].sharding == repl
  np.testing.assert_array_equal(restored.state["a"], [0.0, 1.0, 2.0])
