"""The pure Drive-KD train step on the real InternVL with tiny presets."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from drivekd_jax.distill.signals import DistillConfig
from drivekd_jax.models import presets
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.train import step as step_lib
from drivekd_jax.train.experiment import assemble_distillation

IMAGE_ID = presets.TINY_IMAGE_TOKEN_ID
STUDENT = presets.internvl3("tiny")  # 2 layers, width 64
TEACHER = presets.internvl3("tiny", num_layers=3, hidden_size=96, intermediate_size=192)


def make_batch(seed=0, batch=3, length=18):
  """Text, one 4-token image, a supervised answer; row 1 right-padded by 3 tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 400, size=(batch, length)).astype(np.int32)
  ids[:, 2:6] = IMAGE_ID
  labels = np.full((batch, length), -100, np.int32)
  labels[:, 10:] = ids[:, 10:]
  attn = np.ones((batch, length), bool)
  attn[1, -3:] = False
  labels[1, -3:] = -100
  ids[1, -3:] = 0
  return {
    "input_ids": ids,
    "labels": labels,
    "attention_mask": attn,
    "image_mask": ids == IMAGE_ID,
    "positions": np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
    "pixel_values": rng.normal(size=(batch, 1, 56, 56, 3)).astype(np.float32),
    "capability": np.arange(batch, dtype=np.int32) % 3,
    "example_mask": np.ones(batch, bool),
  }


@pytest.fixture(scope="module")
def models():
  student = InternVL(STUDENT, rngs=nnx.Rngs(0))
  teacher = InternVL(TEACHER, rngs=nnx.Rngs(1))
  return student, nnx.split(teacher)


def _build(config, models, lr=1e-3, student_config=None, seed=0):
  """The step, its initial state and the teacher states; `student_config` swaps in a fresh
  student of that shape (initialised from `seed`) for the shared one."""
  student, (t_graph, t_state) = models
  if student_config is None:
    student_config = STUDENT
  else:
    student = InternVL(student_config, rngs=nnx.Rngs(seed))
  tx = step_lib.make_optimizer(config, lr)
  teacher = nnx.merge(t_graph, t_state)
  distillation = assemble_distillation(config, student, [teacher], tx, jax.random.key(0))
  return distillation.step_fn, distillation.state, distillation.teacher_states


LOSS_WEIGHTS = (0.7, 1.3, 2.0, 0.5)  # distinct per row, so a row mix-up shows


def _plain_loss_vector(plan, frozen, teachers, mb):
  """params -> the loss vector of one unsegmented student forward, the
  reference the step's segmented gradients are checked against."""
  touts = step_lib._teacher_outputs(plan, teachers, mb)
  mixing = step_lib.losses.mixing_matrix(plan.config.mixing)

  def loss_vector(params):
    model = nnx.merge(plan.student_graphdef, params["student"], frozen)
    out = step_lib._model_call(model, mb, plan.student_request)
    ce = step_lib._student_ce(out.logits, mb)
    mixed, _, _ = step_lib._capability_losses(plan, out, mb, touts, mixing, params["aux"])
    return jnp.stack([ce] + mixed)

  return loss_vector


def _check_against_separate_grads(step, state, teachers, weights=LOSS_WEIGHTS, batch=None):
  """The step's stacked weighted gradients vs a vmapped VJP of the plain loss vector and vs one
  `jax.grad` per loss; also the AGP all-zero-leaf rule (the same leaves are exactly zero)."""
  plan = step.plan
  mb = {k: jnp.asarray(v) for k, v in (batch or make_batch()).items()}
  mixing = step_lib.losses.mixing_matrix(plan.config.mixing)
  weights = jnp.asarray(weights)
  n = weights.shape[0]

  @jax.jit
  def run(params):
    fn = _plain_loss_vector(plan, state.frozen, teachers, mb)
    vec, pullback = jax.vjp(fn, params)
    (vmapped,) = jax.vmap(pullback)(jnp.diag(weights))
    separate = [jax.grad(lambda p, i=i: fn(p)[i])(params) for i in range(n)]
    touts = step_lib._teacher_outputs(plan, teachers, mb)
    ours = step_lib._weighted_gradients(plan, params, state.frozen, mb, touts, mixing, weights)
    return vec, vmapped, separate, ours

  vec, vmapped, separate, (our_vec, stacked, _) = run(state.params)
  assert np.all(np.asarray(vec) > 0)
  np.testing.assert_allclose(our_vec, vec, rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(
    a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()) + 1e-12
  )
  jax.tree.map(close, stacked, vmapped)
  for i in range(n):
    jax.tree.map(lambda s, g, i=i: close(s[i], weights[i] * g), stacked, separate[i])
    for s_leaf, g_leaf in zip(jax.tree.leaves(stacked), jax.tree.leaves(separate[i])):
      assert np.any(np.asarray(s_leaf[i])) == np.any(np.asarray(g_leaf))
  return separate


def _layer_grads(grads, layer):
  flat = jax.tree_util.tree_flatten_with_path(grads["student"])[0]
  flat = [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), v) for path, v in flat]
  return [v for path, v in flat if "language_model" in path and "layers" in path and layer in path]


@pytest.mark.slow
def test_stacked_gradients_equal_separate_grads(models):
  config = DistillConfig(microbatch_size=3)
  step, state, teachers = _build(config, models)
  # Two blocks: every capability reads layer 0 (reasoning 0..-2, planning -2), CE the head.
  assert step.plan.segments == ((0, 1), (1, 2)) and step.plan.row_reach == (2, 0, 0, 0)
  separate = _check_against_separate_grads(step, state, teachers)
  top = _layer_grads(separate[1], 1)  # perception never reaches the last block
  assert top and all(float(jnp.abs(v).max()) == 0.0 for v in top)


@pytest.mark.slow
def test_segmented_gradients_on_a_deeper_student(models):
  """Four blocks: perception stops at block 0, reasoning (0..-2) and planning (-2) at block 2,
  CE crosses everything; three segments plus the head."""
  deep = presets.internvl3("tiny", num_layers=4)
  step, state, teachers = _build(
    DistillConfig(microbatch_size=3), models, student_config=deep, seed=4
  )
  assert step.plan.segments == ((0, 1), (1, 3), (3, 4)) and step.plan.row_reach == (3, 0, 1, 1)
  separate = _check_against_separate_grads(step, state, teachers)
  assert all(float(jnp.abs(v).max()) == 0.0 for v in _layer_grads(separate[2], 3))
  assert any(float(jnp.abs(v).max()) > 0.0 for v in _layer_grads(separate[2], 2))


@pytest.mark.slow
def test_segmented_gradients_with_logit_kd_and_hidden_signals(models):
  """Logit KD starts its backward at the head; a hidden-state signal at block 0 also trains its
  learned projection (an `aux` parameter only the loss reaches)."""
  config = DistillConfig.from_config(
    {
      "microbatch_size": 3,
      "signals": {
        "perception": {"kind": "hidden", "start": 0},
        "planning": {"kind": "logit_kl", "temperature": 2.0},
      },
    }
  )
  step, state, teachers = _build(config, models)
  # Rows: CE, perception (hidden, block 0), reasoning (attention, block 0), planning (head).
  assert step.plan.segments == ((0, 1), (1, 2)) and step.plan.row_reach == (2, 0, 0, 2)
  separate = _check_against_separate_grads(step, state, teachers)
  assert float(jnp.abs(separate[1]["aux"]["hidden_proj/perception"]).max()) > 0
  head = separate[3]["student"]["language_model"]["lm_head"]["kernel"]
  assert float(jnp.abs(head).max()) > 0


@pytest.mark.slow
def test_segmented_gradients_with_a_tied_head(models):
  """A tied head (the embedding is also the LM head): the head's CE gradient and the embedding
  lookup's gradients meet in one leaf."""
  tied_cfg = presets.internvl3("tiny", tie_word_embeddings=True)
  step, state, teachers = _build(
    DistillConfig(microbatch_size=3), models, student_config=tied_cfg, seed=3
  )
  separate = _check_against_separate_grads(step, state, teachers)
  embedding = separate[0]["student"]["language_model"]["embed_tokens"]["embedding"]
  assert float(jnp.abs(embedding).max()) > 0


@pytest.mark.slow
def test_training_reduces_every_loss_and_skips_nonfinite(models):
  config = DistillConfig(
    microbatch_size=1,
    grad_accum_steps=1,
    weights=(1e4, 1e4, 1e4),  # attention losses are ~1e-6 on random tiny models
    dynamic_weights=False,
    trainable="llm",
  )
  step, state, teachers = _build(config, models, lr=2e-3)
  jitted = jax.jit(step, donate_argnums=0)
  batch = make_batch()
  vision_before = jax.tree.map(np.asarray, state.frozen)
  history = []
  for i in range(120):
    state, metrics = jitted(state, batch, jax.random.key(i), teachers)
    history.append({k: float(v) for k, v in metrics.items()})
  assert jitted._cache_size() == 1, "the step retraced"
  for name in ("sup", "perception", "reasoning", "planning"):
    first, last = history[0][f"loss/{name}"], history[-1][f"loss/{name}"]
    assert last < 0.8 * first, (name, first, last)
  assert history[-1]["skipped"] == 0 and history[-1]["applied_microsteps"] == 3
  assert "agp/stage1_conflicts" in history[-1]  # AGP reports its diagnostics
  # The vision tower is frozen with trainable="llm".
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen), vision_before)

  # A non-finite micro-batch is skipped and counted; the state does not move.
  bad = dict(batch)
  bad["pixel_values"] = batch["pixel_values"].copy()
  bad["pixel_values"][1] = np.nan
  before = jax.tree.map(np.asarray, state.params)
  state, metrics = jitted(state, bad, jax.random.key(0), teachers)
  assert float(metrics["skipped"]) == 1 and float(metrics["applied_microsteps"]) == 2
  assert int(state.skipped) == 1
  bad["pixel_values"][:] = np.nan
  state, metrics = jitted(state, bad, jax.random.key(0), teachers)
  assert int(state.consecutive_skips) == 3 and float(metrics["skipped"]) == 3
  after_params = jax.tree.map(np.asarray, state.params)
  assert not all(
    np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after_params))
  )  # the two good micro-steps of the first bad batch did update
  # Padding examples are neither applied nor counted as skips.
  pad = dict(batch)
  pad["example_mask"] = np.array([True, False, False])
  state, metrics = jitted(state, pad, jax.random.key(0), teachers)
  assert float(metrics["applied_microsteps"]) == 1 and float(metrics["skipped"]) == 0
  assert int(state.consecutive_skips) == 0
  assert jitted._cache_size() == 1


@pytest.mark.slow
def test_ablation_signals_and_two_teachers(models):
  """Hidden-state MSE (learned projection), logit KL, cosine A_tv; per-capability teachers."""
  student, (t_graph, t_state) = models
  teacher2_cfg = presets.internvl3("tiny", num_layers=4)
  teacher2 = InternVL(teacher2_cfg, rngs=nnx.Rngs(2))
  config = DistillConfig.from_config(
    {
      "teacher_for": (0, 1, 0),
      "grad_accum_steps": 1,
      "signals": {
        "perception": {"kind": "hidden", "start": 0},
        "reasoning": {
          "kind": "attention",
          "map": "text_to_image",
          "start": 0,
          "end": -1,
          "metric": "cosine",
        },
        "planning": {"kind": "logit_kl", "temperature": 2.0},
      },
    }
  )
  tx = step_lib.make_optimizer(config, 1e-3)
  teachers = [nnx.merge(t_graph, t_state), teacher2]
  distillation = assemble_distillation(config, student, teachers, tx, jax.random.key(0))
  state, step = distillation.state, distillation.step_fn
  assert state.params["aux"]["hidden_proj/perception"].shape == (64, 96)
  assert step.plan.teacher_requests[0].hidden_layers == (0,)
  assert step.plan.teacher_requests[1].text_to_image_layers == (0, 1, 2, 3)
  proj_before = np.asarray(state.params["aux"]["hidden_proj/perception"])
  state, metrics = jax.jit(step)(
    state, make_batch(), jax.random.key(0), distillation.teacher_states
  )
  for name in ("sup", "perception", "reasoning", "planning"):
    value = float(metrics[f"loss/{name}"])
    assert np.isfinite(value) and value > 0, (name, value)
  assert float(metrics["applied_microsteps"]) == 3
  assert not np.allclose(proj_before, state.params["aux"]["hidden_proj/perception"])


@pytest.mark.slow
def test_window_accumulation_equals_the_multisteps_chain(models):
  """The step's AGP -> window mean -> AdamW equals `chain(AGP, MultiSteps(AdamW, k))` run once per
  micro-batch on gradients from per-loss `jax.grad`, whether a call holds whole windows (4
  micro-batches, k = 2) or a window spans calls (one micro-batch per call)."""
  config = DistillConfig(microbatch_size=1, grad_accum_steps=2, dynamic_weights=False)
  step, state0, teachers = _build(config, models, lr=1e-3)
  plan, tx = step.plan, step_lib.make_optimizer(config, 1e-3)
  batch = make_batch(seed=5, batch=4)
  weights = plan.reweighter.weights(state0.reweight)

  @jax.jit
  def stacked_grads(params, mb):
    fn = _plain_loss_vector(plan, state0.frozen, teachers, mb)
    grads = [jax.grad(lambda p, i=i: fn(p)[i])(params) for i in range(4)]
    return jax.tree.map(lambda *g: jnp.stack([w * x for w, x in zip(weights, g)]), *grads)

  chain = tx.as_chain()
  params, chain_state = state0.params, chain.init(state0.params)
  update = jax.jit(lambda g, s, p: chain.update(g, s, p, capability_active=jnp.ones(3, bool)))
  for i in range(4):
    mb = {k: jnp.asarray(v[i : i + 1]) for k, v in batch.items()}
    updates, chain_state = update(stacked_grads(params, mb), chain_state, params)
    params = optax.apply_updates(params, updates)

  # AdamW's step is nearly scale-free, so the moments (which are not) check the window mean; a
  # parameter moves by about the learning rate, so 1% of it is the parameter tolerance.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  moments_close = lambda a, b: np.testing.assert_allclose(
    a, b, rtol=1e-4, atol=1e-4 * float(np.abs(b).max()) + 1e-30
  )
  reference_moments = chain_state[1].inner_opt_state
  jitted = jax.jit(step)
  whole, metrics = jitted(jax.tree.map(jnp.copy, state0), batch, jax.random.key(0), teachers)
  assert float(metrics["applied_microsteps"]) == 4
  jax.tree.map(close, whole.params, params)
  jax.tree.map(moments_close, whole.opt_state.inner, reference_moments)
  assert int(whole.opt_state.count) == 0

  spanning = jax.tree.map(jnp.copy, state0)
  for i in range(4):
    one = {k: v[i : i + 1] for k, v in batch.items()}
    spanning, _ = jitted(spanning, one, jax.random.key(i), teachers)
    assert int(spanning.opt_state.count) == (i + 1) % 2
  jax.tree.map(close, spanning.params, params)
  jax.tree.map(moments_close, spanning.opt_state.inner, reference_moments)

  # A non-finite micro-batch adds nothing to its (fixed) window: AdamW on the first window's one
  # applied update, then on the mean of the second window's two.
  bad = {k: np.array(v) for k, v in batch.items()}
  bad["pixel_values"][1] = np.nan
  combine = jax.jit(
    lambda g, s, p: tx.combiner.update(g, s, p, capability_active=jnp.ones(3, bool))
  )
  params, combiner_state = state0.params, tx.combiner.init(state0.params)
  inner_state = tx.inner.init(state0.params)
  for window in ((0,), (2, 3)):
    outs = []
    for i in window:
      mb = {k: jnp.asarray(v[i : i + 1]) for k, v in batch.items()}
      out, combiner_state = combine(stacked_grads(params, mb), combiner_state, params)
      outs.append(out)
    mean = jax.tree.map(lambda *o: sum(o) / len(o), *outs)
    updates, inner_state = tx.inner.update(mean, inner_state, params)
    params = optax.apply_updates(params, updates)
  skipping, metrics = jitted(jax.tree.map(jnp.copy, state0), bad, jax.random.key(0), teachers)
  assert float(metrics["skipped"]) == 1 and float(metrics["applied_microsteps"]) == 3
  jax.tree.map(close, skipping.params, params)
  jax.tree.map(moments_close, skipping.opt_state.inner, inner_state)
