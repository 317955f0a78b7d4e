"""The optimizers of Drive-KD runs: gradient combiner (AGP) -> accumulation -> clip -> AdamW.

One builder serves the trainer, the pure-step tests and the benchmark, so the optimizer a test
checks is the one a launch uses.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


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


def _inner_chain(opt_config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """clip (when grad_clip_norm > 0) -> AdamW(schedule)."""
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
  return optax.chain(*inner)


def _accumulation_and_schedule(opt_config: Any, num_steps: int) -> tuple[int, optax.Schedule]:
  """Micro-steps per update, and the schedule over the run's `num_steps // accumulation`."""
  accumulation = max(1, int(opt_config.get("accumulation_steps", 1)))
  return accumulation, learning_rate_schedule(opt_config, max(1, num_steps // accumulation))


def build_optimizer(
  opt_config: Any, num_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`MultiSteps(clip -> AdamW(schedule))`, for plain (one-gradient) training.

  Args:
    opt_config: learning_rate, b1, b2, eps, weight_decay, grad_clip_norm (0: none),
      accumulation_steps, plus the schedule keys.
    num_steps: micro-steps of the run (each consumes one batch).

  Returns:
    (transformation, schedule over optimizer updates).
  """
  accumulation, schedule = _accumulation_and_schedule(opt_config, num_steps)
  tx = _inner_chain(opt_config, schedule)
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


class DistillOptimizer(NamedTuple):
  """The Drive-KD optimizer: per micro-step combiner, window mean, then the inner chain.

  Every micro-step's stacked `[1+K, ...]` gradients go through `combiner` (AGP) into one update;
  the updates of a window of `accumulation` micro-steps are averaged and `inner` (clip -> AdamW)
  runs once on the mean. That is `as_chain()`, `chain(combiner, MultiSteps(inner,
  accumulation))`, the official per-sample AGP then accumulation, but the train step runs the
  pieces itself (`train.step`): inside its scan over micro-batches only the combiner and the
  running sum run per micro-step, and AdamW runs once per window instead of on every micro-step
  with its result thrown away (which is what MultiSteps must do under `jit`). Windows are fixed
  spans of `accumulation` micro-steps; a micro-step the step skips (non-finite, or padding
  only) adds nothing and the mean is over the applied ones, where MultiSteps would lengthen the
  window instead (the official code never skips).

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

  def as_chain(self) -> optax.GradientTransformationExtraArgs:
    """The equivalent optax chain (one `update` per micro-step)."""
    inner = self.inner
    if self.accumulation > 1:
      inner = optax.MultiSteps(inner, every_k_schedule=self.accumulation).gradient_transformation()
    return optax.chain(self.combiner, inner)


def build_distill_optimizer(
  opt_config: Any, num_steps: int, gradient_combiner: optax.GradientTransformationExtraArgs
) -> tuple[DistillOptimizer, optax.Schedule]:
  """`DistillOptimizer(combiner, clip -> AdamW(schedule), accumulation_steps)`.

  Args:
    opt_config: as `build_optimizer`.
    num_steps: micro-steps of the run.
    gradient_combiner: turns each micro-step's stacked `[1+K, ...]` gradients into one update
      (AGP; the official code projects per sample, then accumulates).

  Returns:
    (optimizer, schedule over optimizer updates).
  """
  accumulation, schedule = _accumulation_and_schedule(opt_config, num_steps)
  optimizer = DistillOptimizer(gradient_combiner, _inner_chain(opt_config, schedule), accumulation)
  return optimizer, schedule
