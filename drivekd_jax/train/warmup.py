"""Plain-CE warm-up of preset-built teachers, through the same loop as the distillation.

`warm_up(name, model, settings, data, processor, mesh, rules, folder)` trains a teacher for
`settings.teacher_warmup.steps` steps of cross-entropy on the training split (its own batch size
and shuffle order) with `train_loop`, so the warm-up checkpoints under `<folder>/checkpoints`,
resumes after an interruption and stops cleanly on SIGTERM like the distillation. A relaunch
after it finished restores the final parameters instead of training again, so resumed runs
distil from identical teachers. `<folder>/warmup.json` records the settings (a relaunch with
other ones is refused) and, once done, the CE curve.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import optax
from absl import logging
from flax import nnx

from drivekd_jax.data import pipeline as pipeline_lib
from drivekd_jax.data import sources
from drivekd_jax.distill import losses
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.loop import LoopSettings, train_loop
from drivekd_jax.train.optimizer import OptimizerSettings, build_optimizer
from drivekd_jax.train.settings import RunSettings


class Preempted(RuntimeError):
  """A stop was requested during the warm-up; its progress is saved."""


def make_ce_step(graphdef: Any, tx: optax.GradientTransformation):
  """Pure `(state, batch, rng, frozen) -> (state, {"loss"})`: one CE update.

  `state` is `{"params", "opt_state"}`, `params` / `frozen` the `nnx.Param` / remaining states of
  a model of `graphdef`; the batch is a training batch (`[B, L]` fields,
  `pixel_values [B, M, H, W, 3]`, `example_mask [B]`).
  """

  def loss_fn(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    attention = batch["attention_mask"].astype(bool)
    out = model(
      batch["input_ids"],
      batch["pixel_values"],
      attention_mask=attention,
      positions=batch["positions"],
    )
    return losses.cross_entropy(
      out.logits, batch["labels"], attention, batch["example_mask"].astype(bool)
    )

  def step(state, batch, rng, frozen):
    del rng
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, batch)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state}, {"loss": loss}

  return step


def warmup_record(settings: RunSettings, name: str) -> dict:
  """What determines a warmed teacher (stored beside it; a mismatch refuses to reuse it)."""
  warm = settings.teacher_warmup
  entry = settings.teachers[name]
  return {
    "steps": warm.steps,
    "learning_rate": warm.learning_rate,
    "warmup_steps": warm.warmup_steps,
    "grad_clip_norm": warm.grad_clip_norm,
    "batch_size": warm.batch_size or settings.data.batch_size,
    "seed": settings.seed,
    "shuffle_seed": settings.data.shuffle_seed,
    "preset": entry.preset,
    "text_overrides": dict(entry.text_overrides),
    "dtype": entry.dtype,
  }


def _check_or_write_record(path: str, record: dict, name: str) -> dict:
  """The stored record (checked equal to `record`), or a new one."""
  record = json.loads(json.dumps(record))
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored["settings"] != record:
      raise ValueError(
        f"{path} holds teacher {name!r} warmed with other settings ({stored['settings']}, now "
        f"{record}); use a new workdir or delete {os.path.dirname(path)}"
      )
    return stored
  stored = {"settings": record, "complete": False}
  _write_json(path, stored)
  return stored


def _write_json(path: str, value: Any) -> None:
  def write():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
      json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)

  sources.on_process_zero_then_barrier(f"drivekd_write_{os.path.basename(path)}", write)


def warm_up(
  name: str,
  model: nnx.Module,
  settings: RunSettings,
  data: sources.DataBundle,
  processor: Any,
  mesh,
  rules,
  folder: str,
) -> nnx.Module:
  """Trains (or resumes, or reloads) the CE warm-up of one teacher; returns the warmed module.

  Raises:
    Preempted: a stop was requested; the progress is saved and the next launch resumes it.
  """
  record = warmup_record(settings, name)
  marker = os.path.join(folder, "warmup.json")
  stored = _check_or_write_record(marker, record, name)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  tx, _ = build_optimizer(
    OptimizerSettings(
      learning_rate=record["learning_rate"],
      warmup_steps=record["warmup_steps"],
      grad_clip_norm=record["grad_clip_norm"],
    ),
    record["steps"],
  )
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_shardings = sharding_lib.optimizer_state_shardings(
    tx, jax.eval_shape(tx.init, params), param_shardings, mesh
  )
  state = {
    "params": params,
    "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params),
  }
  state_shardings = {"params": param_shardings, "opt_state": opt_shardings}
  pipeline_config = dataclasses.replace(
    data.pipeline_config, batch_size=record["batch_size"], seed=record["shuffle_seed"]
  )
  iterator = pipeline_lib.TrainingPipeline(
    data.train_source, processor, pipeline_config, source_name=data.train_name
  ).iterator()
  if stored.get("complete"):
    logging.info(
      "teacher %s: reusing its warm-up (%d steps, final CE %.4f) from %s",
      name,
      record["steps"],
      stored["loss"][-1][1],
      folder,
    )
  started = time.time()
  result = train_loop(
    settings=LoopSettings(
      num_steps=record["steps"],
      log_every=max(1, settings.teacher_warmup.log_every),
      checkpoint_every=settings.checkpoint.every_steps,
      keep=1,
      async_checkpoints=settings.checkpoint.async_save,
      max_consecutive_nonfinite=settings.max_consecutive_nonfinite,
      progress_bar=settings.progress_bar,
    ),
    workdir=folder,
    mesh=mesh,
    rules=rules,
    state=state,
    state_shardings=state_shardings,
    step_fn=make_ce_step(graphdef, tx),
    data=iterator,
    rng=jax.random.key(settings.seed),
    extra=(frozen,),
    extra_shardings=(jax.tree.map(lambda x: x.sharding, frozen),),
    pad_id=data.tokenizer.pad_id,
    metadata={"teacher": name},
    name=f"warm-up {name}",
  )
  if result.preempted:
    raise Preempted(f"teacher {name!r} warm-up stopped at step {result.step}; relaunch to resume")
  if not stored.get("complete"):
    curve = [(step, means["loss"]) for step, means in result.history]
    _write_json(
      marker,
      {
        "settings": stored["settings"],
        "complete": True,
        "loss": curve,
        "seconds": round(time.time() - started, 1),
      },
    )
  return nnx.merge(graphdef, result.state["params"], frozen)
