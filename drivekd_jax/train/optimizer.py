"""The optimizer of every Drive-KD run: gradient combiner (AGP) -> accumulation -> clip -> AdamW.

One builder serves the trainer, the pure-step tests and the benchmark, so the optimizer a test
checks is the one a launch uses.
"""

from __future__ import annotations

from typing import Any

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
