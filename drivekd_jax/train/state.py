"""The Drive-KD train state: a pytree the trainer checkpoints. Teachers are not part of it."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from drivekd_jax.distill.reweight import ReweightState


@flax.struct.dataclass
class TrainState:
  """Everything a Drive-KD run needs to continue, as one pytree.

  Attributes:
    step: int32, train-step calls so far (each consumes one batch).
    params: the trainable parameters: {"student": nnx.State of the student's trainable
      variables, "aux": dict of extra trainable arrays, e.g. hidden-state projections
      "hidden_proj/<capability>" `[D_s, D_t]`}.
    frozen: nnx.State of the student's non-trainable variables (e.g. the vision tower when only
      the LLM trains). Carried unchanged.
    opt_state: optax state of the chain applied to the stacked gradients.
    rng: PRNG key of the run (advanced once per step).
    reweight: `ReweightState` of the dynamic loss weights.
    skipped: int32, micro-steps skipped so far for a non-finite loss or gradient.
    consecutive_skips: int32, skipped micro-steps in a row (0 after a good one).
  """

  step: jax.Array
  params: Any
  frozen: Any
  opt_state: Any
  rng: jax.Array
  reweight: ReweightState
  skipped: jax.Array
  consecutive_skips: jax.Array


def trainable_filter(trainable: str):
  """nnx filter of the trainable student variables: "all" params or the "llm" params only (the
  `language_model` decoder; InternVL's `vision_model` and projector `mlp1`, Qwen2.5-VL's
  `visual` tower with its merger stay frozen)."""
  if trainable == "all":
    return nnx.Param
  if trainable == "llm":
    return nnx.All(nnx.Param, nnx.PathContains("language_model"))
  raise ValueError(f"trainable={trainable!r}: expected 'all' or 'llm'")


def split_student(model: nnx.Module, trainable: str = "all"):
  """(graphdef, trainable nnx.State, frozen nnx.State) of a student module."""
  graphdef, params, frozen = nnx.split(model, trainable_filter(trainable), ...)
  return graphdef, params, frozen


def create_train_state(
  *,
  params: Any,
  frozen: Any,
  tx: optax.GradientTransformation,
  reweight: ReweightState,
  rng: jax.Array,
) -> TrainState:
  """A fresh state (step 0). `params` is the {"student", "aux"} dict (see `TrainState`).

  Every leaf gets its own buffer (initialisers may hand back one cached zero for several
  leaves, and a donated state must not hold the same buffer twice).
  """
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    frozen=frozen,
    opt_state=tx.init(params),
    rng=rng,
    reweight=reweight,
    skipped=jnp.zeros((), jnp.int32),
    consecutive_skips=jnp.zeros((), jnp.int32),
  )
  return jax.tree.map(lambda x: jnp.array(x, copy=True), state)
