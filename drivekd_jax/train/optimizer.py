"""The optimizers of Drive-KD runs: gradient combiner (AGP) -> window mean -> clip -> AdamW.

`build_optimizer(settings, num_steps)` is the plain one (the teachers' CE warm-up);
`build_distill_optimizer(settings, num_steps, combiner)` the distillation's `DistillOptimizer`.
One builder serves the trainer, the pure-step tests and the benchmark, so the optimizer a test
checks is the one a launch uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
  """clip -> AdamW with linear warmup then cosine decay (or constant); steps count updates.

  Attributes:
    schedule: "cosine" or "constant".
    decay_steps: 0: the whole run.
    lr_floor_ratio: the cosine ends at `lr_floor_ratio * learning_rate`.
    grad_clip_norm: 0: no clipping.
    accumulation_steps: micro-steps per update (a Drive-KD run takes
      `distill.grad_accum_steps`).
  """

  learning_rate: float = 5e-5
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  schedule: str = "cosine"
  warmup_steps: int = 0
  decay_steps: int = 0
  lr_floor_ratio: float = 0.01
  grad_clip_norm: float = 0.0
  accumulation_steps: int = 1

  def __post_init__(self):
    if self.schedule not in ("cosine", "constant"):
      raise ValueError(f"schedule={self.schedule!r}: expected 'cosine' or 'constant'")


def learning_rate_schedule(settings: OptimizerSettings, num_updates: int) -> optax.Schedule:
  """Linear warmup then cosine decay to `lr_floor_ratio * learning_rate` (or constant)."""
  peak = settings.learning_rate
  warmup = settings.warmup_steps
  if settings.schedule == "constant":
    if warmup:
      return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]
      )
    return optax.constant_schedule(peak)
  decay = settings.decay_steps or max(num_updates, warmup + 1)
  floor = peak * settings.lr_floor_ratio
  return optax.warmup_cosine_decay_schedule(
    0.0 if warmup else peak, peak, warmup, max(decay, warmup + 1), floor
  )


def _clip_adamw(
  settings: OptimizerSettings, schedule: optax.Schedule
) -> optax.GradientTransformation:
  """clip (when grad_clip_norm > 0) -> AdamW(schedule)."""
  inner = []
  if settings.grad_clip_norm > 0:
    inner.append(optax.clip_by_global_norm(settings.grad_clip_norm))
  inner.append(
    optax.adamw(
      schedule,
      b1=settings.b1,
      b2=settings.b2,
      eps=settings.eps,
      weight_decay=settings.weight_decay,
    )
  )
  return optax.chain(*inner)


def _accumulation_and_schedule(
  settings: OptimizerSettings, num_steps: int
) -> tuple[int, optax.Schedule]:
  """Micro-steps per update, and the schedule over the run's `num_steps // accumulation`."""
  accumulation = max(1, settings.accumulation_steps)
  return accumulation, learning_rate_schedule(settings, max(1, num_steps // accumulation))


def build_optimizer(
  settings: OptimizerSettings, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`MultiSteps(clip -> AdamW(schedule))`, for plain (one-gradient) training.

  Args:
    settings: the optimizer settings.
    num_steps: micro-steps of the run (each consumes one batch).

  Returns:
    (transformation, schedule over optimizer updates).
  """
  accumulation, schedule = _accumulation_and_schedule(settings, num_steps)
  tx = _clip_adamw(settings, schedule)
  if accumulation > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulation).gradient_transformation()
  return tx, schedule


class DistillOptState(NamedTuple):
  """State of a `DistillOptimizer`.

  Attributes:
    combiner: the combiner's state (e.g. `AGPState`).
    inner: the inner chain's state (AdamW moments, ...).
    accumulated: sum of the combiner outputs of the current window, param-shaped.
    count: int32, micro-steps in the current window (skipped and padding-only ones included).
    applied: int32, the applied ones among them (what `accumulated` averages over).
  """

  combiner: Any
  inner: Any
  accumulated: Any
  count: jax.Array
  applied: jax.Array


def tree_select(flag: jax.Array, new: Any, old: Any) -> Any:
  """`new` where the bool scalar `flag` holds, else `old`, leaf by leaf."""
  return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)


class DistillOptimizer(NamedTuple):
  """The Drive-KD optimizer: per micro-step combiner, window mean, then the inner chain.

  Every micro-step's stacked `[1+K, ...]` gradients go through `combiner` (AGP) into one update
  (`combine`), which is added to the window's running sum (`accumulate`); after `accumulation`
  micro-steps the window closes (`close_window`): `inner` (clip -> AdamW) runs once on the mean
  of the applied micro-steps' updates. That is `as_chain()`, `chain(combiner, MultiSteps(inner,
  accumulation))`, the official per-sample AGP then accumulation; the train step calls the
  pieces itself so that inside its scan over micro-batches only the combiner and the running
  sum run, and AdamW runs once per window instead of on every micro-step with its result thrown
  away (which is what MultiSteps must do under `jit`). Windows are fixed spans of
  `accumulation` micro-steps; a micro-step the step skips (non-finite, or padding only) adds
  nothing and the mean is over the applied ones, where MultiSteps would lengthen the window
  instead (the official code never skips).

  Attributes:
    combiner: `[1+K, ...]` gradients -> one update (`GradientTransformationExtraArgs`).
    inner: the update transformation applied to each window's mean.
    accumulation: micro-steps per window (per optimizer update).
  """

  combiner: optax.GradientTransformationExtraArgs
  inner: optax.GradientTransformation
  accumulation: int

  def init(self, params: Any) -> DistillOptState:
    return DistillOptState(
      combiner=self.combiner.init(params),
      inner=self.inner.init(params),
      accumulated=optax.tree.zeros_like(params),
      count=jnp.zeros((), jnp.int32),
      applied=jnp.zeros((), jnp.int32),
    )

  def combine(
    self, stacked: Any, state: DistillOptState, params: Any, **extra_args
  ) -> tuple[Any, Any]:
    """(this micro-step's update, the combiner's new state) from stacked gradients."""
    return self.combiner.update(stacked, state.combiner, params, **extra_args)

  def accumulate(
    self, state: DistillOptState, update: Any, combiner_state: Any, apply: jax.Array
  ) -> DistillOptState:
    """Counts one micro-step in the window; adds `update` (and keeps `combiner_state`) only
    where `apply` (bool scalar) holds."""
    return state._replace(
      combiner=tree_select(apply, combiner_state, state.combiner),
      accumulated=jax.tree.map(
        lambda a, u: a + jnp.where(apply, u, 0).astype(a.dtype), state.accumulated, update
      ),
      count=state.count + 1,
      applied=state.applied + apply.astype(jnp.int32),
    )

  def close_window(
    self, state: DistillOptState, params: Any
  ) -> tuple[Any, DistillOptState, jax.Array]:
    """When the window is full: the inner chain on its mean, applied to `params` (no update if
    nothing was applied), and an empty window.

    Returns:
      (params, state, closed: bool scalar).
    """
    closed = state.count >= self.accumulation
    update = closed & (state.applied > 0)
    mean = jax.tree.map(
      lambda a: a / jnp.maximum(state.applied, 1).astype(a.dtype), state.accumulated
    )
    updates, new_inner = self.inner.update(mean, state.inner, params)
    state = DistillOptState(
      combiner=state.combiner,
      inner=tree_select(update, new_inner, state.inner),
      accumulated=jax.tree.map(
        lambda a: jnp.where(closed, jnp.zeros_like(a), a), state.accumulated
      ),
      count=jnp.where(closed, 0, state.count),
      applied=jnp.where(closed, 0, state.applied),
    )
    return tree_select(update, optax.apply_updates(params, updates), params), state, closed

  def as_chain(self) -> optax.GradientTransformationExtraArgs:
    """The equivalent optax chain (one `update` per micro-step)."""
    inner = self.inner
    if self.accumulation > 1:
      inner = optax.MultiSteps(inner, every_k_schedule=self.accumulation).gradient_transformation()
    return optax.chain(self.combiner, inner)


def build_distill_optimizer(
  settings: OptimizerSettings,
  num_steps: int,
  gradient_combiner: optax.GradientTransformationExtraArgs,
) -> tuple[DistillOptimizer, optax.Schedule]:
  """`DistillOptimizer(combiner, clip -> AdamW(schedule), accumulation_steps)`.

  Args:
    settings: the optimizer settings (`accumulation_steps`: micro-steps per window).
    num_steps: micro-steps of the run.
    gradient_combiner: turns each micro-step's stacked `[1+K, ...]` gradients into one update
      (AGP; the official code projects per sample, then accumulates).

  Returns:
    (optimizer, schedule over optimizer updates).
  """
  accumulation, schedule = _accumulation_and_schedule(settings, num_steps)
  optimizer = DistillOptimizer(gradient_combiner, _clip_adamw(settings, schedule), accumulation)
  return optimizer, schedule
