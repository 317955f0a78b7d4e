"""The planning tool: HLO statistics with loop trip counts, and the AOT-compiled step's report."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from drivekd_jax import config_files
from drivekd_jax.bench import hlo_stats
from drivekd_jax.bench import plan as plan_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.settings import RunSettings


def _scan_matmuls(steps):
  def f(w, xs):
    return jax.lax.scan(lambda c, x: (c, jnp.tanh(x @ w).sum()), 0.0, xs)[1]

  args = (
    jax.ShapeDtypeStruct((64, 48), jnp.float32),
    jax.ShapeDtypeStruct((steps, 32, 64), jnp.float32),
  )
  return jax.jit(f).lower(*args).compile()


def test_flops_count_every_iteration_of_a_scan():
  stats = hlo_stats.analyze(_scan_matmuls(5).as_text())
  assert stats.flops == 5 * 2 * 32 * 64 * 48
  assert stats.unknown_trip_counts == 0
  # the weight is read once per iteration at least
  assert stats.traffic_bytes >= 5 * 64 * 48 * 4


def test_convolution_flops():
  x = jax.ShapeDtypeStruct((2, 28, 28, 3), jnp.float32)
  k = jax.ShapeDtypeStruct((14, 14, 3, 16), jnp.float32)
  conv = lambda x, k: jax.lax.conv_general_dilated(
    x, k, (14, 14), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  stats = hlo_stats.analyze(jax.jit(conv).lower(x, k).compile().as_text())
  assert stats.flops == 2 * (2 * 2 * 2 * 16) * (14 * 14 * 3)


def test_collective_bytes_of_an_all_reduce():
  mesh = sharding_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
  x = jax.ShapeDtypeStruct((8, 1024), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  total = jax.jit(lambda x: jnp.sum(x, axis=0), out_shardings=NamedSharding(mesh, P()))
  stats = hlo_stats.analyze(total.lower(x).compile().as_text())
  assert stats.collective_bytes >= 1024 * 4
  assert (
    stats.collective_bytes_by_kind["all-reduce"]
    + stats.collective_bytes_by_kind["reduce-scatter"]
    + stats.collective_bytes_by_kind["all-gather"]
    >= 1024 * 4
  )


def _run_plan(*args):
  cmd = [
    sys.executable,
    "-m",
    "drivekd_jax.bench.plan",
    "--config=configs/drivekd/demo.py",
    "--json",
  ]
  root = Path(__file__).resolve().parent.parent
  out = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=1800, cwd=root)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _check_report(report):
  d = report["per_device"]
  for key in ("argument_bytes", "output_bytes", "temp_bytes", "hbm_bytes", "flops"):
    assert d[key] > 0, key
  assert report["flops_per_step"] == pytest.approx(d["flops"] * report["devices"])
  assert report["compile_seconds"] > 0 and report["est_step_seconds"] > 0
  assert 0 < report["est_mfu"] <= 1
  # The step's HLO FLOPs against the XLA cost analysis that sees each loop body once: the
  # micro-batch scan makes ours larger.
  assert d["flops"] > report["xla_cost_analysis_flops"] * 0.5
  assert report["unknown_trip_counts"] == 0


@pytest.mark.slow
def test_plan_compiles_the_demo_step_on_this_cpu():
  report = _run_plan("--topology=cpu", "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  assert report["devices"] == len(jax.devices("cpu"))
  assert report["mesh"]["fsdp"] == report["devices"]
  _check_report(report)
  assert np.isfinite(report["collective_bytes"]) and report["collective_bytes"] > 0


@pytest.mark.slow
@pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='the TPU compiler (libtpu) is not installed: pip install -e ".[tpu]"',
)
def test_plan_compiles_the_demo_step_for_a_tpu_slice():
  report = _run_plan("--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=-1")
  assert report["devices"] == 4 and report["device_kind"] == "TPU v5 lite"
  assert report["per_device"]["hbm_bytes"] == 16 * 1024**3
  assert report["per_device"]["fits"]
  _check_report(report)


_TEMPORARIES_MESSAGE = (
  "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries"
  " (32.74G) exceeds available HBM (15.75G)."
)
_PROGRAM_MESSAGE = (
  "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm."
  " Used 21.60G of 15.75G hbm. Exceeded hbm capacity by 5.85G."
)


def test_out_of_memory_errors_are_read_in_binary_units():
  gib = 1024**3
  temporaries = plan_lib.parse_out_of_memory(_TEMPORARIES_MESSAGE)
  assert temporaries == {
    "required_bytes": pytest.approx(32.74 * gib),
    "hbm_bytes": pytest.approx(15.75 * gib),
    "temp_bytes": pytest.approx(32.74 * gib),
  }
  program = plan_lib.parse_out_of_memory(_PROGRAM_MESSAGE)
  assert program == {
    "required_bytes": pytest.approx(21.6 * gib),
    "hbm_bytes": pytest.approx(15.75 * gib),
    "total_bytes": pytest.approx(21.6 * gib),
  }
  assert plan_lib.parse_out_of_memory("INVALID_ARGUMENT: shapes do not match") is None


@pytest.fixture(scope="module")
def demo_settings():
  config = config_files.load_config(
    str(Path(__file__).resolve().parent.parent / "configs/drivekd/demo.py")
  )
  config.mesh.data, config.mesh.fsdp = 1, -1
  return RunSettings.from_config(config)


def test_one_sample_over_fsdp_splits_its_tokens_not_repeats_them(demo_settings):
  """Micro-batch 1 on an 8-way fsdp mesh: the batch axis cannot be split, so the models put the
  sequence on fsdp (`activation_length`). The devices' FLOPs together then stay near the hand
  count of the step; with every device computing the whole sample they come to about twice it
  (2.1x measured, against 1.14x)."""
  report = plan_lib.plan(demo_settings, "cpu")
  assert report["mesh"]["fsdp"] == len(jax.devices("cpu")) == 8
  assert report["length"] % 8 == 0
  assert report["hlo_over_analytic_flops"] < 1.4


def _refusing_compiler(message):
  def compile_lowered(lowered):
    del lowered
    raise jax.errors.JaxRuntimeError(message)

  return compile_lowered


def test_a_step_xla_cannot_fit_is_reported_not_raised(monkeypatch, demo_settings, capsys):
  monkeypatch.setattr(plan_lib, "compile_lowered", _refusing_compiler(_TEMPORARIES_MESSAGE))
  report = plan_lib.plan(demo_settings, "cpu")
  assert report["fits"] is False and report["per_device"]["fits"] is False
  assert report["per_device"]["required_bytes"] == pytest.approx(32.74 * 1024**3)
  assert report["per_device"]["hbm_bytes"] == pytest.approx(15.75 * 1024**3)
  assert report["flops_per_step"] is None and report["est_mfu"] is None
  assert report["devices"] == len(jax.devices("cpu"))
  assert json.loads(json.dumps(report)) == report
  table = plan_lib.format_table(report)
  assert "temporaries / HBM" in table and "32.74 GiB / 15.75 GiB  DOES NOT FIT" in table

  monkeypatch.setattr(plan_lib, "compile_lowered", _refusing_compiler("INTERNAL: a real bug"))
  with pytest.raises(jax.errors.JaxRuntimeError, match="a real bug"):
    plan_lib.plan(demo_settings, "cpu")


# The shape of XLA:TPU's loops (from a compiled `lax.scan`, trimmed): no `known_trip_count`; the
# condition compares the counter with a constant, unfused.
_TPU_LOOP_TEXT = """HloModule tpu_loop

%body (param: (s32[], f32[32,64], f32[64,48])) -> (s32[], f32[32,64], f32[64,48]) {
  %param = (s32[]{:T(128)}, f32[32,64]{1,0}, f32[64,48]{1,0}) parameter(0)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%param), index=0
  %gte.1 = f32[32,64]{1,0} get-tuple-element(%param), index=1
  %gte.2 = f32[64,48]{1,0} get-tuple-element(%param), index=2
  %dot.1 = f32[32,48]{1,0} dot(%gte.1, %gte.2), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %constant.1 = s32[]{:T(128)} constant(1)
  %add.1 = s32[]{:T(128)} add(%gte.0, %constant.1)
  ROOT %tuple.1 = (s32[]{:T(128)}, f32[32,64]{1,0}, f32[64,48]{1,0}) tuple(%add.1, %gte.1, %gte.2)
}

%condition (param.1: (s32[], f32[32,64], f32[64,48])) -> pred[] {
  %constant.5 = s32[]{:T(128)} constant(BOUND)
  %param.1 = (s32[]{:T(128)}, f32[32,64]{1,0}, f32[64,48]{1,0}) parameter(0)
  %gte.3 = s32[]{:T(128)} get-tuple-element(%param.1), index=0
  ROOT %lt.7 = pred[]{:T(512)} compare(%gte.3, %constant.5), direction=LT, backend_config={}
}

ENTRY %main (x: f32[32,64], w: f32[64,48]) -> f32[32,64] {
  %constant.0 = s32[]{:T(128)} constant(0)
  %x = f32[32,64]{1,0} parameter(0)
  %w = f32[64,48]{1,0} parameter(1)
  %tuple.0 = (s32[]{:T(128)}, f32[32,64]{1,0}, f32[64,48]{1,0}) tuple(%constant.0, %x, %w)
  %while.1 = (s32[]{:T(128)}, f32[32,64]{1,0}, f32[64,48]{1,0}) while(%tuple.0), LOOP
  ROOT %gte.9 = f32[32,64]{1,0} get-tuple-element(%while.1), index=1
}
"""
_TPU_LOOP = _TPU_LOOP_TEXT.replace("LOOP", "condition=%condition, body=%body")


def test_tpu_loops_without_a_known_trip_count_take_their_conditions_bound():
  stats = hlo_stats.analyze(_TPU_LOOP.replace("BOUND", "7"))
  assert "condition=%condition, body=%body" in _TPU_LOOP
  assert stats.flops == 7 * 2 * 32 * 64 * 48
  assert stats.unknown_trip_counts == 0
  # A condition that is not `counter < constant` stays unknown (counted once).
  opaque = _TPU_LOOP.replace("constant(BOUND)", "parameter(1)")
  stats = hlo_stats.analyze(opaque)
  assert stats.unknown_trip_counts == 1 and stats.flops == 2 * 32 * 64 * 48


def _convolution_module(out, lhs, kernel, attrs):
  return f"""HloModule conv

ENTRY %main (a: {lhs}, b: {kernel}) -> {out} {{
  %a = {lhs} parameter(0)
  %b = {kernel} parameter(1)
  ROOT %c = {out} convolution(%a, %b), {attrs}
}}
"""


def test_tpu_batched_products_written_as_windowed_convolutions():
  """XLA:TPU's form of GQA attention scores (from the compiled paper step): batch dimensions as
  windows over a dilated input, one real tap per output. Each output element is one 128-long
  dot product, not one per window position."""
  text = _convolution_module(
    "f32[4,3072,512,7]",
    "bf16[4,3072,128,1]",
    "bf16[512,4,7,128]",
    "window={size=4x7 stride=3x1 pad=0_0x6_6 lhs_dilate=4x1 rhs_reversal=0x1}, "
    "dim_labels=0bf1_o01i->0bf1",
  )
  assert hlo_stats.analyze(text).flops == 2 * (4 * 3072 * 512 * 7) * 128
  # A real 3x3 convolution with padding 1 (the border outputs see fewer real taps).
  text = _convolution_module(
    "f32[1,4,4,8]",
    "f32[1,4,4,2]",
    "f32[3,3,2,8]",
    "window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_01io->b01f",
  )
  taps_per_row = (2 + 3 + 3 + 2) / 4
  assert hlo_stats.analyze(text).flops == pytest.approx(2 * (16 * 8) * 2 * taps_per_row**2)


def test_a_scan_over_stacked_weights_reads_one_slice_per_step():
  """Each iteration slices one `[64, 64]` weight out of the `[16, 64, 64]` stack: the traffic is
  about a slice per step, not the whole stack per step."""
  steps = 16

  def f(stack, x):
    return jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), x, stack)[0]

  args = (
    jax.ShapeDtypeStruct((steps, 64, 64), jnp.float32),
    jax.ShapeDtypeStruct((32, 64), jnp.float32),
  )
  stats = hlo_stats.analyze(jax.jit(f).lower(*args).compile().as_text())
  stack_bytes = steps * 64 * 64 * 4
  assert stats.flops == steps * 2 * 32 * 64 * 64
  assert stack_bytes <= stats.traffic_bytes < steps * stack_bytes / 2
