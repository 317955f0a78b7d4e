"""Per-sample AGP across the data axis: D single-sample micro-steps at once, one per data shard,
give the sequential scan's parameters and optimizer state (8 faked CPU devices); the student's
rematerialisation policies give the same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from drivekd_jax.bench import hlo_stats
from drivekd_jax.distill.signals import DistillConfig
from drivekd_jax.models import presets
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train import step as step_lib
from drivekd_jax.train.experiment import assemble_distillation

IMAGE_ID = presets.TINY_IMAGE_TOKEN_ID
STUDENT = presets.internvl3("tiny")
TEACHER = presets.internvl3("tiny", num_layers=3, hidden_size=96, intermediate_size=192)
BATCH = 16
ACCUM = 8  # two windows per step, each a run of 8 micro-steps
PADDING_ROW, NAN_ROW = 5, 10  # skipped silently, skipped as non-finite
LR = 1e-3
# AdamW turns a gradient entry at round-off level (1e-9 where the true value is 0) into a step of
# ~0.1 lr with the default eps 1e-8, so any reordering of a sum shows in the parameters; a larger
# eps keeps the comparison about the algorithm.
ADAM_EPS = 1e-3


def _batch(seed=0, length=14):
  """16 samples: text, one 4-token image, an answer; one padding row and one NaN image."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 400, size=(BATCH, length)).astype(np.int32)
  ids[:, 2:6] = IMAGE_ID
  labels = np.full((BATCH, length), -100, np.int32)
  labels[:, 8:] = ids[:, 8:]
  pixels = rng.normal(size=(BATCH, 1, 56, 56, 3)).astype(np.float32)
  pixels[NAN_ROW] = np.nan
  example_mask = np.ones(BATCH, bool)
  example_mask[PADDING_ROW] = False
  return {
    "input_ids": ids,
    "labels": labels,
    "attention_mask": np.ones((BATCH, length), bool),
    "image_mask": ids == IMAGE_ID,
    "positions": np.tile(np.arange(length, dtype=np.int32), (BATCH, 1)),
    "pixel_values": pixels,
    "capability": rng.integers(0, 3, size=BATCH).astype(np.int32),
    "example_mask": example_mask,
  }


@pytest.fixture(scope="module")
def models():
  return InternVL(STUDENT, rngs=nnx.Rngs(0)), InternVL(TEACHER, rngs=nnx.Rngs(1))


def _run(models, data_parallel, mesh_shape=None, mode="agp", seed=42):
  """One step (two windows) on the mesh `data x fsdp x 1`, D samples at once: (host state and
  metrics, compiled FLOPs per device)."""
  config = DistillConfig(grad_accum_steps=ACCUM, agp_mode=mode, agp_seed=seed)
  tx = step_lib.make_optimizer(config, LR, eps=ADAM_EPS)
  student, teacher = models
  mesh = rules = None
  if mesh_shape is not None:
    data, fsdp = mesh_shape
    mesh = sharding_lib.make_mesh({"data": data, "fsdp": fsdp, "tensor": 1})
    rules = sharding_lib.rules_from_config()
    student = sharding_lib.shard_module_state(student, mesh, rules)
    teacher = sharding_lib.shard_module_state(teacher, mesh, rules)
  d = assemble_distillation(
    config, student, [teacher], tx, jax.random.key(0), mesh, parallel_samples=data_parallel
  )
  batch = _batch()
  if mesh is None:
    step = jax.jit(d.step_fn)
  else:
    step = step_lib.jit_train_step(
      d.step_fn,
      state_shardings=d.state_shardings,
      batch_shardings={
        k: sharding_lib.batch_sharding(mesh, rules, v.ndim) for k, v in batch.items()
      },
      teacher_shardings=d.teacher_shardings,
      donate=False,
    )
  args = (d.state, batch, jax.random.key(1), d.teacher_states)
  compiled = step.lower(*args).compile()
  state, metrics = compiled(*args)
  return jax.device_get((state, metrics)), hlo_stats.analyze(compiled.as_text()).flops


def _assert_same(got, want):
  """Equal up to float reassociation (of sums over devices and samples)."""

  def close(a, b):
    if jax.dtypes.issubdtype(getattr(a, "dtype", np.float32), jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6)

  jax.tree.map(close, got, want)


@pytest.fixture(scope="module")
def sequential(models):
  return _run(models, 1)


@pytest.fixture(scope="module")
def sequential_pcgrad(models):
  return _run(models, 1, mode="pcgrad")


def _check(run, sequential, data_parallel):
  (state, metrics), flops = run
  (want_state, want_metrics), sequential_flops = sequential
  assert want_metrics["skipped"] == 1 and want_metrics["applied_microsteps"] == BATCH - 2
  _assert_same(state.params, want_state.params)
  _assert_same(state.opt_state, want_state.opt_state)
  _assert_same(state.reweight, want_state.reweight)
  assert int(state.skipped) == 1 and int(state.consecutive_skips) == 0
  _assert_same(metrics, want_metrics)
  # Each data shard computes its own sample: the per-device work (single device: the whole
  # batch) falls as 1/D.
  assert flops <= 1.25 * sequential_flops / data_parallel


@pytest.mark.slow
@pytest.mark.parametrize("data_parallel", [1, 2, 4, 8])
def test_parallel_samples_match_the_sequential_scan(models, sequential, data_parallel):
  run = _run(models, data_parallel, (data_parallel, 8 // data_parallel))
  _check(run, sequential, data_parallel)


@pytest.mark.slow
def test_parallel_samples_draw_the_sequential_orders(models, sequential_pcgrad):
  """With the official AGP these tiny models' merged gradients never conflict in stage 2, so
  the drawn order cannot show there; PCGrad's pairwise projections conflict on most samples
  here, and the result depends on the order (a different seed moves the parameters far
  beyond the tolerance), so equality means every sample drew its sequential order."""
  run = _run(models, 4, (4, 2), mode="pcgrad")
  _check(run, sequential_pcgrad, 4)
  (other, _), _ = _run(models, 1, mode="pcgrad", seed=7)
  want = sequential_pcgrad[0][0].params
  moved = max(
    float(np.abs(np.asarray(a) - np.asarray(b)).max())
    for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(want))
  )
  assert moved > 1e-4


def test_parallel_samples_must_divide_the_window(models):
  config = DistillConfig(grad_accum_steps=ACCUM)
  tx = step_lib.make_optimizer(config, 1e-3)
  d = assemble_distillation(
    config, models[0], [models[1]], tx, jax.random.key(0), parallel_samples=3
  )
  with pytest.raises(ValueError, match="parallel_samples=3 does not divide"):
    jax.eval_shape(d.step_fn, d.state, _batch(), None, d.teacher_states)


@pytest.mark.slow
def test_remat_policies_give_the_same_gradients(models):
  """The stacked weighted gradients of one micro-batch under each `REMAT_POLICIES` entry equal
  those of the plain backward (what they save in memory shows at real lengths: `bench.plan`)."""
  config = DistillConfig(grad_accum_steps=ACCUM)
  tx = step_lib.make_optimizer(config, 1e-3)
  mb = {k: v[:1] for k, v in _batch().items()}
  weights = jnp.asarray([0.7, 1.3, 2.0, 0.5])
  results = {}
  for remat in step_lib.REMAT_POLICIES:
    d = assemble_distillation(config, models[0], [models[1]], tx, jax.random.key(0), remat=remat)
    plan = d.step_fn.plan
    assert plan.remat == remat

    def grads(params, teachers, plan=plan, frozen=d.state.frozen):
      mixing = step_lib.losses.mixing_matrix(plan.config.mixing)
      touts = step_lib._teacher_outputs(plan, teachers, mb)
      return step_lib._weighted_gradients(plan, params, frozen, mb, touts, mixing, weights)[1]

    results[remat] = jax.jit(grads)(d.state.params, d.teacher_states)
  for remat in ("dots", "full"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      results[remat],
      results["none"],
    )


@pytest.mark.slow
def test_memory_saving_model_options_give_the_same_gradients(models):
  """Student and teacher with scanned runs of layers, per-layer remat, query-blocked maps and
  fused attention where no map is read: the stacked weighted gradients of the plain models."""
  import dataclasses

  config = DistillConfig(grad_accum_steps=ACCUM)
  tx = step_lib.make_optimizer(config, 1e-3)
  mb = {k: v[:1] for k, v in _batch().items()}
  weights = jnp.asarray([0.7, 1.3, 2.0, 0.5])
  options = dict(
    scan_layers=True, layer_remat="full", attention_query_block=4, fused_attention=True
  )

  def saving(model, seed):
    cfg = model.config
    other = InternVL(
      dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, **options)), rngs=nnx.Rngs(seed)
    )
    nnx.update(other, nnx.state(model))
    return other

  results = []
  for student, teacher in (models, (saving(models[0], 5), saving(models[1], 6))):
    d = assemble_distillation(config, student, [teacher], tx, jax.random.key(0))
    plan = d.step_fn.plan

    def grads(params, teachers, plan=plan, frozen=d.state.frozen):
      mixing = step_lib.losses.mixing_matrix(plan.config.mixing)
      touts = step_lib._teacher_outputs(plan, teachers, mb)
      return step_lib._weighted_gradients(plan, params, frozen, mb, touts, mixing, weights)

    results.append(jax.jit(grads)(d.state.params, d.teacher_states))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), results[1], results[0]
  )


@pytest.mark.slow
def test_the_compiled_step_does_the_analytic_matmul_work(models, sequential):
  """`bench.plan`'s hand count of a step's matmul FLOPs against the compiled HLO's."""
  from drivekd_jax.bench.plan import analytic_flops

  config = DistillConfig(grad_accum_steps=ACCUM)
  tx = step_lib.make_optimizer(config, 1e-3)
  d = assemble_distillation(config, models[0], [models[1]], tx, jax.random.key(0))
  length = _batch()["input_ids"].shape[1]
  counted = analytic_flops(d.step_fn.plan, STUDENT, [TEACHER], length, 1, BATCH)
  _, hlo_flops = sequential
  assert counted["total"] == pytest.approx(sum(v for k, v in counted.items() if k != "total"))
  assert 0.8 <= hlo_flops / counted["total"] <= 1.25
