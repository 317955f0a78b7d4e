"""The training loop every run goes through: resume, jitted guarded steps, metrics, checkpoints.

`train_loop(settings=..., state=..., step_fn=..., data=...)` runs a pure step
`(state, batch, rng, *extra) -> (state, metrics)` until `settings.num_steps` batches are consumed
or a stop is requested (SIGTERM), and can be relaunched with the same arguments to continue from
the newest checkpoint under `<workdir>/checkpoints` (state, rng and the data iterator's
position). The Drive-KD distillation and the teachers' CE warm-up both run through it.

`guard_nonfinite` wraps the step so that a non-finite loss or update keeps the old state and is
counted; too many in a row stop the run with `NonFiniteError`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from drivekd_jax.data import pipeline as pipeline_lib
from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.settings import RunSettings


class NonFiniteError(RuntimeError):
  """Raised when too many consecutive steps produced a non-finite loss or state."""


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def guard_nonfinite(
  step_fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]],
  loss_key: str = "loss",
  check_state: bool = True,
) -> Callable[..., Any]:
  """Wraps a pure step so a non-finite loss or new state keeps the old state.

  The returned function is `(state, batch, rng, counters, *extra) -> (state, metrics, counters)`
  with counters `{"nonfinite_total", "nonfinite_in_row"}` int32 scalars, and adds
  `metrics["nonfinite"]` (skipped steps or micro-steps). Steps that skip bad micro-batches
  themselves (the Drive-KD step reports `skipped` and `consecutive_skips`) are counted the same
  way; for them `check_state=False` avoids the whole-state check and select (which keeps old and
  new state alive together).
  """

  def guarded(state, batch, rng, counters, *extra):
    new_state, metrics = step_fn(state, batch, rng, *extra)
    finite = jnp.array(True)
    if check_state:
      finite = _all_finite(new_state)
      if loss_key in metrics:
        finite = finite & jnp.all(jnp.isfinite(metrics[loss_key]))
      state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    else:
      state = new_state
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    inner_skipped = jnp.asarray(metrics.get("skipped", 0), jnp.float32).astype(jnp.int32)
    in_row = jnp.where(finite, 0, counters["nonfinite_in_row"] + 1)
    if "consecutive_skips" in metrics:
      in_row = jnp.maximum(in_row, jnp.asarray(metrics["consecutive_skips"]).astype(jnp.int32))
    counters = {
      "nonfinite_total": counters["nonfinite_total"] + skipped + inner_skipped,
      "nonfinite_in_row": in_row,
    }
    metrics = {**metrics, "nonfinite": (skipped + inner_skipped).astype(jnp.float32)}
    return state, metrics, counters

  return guarded


@dataclasses.dataclass
class LoopResult:
  """What a launch of the loop ended with.

  Attributes:
    step: batches consumed when the loop returned.
    preempted: a stop was requested (the state was saved first).
    resumed_from: the checkpoint step this launch started from (None: a fresh start).
    history: (step, mean metrics) of every logged window of this launch.
  """

  step: int
  state: Any
  preempted: bool
  resumed_from: int | None
  nonfinite_total: int
  history: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """What `train_loop` needs to know of the run.

  Attributes:
    num_steps: steps (batches) of the whole run.
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
  def of_run(cls, run: RunSettings) -> LoopSettings:
    return cls(
      num_steps=run.num_steps,
      log_every=run.log_every,
      checkpoint_every=run.checkpoint.every_steps,
      keep=run.checkpoint.keep,
      async_checkpoints=run.checkpoint.async_save,
      max_consecutive_nonfinite=run.max_consecutive_nonfinite,
      progress_bar=run.progress_bar,
      peak_flops_per_device=run.peak_flops_per_device,
    )


def _batch_shardings(mesh, rules, batch: Mapping[str, np.ndarray]) -> dict:
  return {k: sharding_lib.batch_sharding(mesh, rules, np.ndim(v)) for k, v in batch.items()}


class _Window:
  """Metrics of the steps since the last log line, and the throughput counts behind them."""

  def __init__(self):
    self.metrics: list[Mapping[str, jax.Array]] = []
    self.tokens = self.examples = self.flops = 0.0

  def add(self, metrics, host_batch, flops_fn) -> None:
    self.metrics.append(metrics)
    if "attention_mask" in host_batch:
      self.tokens += float(np.sum(host_batch["attention_mask"])) * jax.process_count()
    if "example_mask" in host_batch:
      self.examples += float(np.sum(host_batch["example_mask"])) * jax.process_count()
    if flops_fn is not None:
      self.flops += flops_fn(host_batch)

  def means(self) -> dict[str, float]:
    return {k: float(np.mean([float(m[k]) for m in self.metrics])) for k in self.metrics[0]}

  def per_step(self) -> dict[str, float | None]:
    """Per-step means of the counts (None where the batches carry none)."""
    n = len(self.metrics)
    totals = {"tokens": self.tokens, "examples": self.examples, "flops": self.flops}
    return {k: (v / n if v else None) for k, v in totals.items()}


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
  flops_fn: Callable[[Mapping[str, np.ndarray]], float] | None = None,
  pad_id: int = 0,
  metadata: Mapping[str, Any] | None = None,
  guard: ckpt_lib.PreemptionGuard | None = None,
  check_state: bool = True,
  host_scalars: Callable[[int], Mapping[str, float]] | None = None,
  name: str = "train",
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
    flops_fn: model FLOPs of one (global) step given this process's host batch, for MFU.
    pad_id: token id of the padding added when processes agree on a sequence length
      (`pipeline.make_global_batch`).
    metadata: JSON-able facts stored in every checkpoint.
    guard: a PreemptionGuard (one is installed when None).
    check_state: check the whole new state for non-finite values and keep the old one if so;
      False for steps that skip bad updates themselves (see `guard_nonfinite`).
    host_scalars: `step -> {name: value}` logged with the metrics (e.g. the learning rate).
    name: what the progress bar and log lines call this loop.

  Returns:
    A LoopResult.
  """
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_interval_steps=settings.checkpoint_every,
    max_to_keep=settings.keep,
    async_save=settings.async_checkpoints,
  )
  repl = sharding_lib.replicated(mesh)
  rng = sharding_lib.replicate(rng, mesh)
  step, state, rng, counters, resumed_from = _resume(
    checkpointer, state, state_shardings, rng, data, mesh, name
  )
  if step >= settings.num_steps:
    logging.info("%s: step %d >= num_steps %d, nothing to run", name, step, settings.num_steps)
    checkpointer.close()
    return LoopResult(step, state, False, resumed_from, int(counters["nonfinite_total"]))

  writer = metrics_lib.MetricsWriter(
    os.path.join(workdir, "tensorboard"),
    total_steps=settings.num_steps,
    start_step=step,
    peak_flops_per_device=settings.peak_flops_per_device or metrics_lib.detect_peak_flops(),
    show_progress=settings.progress_bar,
    description=name,
  )
  counter_shardings = {"nonfinite_total": repl, "nonfinite_in_row": repl}
  guarded = guard_nonfinite(step_fn, check_state=check_state)
  compiled = batch_shardings = None
  own_guard = guard is None
  guard = guard or ckpt_lib.PreemptionGuard()
  window = _Window()
  history: list[tuple[int, dict[str, float]]] = []
  previous_counters = None
  preempted = False
  timer_started = False

  def stop_if_nonfinite(step_counters, through_step):
    in_row = int(step_counters["nonfinite_in_row"])
    if in_row >= settings.max_consecutive_nonfinite:
      raise NonFiniteError(
        f"{name}: {in_row} consecutive steps had a non-finite loss or update (through step "
        f"{through_step}); stopping. The newest checkpoint in {checkpointer.directory} (step "
        f"{checkpointer.latest_step()}) holds the last good state."
      )

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
      if compiled is None:
        batch_shardings = _batch_shardings(mesh, rules, host_batch)
        compiled = jax.jit(
          guarded,
          in_shardings=(state_shardings, batch_shardings, repl, counter_shardings)
          + tuple(extra_shardings),
          out_shardings=(state_shardings, repl, counter_shardings),
          donate_argnums=(0,),
        )
      batch = pipeline_lib.make_global_batch(host_batch, batch_shardings, pad_id=pad_id)
      state, step_metrics, counters = compiled(
        state, batch, jax.random.fold_in(rng, step), counters, *extra
      )
      step += 1
      window.add(step_metrics, host_batch, flops_fn)

      # The previous step's counters are ready by now; reading them keeps dispatch one ahead.
      if previous_counters is not None:
        stop_if_nonfinite(previous_counters, step - 1)
      previous_counters = counters

      first_of_launch = not timer_started
      if first_of_launch or step % settings.log_every == 0 or step == settings.num_steps:
        jax.block_until_ready(state)
        means = window.means()
        means["nonfinite_total"] = float(counters["nonfinite_total"])
        timing = writer.timing(step, **window.per_step())
        if first_of_launch:
          timing = {}  # the first step of a launch includes compilation
          writer.start_timer(step)
          timer_started = True
        extra_scalars = dict(host_scalars(step)) if host_scalars is not None else {}
        writer.log(step, {**means, **timing, **extra_scalars})
        history.append((step, means))
        short = {k: means[k] for k in ("loss", "nonfinite_total") if k in means}
        writer.update_progress(step, short)
        window = _Window()
      else:
        writer.update_progress(step)
      save(step, force=False)

    stop_if_nonfinite(counters, step)
    save(step, force=True)
    checkpointer.wait()
    if preempted:
      logging.warning("%s: stop requested (%s), saved step %d", name, guard.signal_name, step)
    total = int(counters["nonfinite_total"])
    return LoopResult(step, state, preempted, resumed_from, total, history)
  finally:
    if own_guard:
      guard.__exit__(None, None, None)
    writer.close()
    checkpointer.close()


def _resume(checkpointer, state, state_shardings, rng, data, mesh, name):
  """(step, state, rng, counters, resumed_from) from the newest checkpoint, or the fresh ones."""
  counters = {"nonfinite_total": np.int32(0), "nonfinite_in_row": np.int32(0)}
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
  )
  restored = checkpointer.restore_latest(abstract_state, jax.eval_shape(lambda: rng))
  if restored is None:
    return 0, state, rng, sharding_lib.replicate(counters, mesh), None
  if restored.data_state is not None:
    data.set_state(restored.data_state)
  counters["nonfinite_total"] = np.int32(int(restored.metadata.get("nonfinite_total", 0)))
  logging.info(
    "%s: resuming from checkpoint step %d in %s", name, restored.step, checkpointer.directory
  )
  return (
    restored.step,
    restored.state,
    restored.rng,
    sharding_lib.replicate(counters, mesh),
    restored.step,
  )
