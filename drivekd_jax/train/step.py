"""The pure Drive-KD train step: one student forward, every loss pulled back from it, AGP, update.

`make_train_step(...)` returns `step(state, batch, rng, teacher_states) -> (state, metrics)`, a
pure function to wrap in `jax.jit` with donation and shardings (`jit_train_step`). Teacher
parameters come in as an argument (the trainer's `extra`), so they are inputs of the compiled
program rather than baked-in constants, and they are never part of the `TrainState`.
`bind_teachers(step, teacher_states)` gives the `(state, batch, rng)` form.

Inside, for each micro-batch of `config.microbatch_size` samples (official: 1), in a `lax.scan`:
  1. each teacher runs once, frozen (stop_gradient), materialising only its requested maps;
  2. the student runs once; the loss vector is [L_sup, L_k for each active capability k], where
     L_k is the batch mean of the per-sample loss times the sample's mixing coefficient;
  3. the stacked weighted gradients `[1+K, *param]` (row i: w_i * dL_i/dparams) from that one
     forward: the student is cut into block ranges, each under its own `jax.vjp`, and each loss
     row is pulled back only through the blocks its signal reaches (`_weighted_gradients`);
  4. the combiner (AGP, an optax transformation) turns them into one update, summed over the
     window; a micro-batch with a non-finite loss or gradient is skipped and counted, a
     micro-batch of padding examples only is skipped silently;
  5. every `grad_accum_steps` micro-steps the window closes: the inner chain (AdamW) runs once on
     the mean of its applied micro-steps' updates (`optimizer.DistillOptimizer`, equal to
     `chain(AGP, MultiSteps(AdamW))` when none is skipped), and the dynamic weights update from
     the window's statistics.

With `parallel_samples=D` > 1 (micro-batch 1), D micro-steps run at once under `jax.vmap`, one
sample per data-parallel shard, each with its own gradients and its own AGP; the result is the
sequential one (same drawn orders: sample j's AGP key is the carried key split once per applied
sample before it) up to float reassociation of the window sum. See `parallel_microsteps`.

Batch (numpy or jax): input_ids, labels, attention_mask, image_mask, positions [B, L],
pixel_values [B, M, H, W, 3], capability [B] int32, example_mask [B] bool.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from drivekd_jax.data.batch import BATCH_KEYS
from drivekd_jax.distill import agp as agp_lib
from drivekd_jax.distill import losses
from drivekd_jax.distill import signals as signals_lib
from drivekd_jax.distill.reweight import Reweighter
from drivekd_jax.models import layers as layers_lib
from drivekd_jax.models.config import InternVLConfig
from drivekd_jax.models.layers import REMAT_POLICIES
from drivekd_jax.models.qwen2 import DecoderOutput
from drivekd_jax.train import optimizer as optimizer_lib
from drivekd_jax.train import state as state_lib
from drivekd_jax.train.optimizer import tree_select

LOSS_NAMES = ("sup",) + signals_lib.CAPABILITIES

# What each student segment's pullbacks keep from its forward (`layers.REMAT_POLICIES`); the
# rest is recomputed by every loss row pulled back through the segment. The head (final norm,
# LM head, CE over the vocabulary) keeps nothing under either "dots" or "full".


def reweighter_for(config: signals_lib.DistillConfig) -> Reweighter:
  """The loss-weight policy of a config (static weights of [CE, active capabilities])."""
  static = (config.weight_ce,) + tuple(
    config.weights[signals_lib.CAPABILITIES.index(c)] for c in config.active
  )
  return Reweighter(
    static=static,
    enabled=config.dynamic_weights,
    lr=config.reweight_lr,
    alpha=config.reweight_alpha,
    eps=config.reweight_eps,
    w_min=config.reweight_min,
    w_max=config.reweight_max,
    min_ce=config.reweight_min_ce,
  )


def gradient_combiner(config: signals_lib.DistillConfig) -> optax.GradientTransformation:
  """The AGP transformation (in `config.agp_mode`) over the stacked `[1+K, ...]` gradients."""
  return agp_lib.asymmetric_gradient_projection(
    mode=config.agp_mode, seed=config.agp_seed, num_capabilities=len(config.active)
  )


def make_optimizer(
  config: signals_lib.DistillConfig,
  learning_rate: float = 5e-5,
  *,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
) -> optimizer_lib.DistillOptimizer:
  """AGP, then AdamW on the mean of every `grad_accum_steps` micro-steps, with the official
  defaults (docs/drivekd_method.md §3.5): the trainer's builder with a constant learning rate and
  no clipping."""
  settings = optimizer_lib.OptimizerSettings(
    learning_rate=learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    weight_decay=weight_decay,
    schedule="constant",
    grad_clip_norm=0.0,
    accumulation_steps=config.grad_accum_steps,
  )
  tx, _ = optimizer_lib.build_distill_optimizer(
    settings, config.grad_accum_steps, gradient_combiner(config)
  )
  return tx


def init_train_state(
  config: signals_lib.DistillConfig,
  student: nnx.Module,
  tx: optimizer_lib.DistillOptimizer,
  rng: jax.Array,
  teacher_configs: Sequence[InternVLConfig] = (),
) -> tuple[Any, state_lib.TrainState]:
  """Splits the student and builds the initial `TrainState`.

  Hidden-state signals whose student and teacher widths differ get a learned projection
  `aux["hidden_proj/<capability>"]` `[D_s, D_t]` (LeCun-normal init from `rng`).

  Returns:
    (student graphdef, state).
  """
  graphdef, params, frozen = state_lib.split_student(student, config.trainable)
  aux = {}
  d_s = student.config.text.hidden_size
  for cap in config.active:
    if config.signal(cap).kind != "hidden":
      continue
    d_t = teacher_configs[config.teacher_index(cap)].text.hidden_size
    if d_t != d_s:
      key = jax.random.fold_in(rng, signals_lib.CAPABILITIES.index(cap))
      aux[f"hidden_proj/{cap}"] = jax.random.normal(key, (d_s, d_t), jnp.float32) / d_s**0.5
  state = state_lib.create_train_state(
    params={"student": params, "aux": aux},
    frozen=frozen,
    tx=tx,
    reweight=reweighter_for(config).init(),
    rng=jax.random.fold_in(rng, 1_000_003),
  )
  return graphdef, state


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Static facts the step closes over."""

  config: signals_lib.DistillConfig
  student_graphdef: Any
  teacher_graphdefs: tuple[Any, ...]
  student_request: Any
  teacher_requests: tuple[Any, ...]
  teacher_logits: tuple[bool, ...]
  resolved: tuple[signals_lib.ResolvedSignal, ...]
  reweighter: Reweighter
  # The student's block ranges, each differentiated on its own, and the segment each loss row
  # starts its backward from (`len(segments)`: the head). See `_weighted_gradients`.
  segments: tuple[tuple[int, int], ...]
  row_reach: tuple[int, ...]
  logits_signal: bool  # a logit-KD signal reads the student logits
  remat: str = "none"  # see REMAT_POLICIES


def _signal_loss(sig: signals_lib.ResolvedSignal, student_out, teacher_out, mb, aux):
  """Per-sample loss `[b]` of one capability signal."""
  spec = sig.signal
  attn = mb["attention_mask"].astype(bool)
  if spec.kind == "logit_kl":
    return losses.logit_kl(
      student_out.logits, teacher_out.logits, mb["labels"], attn, spec.temperature
    )
  if spec.kind == "hidden":
    ((s_layer, (t_layer,)),) = sig.windows
    proj = aux.get(f"hidden_proj/{sig.capability}")
    return losses.hidden_mse(
      student_out.hidden_states[s_layer], teacher_out.hidden_states[t_layer], attn, proj
    )
  if spec.map == "full":
    return losses.grouped_full_map_loss(
      student_out.full_maps, teacher_out.full_maps, sig.windows, attn, spec.metric
    )
  image_mask = mb["image_mask"].astype(bool)
  query = losses.text_query_mask(image_mask, attn)
  per_layer = []
  for s_layer, t_layers in sig.windows:
    s_map = student_out.text_to_image_maps[s_layer]
    t_map = sum(teacher_out.text_to_image_maps[t] for t in t_layers) / float(len(t_layers))
    keys = losses.image_key_valid(image_mask, s_map.shape[-1])
    fn = losses.text_to_image_mse if spec.metric == "mse" else losses.text_to_image_cosine
    per_layer.append(fn(s_map, t_map, query, keys))
  return sum(per_layer) / float(len(per_layer))


def _model_call(model, mb, request):
  return model(
    mb["input_ids"],
    mb["pixel_values"],
    attention_mask=mb["attention_mask"].astype(bool),
    positions=mb["positions"],
    maps=request,
  )


def _teacher_outputs(plan: _Plan, teacher_states, mb):
  outs = []
  for i, graphdef in enumerate(plan.teacher_graphdefs):
    request = plan.teacher_requests[i]
    if request.empty and not plan.teacher_logits[i]:
      outs.append(None)
      continue
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_states[i]))
    outs.append(jax.lax.stop_gradient(_model_call(teacher, mb, request)))
  return outs


def _capability_losses(plan: _Plan, out, mb, teacher_outs, mixing, aux):
  """Lists of (mixed L_k, raw L_k, effective mixing coefficient) over the active signals."""
  ex = mb["example_mask"].astype(bool)
  mixed, raw, mix_eff = [], [], []
  rows = mixing[mb["capability"]]
  for sig in plan.resolved:
    per_sample = _signal_loss(sig, out, teacher_outs[sig.teacher], mb, aux)
    column = rows[:, signals_lib.CAPABILITIES.index(sig.capability)]
    mixed.append(losses.masked_batch_mean(per_sample, column, ex))
    raw.append(losses.masked_batch_mean(per_sample, None, ex))
    mix_eff.append(losses.masked_batch_mean(column, None, ex))
  return mixed, raw, mix_eff


def _student_ce(logits, mb):
  ex = mb["example_mask"].astype(bool)
  return losses.cross_entropy(logits, mb["labels"], mb["attention_mask"].astype(bool), ex)


def _weighted_gradients(plan: _Plan, params, frozen, mb, teacher_outs, mixing, weights):
  """The loss vector, the stacked weighted gradients `[1+K, *param]` and the aux of the step.

  Row i of the stack is `weights[i] * d(loss_i)/d(params)`, each row pulled back only through
  the part of the student its loss reaches (the PyTorch autograd behaviour the official code
  relies on). The student runs forward once, cut into `plan.segments` (consecutive block ranges,
  the first also holding the embeddings and the vision tower) plus the head (final norm, LM head,
  CE), each range under its own `jax.vjp`. A row starts its backward at the segment holding the
  deepest layer its loss reads (the head for CE and logit KD) and walks down from there: the
  perception row (first-layer maps) crosses one block, not the whole decoder, and only CE
  crosses the `[L, D] x [D, V]` head. In its starting segment a row pulls back the segment's
  signals alone, so the last block's MLP and value path (which only feed the segment's output)
  are skipped too. The rows are pulled back one after the other rather than vmapped, so every
  weight gradient comes out in its own layout (a vmapped pullback batches the rows into the
  middle of each weight-gradient product and pays for transposes).

  Returns:
    (vec `[1+K]`, stacked gradients, (raw `[1+K]`, mix_eff `[1+K]`)).
  """
  model = nnx.merge(plan.student_graphdef, params["student"], frozen)
  attn = mb["attention_mask"].astype(bool)
  ctx = model.language_model.layer_context(attn, mb["positions"])
  keys = None
  if plan.student_request.text_to_image_layers:
    keys = model.map_key_positions(mb["input_ids"], mb["pixel_values"])

  def segment(index):
    start, stop = plan.segments[index]

    def run(p, x):
      student = nnx.merge(plan.student_graphdef, p["student"], frozen)
      if x is None:
        x = student.embed_inputs(mb["input_ids"], mb["pixel_values"])
      out = student.language_model.run_layers(
        x, ctx, range(start, stop), maps=plan.student_request, image_key_positions=keys
      )
      return out.hidden, (out.full_maps, out.text_to_image_maps, out.hidden_states)

    return run

  def head(p, hidden):
    decoder = nnx.merge(plan.student_graphdef, p["student"], frozen).language_model
    logits = decoder.head(hidden)
    return _student_ce(logits, mb), (logits if plan.logits_signal else None)

  def capability_losses(p, signals, logits):
    full, t2i, hidden = {}, {}, {}
    for seg_full, seg_t2i, seg_hidden in signals:
      full.update(seg_full)
      t2i.update(seg_t2i)
      hidden.update(seg_hidden)
    out = DecoderOutput(logits=logits, full_maps=full, text_to_image_maps=t2i, hidden_states=hidden)
    mixed, raw, mix_eff = _capability_losses(plan, out, mb, teacher_outs, mixing, p["aux"])
    return jnp.stack(mixed), (jnp.stack(raw), jnp.stack(mix_eff))

  policy = REMAT_POLICIES[plan.remat]
  if plan.remat != "none":
    head = jax.checkpoint(head, policy=REMAT_POLICIES["full"])
  pullbacks, signal_pullbacks, signals, outputs = [], {}, [], []
  x = None
  for index in range(len(plan.segments)):
    run = segment(index)
    if plan.remat != "none":
      run = jax.checkpoint(run, policy=policy)
    x_in = x
    if x_in is None:
      (x, sig), pullback = jax.vjp(lambda p, run=run: run(p, None), params)
    else:
      (x, sig), pullback = jax.vjp(run, params, x_in)
    if index in plan.row_reach:
      # Rows that stop in this segment read its signals only: a pullback of the signals alone
      # skips what only the segment's output needs (the last block's MLP and value path). XLA
      # merges its forward with the one above.
      signals_only = lambda p, x, run=run: run(p, x)[1]
      if x_in is None:
        only = signals_only
        _, signal_pullbacks[index] = jax.vjp(lambda p, only=only: only(p, None), params)
      else:
        _, signal_pullbacks[index] = jax.vjp(signals_only, params, x_in)
    pullbacks.append(pullback)
    signals.append(sig)
    outputs.append(x)
  (ce, logits), head_pullback = jax.vjp(head, params, x)

  num_caps = len(plan.resolved)
  one = jnp.ones((1,), jnp.float32)
  if num_caps:
    cap_vec, loss_pullback, (raw, mix_eff) = jax.vjp(
      capability_losses, params, signals, logits, has_aux=True
    )
    vec = jnp.concatenate([ce[None], cap_vec])
    aux = (jnp.concatenate([ce[None], raw]), jnp.concatenate([one, mix_eff]))
  else:
    vec, aux = ce[None], (ce[None], one)

  zeros_like = lambda tree: jax.tree.map(jnp.zeros_like, tree)
  rows = []
  for row in range(1 + num_caps):
    top = plan.row_reach[row]
    if row == 0:
      grads, d_x = head_pullback((weights[0], None if logits is None else zeros_like(logits)))
      d_signals = zeros_like(signals)
    else:
      cotangent = jnp.zeros((num_caps,), jnp.float32).at[row - 1].set(weights[row])
      grads, d_signals, d_logits = loss_pullback(cotangent)
      if top == len(plan.segments):  # logit KD reads the head
        head_grads, d_x = head_pullback((jnp.zeros_like(ce), d_logits))
        grads = jax.tree.map(jnp.add, grads, head_grads)
      else:
        d_x = None
    for index in range(min(top, len(plan.segments) - 1), -1, -1):
      if d_x is None:  # the row's deepest segment: its signals only
        outs = signal_pullbacks[index](d_signals[index])
        seg_grads, d_x = outs if index else (outs[0], None)
      elif index == 0:
        (seg_grads,) = pullbacks[0]((d_x, d_signals[0]))
      else:
        seg_grads, d_x = pullbacks[index]((d_x, d_signals[index]))
      grads = jax.tree.map(jnp.add, grads, seg_grads)
    rows.append(grads)
  stacked = jax.tree.map(lambda *r: jnp.stack(r), *rows)
  return vec, stacked, aux


def _row_reach(resolved, num_layers: int) -> tuple[int, ...]:
  """The deepest block each loss row reads (`num_layers` meaning the head): CE first, then the
  capability signals in order."""
  depth = []
  for r in resolved:
    if r.signal.kind == "logit_kl":
      depth.append(num_layers)
    else:
      depth.append(max(s for s, _ in r.windows))
  return (num_layers,) + tuple(depth)


def _segments(depths, num_layers: int):
  """Consecutive block ranges `[start, stop)` cut after every depth a loss stops at, and each
  row's starting segment (`len(segments)` for the head)."""
  stops = sorted({d + 1 for d in depths if d < num_layers} | {num_layers})
  segments = tuple(zip([0] + stops[:-1], stops))
  reach = tuple(
    len(segments) if d == num_layers else next(i for i, (_, e) in enumerate(segments) if d < e)
    for d in depths
  )
  return segments, reach


def _slot_sq_norms(stacked):
  """Σ over leaves of the squared norm of each of the 1+K slices, fp32 `[1+K]`."""
  total = 0.0
  for g in jax.tree.leaves(stacked):
    g = g.astype(jnp.float32)
    total = total + jnp.sum(jnp.square(g), axis=tuple(range(1, g.ndim)))
  return total


def _agp_state(opt_state):
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, agp_lib.AGPState))
    if isinstance(s, agp_lib.AGPState)
  ]
  return found[0] if found else None


def make_train_step(
  config: signals_lib.DistillConfig,
  *,
  student_graphdef: Any,
  student_config: InternVLConfig,
  teacher_graphdefs: Sequence[Any],
  teacher_configs: Sequence[InternVLConfig],
  tx: optimizer_lib.DistillOptimizer,
  parallel_samples: int = 1,
  mesh: jax.sharding.Mesh | None = None,
  remat: str = "none",
  activation_placement: layers_lib.Placement | None = None,
) -> Callable[..., tuple[state_lib.TrainState, dict[str, jax.Array]]]:
  """Builds the pure Drive-KD step.

  Args:
    config: the `DistillConfig`.
    student_graphdef: from `init_train_state` (or `state_lib.split_student`).
    student_config, teacher_configs: model configs (layer counts resolve the layer specs).
    teacher_graphdefs: one per teacher (`nnx.split(teacher)[0]`); `config.teacher_for` maps
      capabilities to them.
    tx: the `DistillOptimizer` (`make_optimizer`, or the trainer's `build_distill_optimizer`
      with AGP as the combiner); its accumulation must equal `config.grad_accum_steps`. The
      combiner receives the extra argument `capability_active` (bool `[K]`).
    parallel_samples: D, micro-batches run at once (`parallel_microsteps`); 1 is the
      sequential scan. D > 1 needs `microbatch_size` 1 and AGP (or no combiner state) and D
      dividing every run of micro-batches between window boundaries.
    mesh: with D > 1, the D samples of a group are placed one per shard of its "data" axis
      (whose size should be D).
    remat: what the student's backward keeps ("none", "dots", "full"; `REMAT_POLICIES`).
    activation_placement: where the models pin their activations while the step is traced
      (`models.layers.activation_sharding`; `sharding.activation_placement` of the mesh and
      rules), or None to leave them to the compiler.

  Returns:
    `step(state, batch, rng, teacher_states) -> (state, metrics)`; `teacher_states` is a tuple
    of `nnx.State`, one per teacher graphdef. `rng` is accepted for the trainer's interface but
    not needed: the step draws nothing itself (AGP's order comes from the key carried in its own
    optax state); `state.rng` is advanced once per step for the trainer's use.
  """
  if len(teacher_graphdefs) != len(teacher_configs):
    raise ValueError("one teacher config per teacher graphdef is needed")
  if config.active and config.num_teachers > len(teacher_graphdefs):
    raise ValueError(
      f"config.teacher_for uses {config.num_teachers} teachers; {len(teacher_graphdefs)} given"
    )
  if not isinstance(tx, optimizer_lib.DistillOptimizer):
    raise TypeError(f"tx must be a DistillOptimizer (train.optimizer), got {type(tx).__name__}")
  if tx.accumulation != config.grad_accum_steps:
    raise ValueError(
      f"the optimizer accumulates {tx.accumulation} micro-steps but "
      f"config.grad_accum_steps={config.grad_accum_steps}"
    )
  if parallel_samples < 1:
    raise ValueError(f"parallel_samples={parallel_samples} must be >= 1")
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of {tuple(REMAT_POLICIES)}")
  if parallel_samples > 1 and config.microbatch_size != 1:
    raise ValueError(
      f"parallel_samples={parallel_samples} runs per-sample AGP in parallel and needs "
      f"microbatch_size 1, got {config.microbatch_size}"
    )
  t_layers = tuple(c.text.num_layers for c in teacher_configs)
  s_layers = student_config.text.num_layers
  student_request, teacher_requests = signals_lib.map_requests(config, s_layers, t_layers)
  logits_needed = signals_lib.needs_teacher_logits(config)
  resolved = signals_lib.resolve_signals(config, s_layers, t_layers)
  segments, row_reach = _segments(_row_reach(resolved, s_layers), s_layers)
  plan = _Plan(
    config=config,
    student_graphdef=student_graphdef,
    teacher_graphdefs=tuple(teacher_graphdefs),
    student_request=student_request,
    teacher_requests=teacher_requests,
    teacher_logits=tuple(
      logits_needed[i] if i < len(logits_needed) else False for i in range(len(t_layers))
    ),
    resolved=resolved,
    reweighter=reweighter_for(config),
    segments=segments,
    row_reach=row_reach,
    logits_signal=any(r.signal.kind == "logit_kl" for r in resolved),
    remat=remat,
  )
  num_losses = 1 + len(plan.resolved)
  names = ("sup",) + tuple(r.capability for r in plan.resolved)
  accum = config.grad_accum_steps
  micro = config.microbatch_size

  def microstep(carry, mb, params, frozen, teacher_states, mixing):
    """One micro-batch: gradients, the combiner, and the window's running sum.

    `carry` holds the optimizer state without its inner (AdamW) part, which only the window's
    close reads, so that it stays a loop constant of the scan.
    """
    window, rw, skipped, in_row = carry
    teacher_outs = _teacher_outputs(plan, teacher_states, mb)
    weights = jax.lax.stop_gradient(plan.reweighter.weights(rw))
    vec, stacked, (raw, mix_eff) = _weighted_gradients(
      plan, params, frozen, mb, teacher_outs, mixing, weights
    )
    active = mix_eff[1:] > 0
    update, new_combiner = tx.combine(stacked, window, params, capability_active=active)
    # The per-row squared norms: AGP has them (its Gram diagonal); another combiner needs a pass.
    agp_state = _agp_state(new_combiner)
    sq = _slot_sq_norms(stacked) if agp_state is None else agp_state.sq_norms
    finite = jnp.all(jnp.isfinite(vec)) & jnp.all(jnp.isfinite(sq))
    valid = jnp.any(mb["example_mask"])
    apply = valid & finite
    # Un-weighted, un-mixed gradient norms scaled by 1/accum (the official reweighting input).
    present = jnp.concatenate([jnp.ones((1,), bool), active])
    raw_norm = jnp.sqrt(sq + 1e-20) / weights / jnp.where(mix_eff > 0, mix_eff, 1.0) / accum
    new_rw = plan.reweighter.accumulate(rw, raw, raw_norm, present)
    bad = valid & ~finite
    carry = (
      tx.accumulate(window, update, new_combiner, apply),
      tree_select(apply, new_rw, rw),
      skipped + bad.astype(jnp.int32),
      jnp.where(bad, in_row + 1, jnp.where(apply, 0, in_row)),
    )
    safe = lambda x: jnp.where(apply, x, 0.0)
    out = {
      "applied": apply.astype(jnp.float32),
      "skipped": bad.astype(jnp.float32),
      "loss": safe(jnp.sum(weights * vec)),
      "raw": jax.tree.map(safe, raw),
      "grad_norm": safe(raw_norm * accum),
      "weights": weights,
    }
    return carry, out

  data_parallel = parallel_samples
  group_sharding = None
  if mesh is not None and data_parallel > 1:
    group_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))

  def parallel_microsteps(carry, group, params, frozen, teacher_states, mixing):
    """D micro-batches of one sample at once (`group`: leading axis D), equal to D `microstep`s.

    Each sample gets its own gradients and its own AGP (own Gram matrices, own drawn order)
    under `jax.vmap`, its axis placed on the mesh's "data" axis, so each data shard computes one
    sample while FSDP/tensor sharding splits the parameters over the rest. The AGP key of sample
    j is the one the sequential scan would hand it: the carried key split once per applied
    sample before it (a skipped sample leaves the combiner state, key included, unchanged), so
    the drawn orders are the sequential ones. Applying needs the sample's loss and gradient to be
    finite, read here from its own squared gradient norms before AGP runs. The window sum adds
    the D updates as one reduction over the data axis (float reassociation only); the combiner
    state, dynamic-weight statistics and skip counters then move as the D steps would in order.
    """
    window, rw, skipped, in_row = carry
    if group_sharding is not None:
      group = jax.lax.with_sharding_constraint(group, group_sharding)
    weights = jax.lax.stop_gradient(plan.reweighter.weights(rw))

    def gradients(mb):
      teacher_outs = _teacher_outputs(plan, teacher_states, mb)
      vec, stacked, aux = _weighted_gradients(
        plan, params, frozen, mb, teacher_outs, mixing, weights
      )
      return vec, stacked, aux, _slot_sq_norms(stacked)

    # Constraints inside (the models' activations) keep the sample axis on "data".
    spmd_axis = "data" if group_sharding is not None else None
    vec, stacked, (raw, mix_eff), sq_in = jax.vmap(gradients, spmd_axis_name=spmd_axis)(group)
    active = mix_eff[:, 1:] > 0
    finite = jnp.all(jnp.isfinite(vec), axis=1) & jnp.all(jnp.isfinite(sq_in), axis=1)
    valid = jnp.any(group["example_mask"], axis=tuple(range(1, group["example_mask"].ndim)))
    apply = valid & finite
    bad = valid & ~finite

    combiner = window.combiner
    keyed = isinstance(combiner, agp_lib.AGPState)
    if keyed:
      chain = [combiner.key]
      for _ in range(data_parallel):
        chain.append(jax.random.split(chain[-1])[0])
      applied_before = jnp.cumsum(apply.astype(jnp.int32)) - apply.astype(jnp.int32)
      keys = jnp.stack(chain)[applied_before]
    elif jax.tree.leaves(combiner):
      raise ValueError(
        "parallel_samples > 1 needs the AGP combiner (or a stateless one); got state "
        f"{type(combiner).__name__}"
      )
    else:
      keys = jnp.zeros((data_parallel,), jnp.int32)

    def combine(stacked_one, key, active_one):
      own = window._replace(combiner=combiner._replace(key=key) if keyed else combiner)
      return tx.combine(stacked_one, own, params, capability_active=active_one)

    updates, combined = jax.vmap(combine)(stacked, keys, active)
    sq = combined.sq_norms if keyed else sq_in
    present = jnp.concatenate([jnp.ones((data_parallel, 1), bool), active], axis=1)
    raw_norm = jnp.sqrt(sq + 1e-20) / weights / jnp.where(mix_eff > 0, mix_eff, 1.0) / accum
    for j in range(data_parallel):
      take = lambda tree, j=j: jax.tree.map(lambda x: x[j], tree)
      combiner = tree_select(apply[j], take(combined), combiner)
      new_rw = plan.reweighter.accumulate(rw, raw[j], raw_norm[j], present[j])
      rw = tree_select(apply[j], new_rw, rw)
      skipped = skipped + bad[j].astype(jnp.int32)
      in_row = jnp.where(bad[j], in_row + 1, jnp.where(apply[j], 0, in_row))

    def add(total, update):
      mask = apply.reshape((data_parallel,) + (1,) * (update.ndim - 1))
      return total + jnp.sum(jnp.where(mask, update, 0), axis=0).astype(total.dtype)

    # DistillOptimizer.accumulate for D micro-steps at once.
    window = window._replace(
      combiner=combiner,
      accumulated=jax.tree.map(add, window.accumulated, updates),
      count=window.count + data_parallel,
      applied=window.applied + jnp.sum(apply.astype(jnp.int32)),
    )
    safe = lambda x: jnp.where(apply.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0.0)
    out = {
      "applied": apply.astype(jnp.float32),
      "skipped": bad.astype(jnp.float32),
      "loss": safe(jnp.sum(weights * vec, axis=1)),
      "raw": safe(raw),
      "grad_norm": safe(raw_norm * accum),
      "weights": jnp.broadcast_to(weights, vec.shape),
    }
    return (window, rw, skipped, in_row), out

  def chunk(carry, mbs, teacher_states, mixing):
    """A run of micro-batches that no window boundary cuts, then the window check.

    The parameters and the inner optimizer state are loop constants of the micro-batch scan;
    only the combiner state and the running sum move. Chunks divide `accum`, so every window
    closes on a chunk end (`DistillOptimizer.close_window`); the dynamic weights update on the
    same windows.
    """
    params, opt_state, rw, skipped, in_row, frozen = carry
    run = microstep if data_parallel == 1 else parallel_microsteps
    body = lambda c, mb: run(c, mb, params, frozen, teacher_states, mixing)
    (window, rw, skipped, in_row), out = jax.lax.scan(
      body, (opt_state._replace(inner=None), rw, skipped, in_row), mbs
    )
    params, opt_state, closed = tx.close_window(window._replace(inner=opt_state.inner), params)
    rw = tree_select(closed, plan.reweighter.update(rw), rw)
    return (params, opt_state, rw, skipped, in_row, frozen), out

  def step(state: state_lib.TrainState, batch, rng, teacher_states=()):
    with layers_lib.activation_sharding(activation_placement):
      return traced_step(state, batch, rng, teacher_states)

  def traced_step(state, batch, rng, teacher_states):
    del rng  # Deterministic given the state: AGP draws its order from its own carried key.
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
      raise ValueError(f"train batch is missing fields {missing}")
    b = batch["input_ids"].shape[0]
    if b % micro:
      raise ValueError(f"batch size {b} is not a multiple of microbatch_size {micro}")
    n_micro = b // micro
    # Chunks of gcd(micro-batches, accum): every window boundary falls on a chunk end.
    per_chunk = math.gcd(n_micro, accum)
    if per_chunk % data_parallel:
      raise ValueError(
        f"parallel_samples={data_parallel} does not divide the {per_chunk} micro-batches "
        f"between window boundaries (batch {b}, grad_accum_steps {accum})"
      )
    # Groups of D micro-batches run at once; D = 1 is the sequential scan.
    lead = (n_micro // per_chunk, per_chunk)
    if data_parallel > 1:
      lead = (n_micro // per_chunk, per_chunk // data_parallel, data_parallel)
    split = {
      k: jnp.asarray(batch[k]).reshape(lead + (micro,) + tuple(batch[k].shape[1:]))
      for k in BATCH_KEYS
    }
    mixing = losses.mixing_matrix(config.mixing, config.other_row)
    teacher_states = tuple(teacher_states)
    if len(teacher_states) != len(plan.teacher_graphdefs):
      raise ValueError(
        f"step got {len(teacher_states)} teacher states for {len(plan.teacher_graphdefs)} teachers"
      )
    carry = (
      state.params,
      state.opt_state,
      state.reweight,
      state.skipped,
      state.consecutive_skips,
      state.frozen,
    )
    body = lambda c, mbs: chunk(c, mbs, teacher_states, mixing)
    carry, per_micro = jax.lax.scan(body, carry, split)
    per_micro = jax.tree.map(lambda x: x.reshape((n_micro,) + x.shape[len(lead) :]), per_micro)
    params, opt_state, rw, skipped, in_row, _ = carry
    new_state = state.replace(
      step=state.step + 1,
      params=params,
      opt_state=opt_state,
      reweight=rw,
      skipped=skipped,
      consecutive_skips=in_row,
      rng=jax.random.split(state.rng)[0],
    )
    n_applied = jnp.sum(per_micro["applied"])
    denom = jnp.maximum(n_applied, 1.0)
    metrics = {
      "loss": jnp.sum(per_micro["loss"]) / denom,
      "skipped": jnp.sum(per_micro["skipped"]),
      "consecutive_skips": in_row.astype(jnp.float32),
      "applied_microsteps": n_applied,
    }
    for i, name in enumerate(names):
      metrics[f"loss/{name}"] = jnp.sum(per_micro["raw"][:, i]) / denom
      metrics[f"grad_norm/{name}"] = jnp.sum(per_micro["grad_norm"][:, i]) / denom
      metrics[f"weight/{name}"] = per_micro["weights"][-1, i]
    agp_state = _agp_state(opt_state)
    if agp_state is not None and num_losses > 1:
      metrics.update(agp_lib.agp_diagnostics(agp_state, names))
    return new_state, metrics

  step.plan = plan
  return step


def bind_teachers(step, teacher_states) -> Callable:
  """The `(state, batch, rng) -> (state, metrics)` form with the teachers bound.

  Under `jax.jit` bound teacher arrays become constants of the program; for large teachers pass
  them as the fourth argument instead (`jit_train_step`).
  """
  teacher_states = tuple(teacher_states)
  return lambda state, batch, rng: step(state, batch, rng, teacher_states)


def jit_train_step(
  step,
  *,
  state_shardings=None,
  batch_shardings=None,
  teacher_shardings=None,
  donate: bool = True,
):
  """`jax.jit` of the step with the state donated and, when all given, explicit shardings."""
  kwargs = {"donate_argnums": (0,) if donate else ()}
  if state_shardings is not None and batch_shardings is not None:
    kwargs["in_shardings"] = (state_shardings, batch_shardings, None, teacher_shardings)
    kwargs["out_shardings"] = (state_shardings, None)
  return jax.jit(step, **kwargs)
