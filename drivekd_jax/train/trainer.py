"""The Drive-KD trainer: `run(config, workdir)` for `task = "drivekd.train"`.

Phases: mesh and rules -> data (synthetic data generated into the workdir when the config asks)
-> student born sharded, teachers sharded by the same rules and frozen -> optimizer (AGP ->
MultiSteps(clip -> AdamW with warmup-cosine)) -> train state -> restore the latest checkpoint ->
jitted, donated, non-finite-guarded step loop with metrics, checkpoints and SIGTERM handling ->
final checkpoint -> evaluation summary.

`train_loop` is the model-agnostic core; `run` wires the Drive-KD pieces into it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train import sharding as sharding_lib


class NonFiniteError(RuntimeError):
  """Raised when too many consecutive steps produced a non-finite loss or state."""


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------


def learning_rate_schedule(opt_config: Any, num_optimizer_steps: int) -> optax.Schedule:
  """Linear warmup then cosine decay to `lr_floor_ratio * learning_rate` (or constant).

  Config keys: learning_rate, warmup_steps, schedule ("cosine" | "constant"), lr_floor_ratio,
  decay_steps (0: the whole run). Steps count optimizer updates (after accumulation).
  """
  peak = float(opt_config.learning_rate)
  warmup = int(opt_config.get("warmup_steps", 0))
  kind = opt_config.get("schedule", "cosine")
  if kind == "constant":
    if warmup:
      return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
      )
    return optax.constant_schedule(peak)
  if kind != "cosine":
    raise ValueError(f"config.optimizer.schedule={kind!r}; expected 'cosine' or 'constant'")
  decay = int(opt_config.get("decay_steps", 0)) or max(num_optimizer_steps, warmup + 1)
  floor = peak * float(opt_config.get("lr_floor_ratio", 0.01))
  return optax.warmup_cosine_decay_schedule(
    0.0 if warmup else peak, peak, warmup, max(decay, warmup + 1), floor
  )


def build_optimizer(
  opt_config: Any, num_steps: int, gradient_combiner: optax.GradientTransformation | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`combiner -> MultiSteps(clip -> AdamW(schedule))`.

  Args:
    opt_config: learning_rate, b1, b2, eps, weight_decay, grad_clip_norm (0: none),
      accumulation_steps, plus the schedule keys.
    num_steps: micro-steps of the run (each consumes one batch).
    gradient_combiner: a transformation applied per micro-step before accumulation (AGP turns
      the stacked `[1+K, ...]` gradients into one update; the official code also projects per
      sample, then accumulates).

  Returns:
    (transformation, schedule over optimizer updates).
  """
  accumulation = max(1, int(opt_config.get("accumulation_steps", 1)))
  schedule = learning_rate_schedule(opt_config, max(1, num_steps // accumulation))
  inner = []
  clip = float(opt_config.get("grad_clip_norm", 0.0))
  if clip > 0:
    inner.append(optax.clip_by_global_norm(clip))
  inner.append(
    optax.adamw(
      schedule,
      b1=float(opt_config.get("b1", 0.9)),
      b2=float(opt_config.get("b2", 0.999)),
      eps=float(opt_config.get("eps", 1e-8)),
      weight_decay=float(opt_config.get("weight_decay", 0.0)),
    )
  )
  tx = optax.chain(*inner)
  if accumulation > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulation).gradient_transformation()
  if gradient_combiner is not None:
    tx = optax.chain(gradient_combiner, tx)
  return tx, schedule


# ---------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def guard_nonfinite(
  step_fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]], loss_key: str = "loss"
) -> Callable[..., Any]:
  """Wraps a pure step so a non-finite loss or new state keeps the old state.

  The returned function is `(state, batch, rng, counters, *extra) -> (state, metrics, counters)`
  with counters `{"nonfinite_total", "nonfinite_in_row"}` int32 scalars, and adds
  `metrics["nonfinite"]` (1.0 on a skipped step).
  """

  def guarded(state, batch, rng, counters, *extra):
    new_state, metrics = step_fn(state, batch, rng, *extra)
    finite = _all_finite(new_state)
    if loss_key in metrics:
      finite = finite & jnp.all(jnp.isfinite(metrics[loss_key]))
    state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    counters = {
      "nonfinite_total": counters["nonfinite_total"] + skipped,
      "nonfinite_in_row": jnp.where(finite, 0, counters["nonfinite_in_row"] + 1),
    }
    metrics = {**metrics, "nonfinite": skipped.astype(jnp.float32)}
    return state, metrics, counters

  return guarded


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
  step: int  # batches consumed when the loop returned
  state: Any
  preempted: bool
  resumed_from: int | None
  nonfinite_total: int


@dataclasses.dataclass
class LoopSettings:
  """What `train_loop` needs to know from the config.

  Attributes:
    num_steps: micro-steps (batches) of the whole run.
    log_every: steps between metric writes.
    checkpoint_every: steps between periodic checkpoints; keep: checkpoints kept.
    async_checkpoints: write checkpoints in the background.
    max_consecutive_nonfinite: stop after this many skipped steps in a row.
    progress_bar: draw the tqdm bar.
    peak_flops_per_device: for MFU; 0 detects from the device kind.
  """

  num_steps: int
  log_every: int = 10
  checkpoint_every: int = 100
  keep: int = 3
  async_checkpoints: bool = True
  max_consecutive_nonfinite: int = 10
  progress_bar: bool = True
  peak_flops_per_device: float = 0.0

  @classmethod
  def from_config(cls, config: Any) -> LoopSettings:
    ck = config.get("checkpoint", {})
    return cls(
      num_steps=int(config.num_steps),
      log_every=int(config.get("log_every", 10)),
      checkpoint_every=int(ck.get("every_steps", 100)),
      keep=int(ck.get("keep", 3)),
      async_checkpoints=bool(ck.get("async_save", True)),
      max_consecutive_nonfinite=int(config.get("max_consecutive_nonfinite", 10)),
      progress_bar=bool(config.get("progress_bar", True)),
      peak_flops_per_device=float(config.get("peak_flops_per_device", 0.0)),
    )


def _step_shardings(mesh, rules, batch: Mapping[str, np.ndarray]) -> dict:
  return {k: sharding_lib.batch_sharding(mesh, rules, np.ndim(v)) for k, v in batch.items()}


def train_loop(
  *,
  settings: LoopSettings,
  workdir: str,
  mesh: jax.sharding.Mesh,
  rules: Mapping[str, tuple[str, ...]],
  state: Any,
  state_shardings: Any,
  step_fn: Callable[..., Any],
  data: Any,
  rng: jax.Array,
  extra: tuple[Any, ...] = (),
  extra_shardings: tuple[Any, ...] = (),
  flops_per_step: float | None = None,
  metadata: Mapping[str, Any] | None = None,
  guard: ckpt_lib.PreemptionGuard | None = None,
) -> LoopResult:
  """Runs (or resumes) training until `settings.num_steps` batches are consumed or SIGTERM.

  Args:
    settings: loop settings.
    workdir: the run folder; checkpoints go to `<workdir>/checkpoints`, events to
      `<workdir>/tensorboard`.
    mesh, rules: the device mesh and logical rules (batches split over the "batch" rule).
    state: the initial train state (sharded); replaced by the latest checkpoint if one exists.
    state_shardings: NamedShardings matching `state`.
    step_fn: pure `(state, batch, rng, *extra) -> (state, metrics)`; metrics are scalars.
    data: an iterator of host batches (dicts of numpy arrays, this process's share) with
      `get_state()` / `set_state(s)` (grain iterators have both).
    rng: the run's base key; step s uses `fold_in(rng, s)`.
    extra: frozen inputs of the step (teachers), never donated nor saved.
    flops_per_step: model FLOPs of one step, for MFU.
    metadata: JSON-able facts stored in every checkpoint.
    guard: a PreemptionGuard (one is installed when None).

  Returns:
    A LoopResult.
  """
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_interval_steps=settings.checkpoint_every,
    max_to_keep=settings.keep,
    async_save=settings.async_checkpoints,
  )
  counters = {
    "nonfinite_total": jnp.zeros((), jnp.int32),
    "nonfinite_in_row": jnp.zeros((), jnp.int32),
  }
  repl = sharding_lib.replicated(mesh)
  counters = jax.device_put(counters, repl)

  # Resume.
  step = 0
  resumed_from = None
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
  )
  restored = checkpointer.restore_latest(abstract_state, jax.eval_shape(lambda: rng))
  if restored is not None:
    state, rng, step = restored.state, restored.rng, restored.step
    resumed_from = step
    if restored.data_state is not None:
      data.set_state(restored.data_state)
    total = int(restored.metadata.get("nonfinite_total", 0))
    counters = jax.device_put(
      {"nonfinite_total": jnp.int32(total), "nonfinite_in_row": jnp.int32(0)}, repl
    )
    logging.info("resuming from checkpoint step %d in %s", step, checkpointer.directory)
    print(f"Resuming from step {step} (checkpoint in {checkpointer.directory})", flush=True)
  if step >= settings.num_steps:
    logging.info("step %d >= num_steps %d: nothing to train", step, settings.num_steps)
    checkpointer.close()
    return LoopResult(step, state, False, resumed_from, int(counters["nonfinite_total"]))

  peak = settings.peak_flops_per_device or metrics_lib.detect_peak_flops()
  writer = metrics_lib.MetricsWriter(
    os.path.join(workdir, "tensorboard"),
    total_steps=settings.num_steps,
    start_step=step,
    flops_per_step=flops_per_step,
    peak_flops_per_device=peak,
    show_progress=settings.progress_bar,
  )

  guarded = guard_nonfinite(step_fn)
  compiled = None
  own_guard = guard is None
  guard = guard or ckpt_lib.PreemptionGuard()
  window: list[Mapping[str, jax.Array]] = []
  tokens_in_window = 0.0
  examples_in_window = 0.0
  previous_counters = None
  preempted = False

  def save(at_step, force):
    meta = {**(metadata or {}), "nonfinite_total": int(counters["nonfinite_total"])}
    return checkpointer.save(
      at_step, state, rng=rng, data_state=data.get_state(), metadata=meta, force=force
    )

  if own_guard:
    guard.__enter__()
  try:
    while step < settings.num_steps:
      if guard.should_stop():
        preempted = True
        break
      host_batch = next(data)
      batch = sharding_lib.host_to_global_batch(host_batch, mesh, rules)
      if compiled is None:
        batch_shardings = _step_shardings(mesh, rules, host_batch)
        compiled = jax.jit(
          guarded,
          in_shardings=(
            state_shardings,
            batch_shardings,
            repl,
            {"nonfinite_total": repl, "nonfinite_in_row": repl},
            *extra_shardings,
          ),
          out_shardings=(
            state_shardings,
            repl,
            {"nonfinite_total": repl, "nonfinite_in_row": repl},
          ),
          donate_argnums=(0,),
        )
      step_rng = jax.random.fold_in(rng, step)
      state, step_metrics, counters = compiled(state, batch, step_rng, counters, *extra)
      step += 1
      window.append(step_metrics)
      if "attention_mask" in host_batch:
        tokens_in_window += float(np.sum(host_batch["attention_mask"])) * jax.process_count()
      if "example_mask" in host_batch:
        examples_in_window += float(np.sum(host_batch["example_mask"])) * jax.process_count()

      # The previous step's counters are ready by now; reading them keeps dispatch one ahead.
      if previous_counters is not None:
        in_row = int(previous_counters["nonfinite_in_row"])
        if in_row >= settings.max_consecutive_nonfinite:
          raise NonFiniteError(
            f"{in_row} consecutive steps had a non-finite loss or update (through step "
            f"{step - 1}); stopping. The newest checkpoint in {checkpointer.directory} "
            f"(step {checkpointer.latest_step()}) holds the last good state."
          )
      previous_counters = counters

      if step == 1 or step % settings.log_every == 0 or step == settings.num_steps:
        jax.block_until_ready(state)
        means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
        means["nonfinite_total"] = float(counters["nonfinite_total"])
        n = len(window)
        timing = writer.timing(
          step,
          tokens=tokens_in_window / n if tokens_in_window else None,
          examples=examples_in_window / n if examples_in_window else None,
        )
        if step == 1:
          timing = {}  # includes compilation
          writer.start_timer(step)
        writer.log(step, {**means, **timing})
        short = {k: means[k] for k in ("loss", "nonfinite_total") if k in means}
        writer.update_progress(step, short)
        window, tokens_in_window, examples_in_window = [], 0.0, 0.0
      else:
        writer.update_progress(step)
      save(step, force=False)

    in_row = int(counters["nonfinite_in_row"])
    if in_row >= settings.max_consecutive_nonfinite:
      raise NonFiniteError(
        f"{in_row} consecutive steps had a non-finite loss or update (through step {step}); "
        f"stopping. The newest checkpoint in {checkpointer.directory} (step "
        f"{checkpointer.latest_step()}) holds the last good state."
      )
    save(step, force=True)
    checkpointer.wait()
    if preempted:
      logging.warning("stop requested (%s): saved step %d, exiting", guard.signal_name, step)
      print(f"Preempted ({guard.signal_name}): saved checkpoint at step {step}", flush=True)
    total = int(counters["nonfinite_total"])
    return LoopResult(step, state, preempted, resumed_from, total)
  finally:
    if own_guard:
      guard.__exit__(None, None, None)
    writer.close()
    checkpointer.close()


# ---------------------------------------------------------------------------------------------
# Drive-KD wiring
# ---------------------------------------------------------------------------------------------


def run(config: Any, workdir: str) -> dict:
  """Trains (or resumes) the configured Drive-KD student, then evaluates it."""
  raise NotImplementedError
