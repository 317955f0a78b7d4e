"""Teacher-forced training of the tiny unified model on the synthetic benchmark's ground truth.

Each synthetic sample becomes one dialogue in the official message format whose assistant turns
are the ground truth: the target image of an image turn, the gold letters of a text turn (a
dynamic answer resolved exactly from the ground-truth image by the synthetic oracle). It is
tokenized exactly as the model tokenizes a history at inference (`TinyUnifiedModel.encode_message`)
and trained with next-token cross-entropy on the assistant content only (answer text or
`<img>`-enclosed image tokens, and the closing `<|im_end|>`). A fraction of the examples is an
image alone after the bare assistant header, which is the context the unconditional rows of
classifier-free guidance see.

`configs/imug/demo.py` fits it on the synthetic train split (another generator seed than the
evaluated samples) for a few minutes on a CPU, which lifts its image turns well above the
untrained model's under the oracle judge (`imug_jax.judges.oracle`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from imug_jax.data import release as release_lib
from imug_jax.data import synthetic
from imug_jax.models import protocol
from imug_jax.models.protocol import Response
from imug_jax.models.tiny import TinyUnifiedModel
from imug_jax.rollout.runner import user_message

LOG_EVERY = 50
LENGTH_QUANTUM = 256


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Steps of `batch_size` dialogues cut to `max_length` tokens; Adam at `learning_rate`;
  `unconditional_fraction` of the rows are a lone image (guidance's unconditional context)."""

  steps: int = 100
  batch_size: int = 4
  max_length: int = 1024
  learning_rate: float = 3e-3
  unconditional_fraction: float = 0.1
  seed: int = 0


def ground_truth_dialogue(
  model: TinyUnifiedModel, bench: release_lib.Release, sample
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [L], loss mask bool [L]) of one sample with ground-truth assistant turns.

  The mask marks tokens to predict: assistant content after the header (for an image turn, from
  the first image token, since `<img>` is part of the forced prompt) and its `<|im_end|>`.
  """
  truth = synthetic.ground_truth_images(bench.data_dir)
  meta = synthetic.load_meta(bench.data_dir)
  tokens: list[int] = []
  mask: list[bool] = []

  def add(message, supervised_from: int | None):
    ids = model.encode_message(message)
    tokens.extend(ids)
    newline = len(model.newline_tokens)  # The trailing "\n" after <|im_end|> is not predicted.
    mask.extend(
      supervised_from is not None and supervised_from <= i < len(ids) - newline
      for i in range(len(ids))
    )

  if sample.system_prompt:
    add(protocol.message("system", [protocol.text_item(sample.system_prompt)]), None)
  header = len(model.prompt_suffix("text_only"))
  for task in sample.tasks:
    add(user_message(task, bench.images_dir), None)
    if task.modality == "image":
      response = Response(image=truth[(sample.key, task.turn)].read_bytes())
      add(protocol.assistant_message(response), header + 1)
    else:
      answer = synthetic.ground_truth_answer(sample.key, task, truth, meta)
      add(protocol.assistant_message(Response(text=answer)), header)
  return np.asarray(tokens, np.int32), np.asarray(mask, bool)


def unconditional_example(model: TinyUnifiedModel, image: bytes) -> tuple[np.ndarray, np.ndarray]:
  """An image after the bare assistant header: what guidance's unconditional rows see."""
  ids = model.encode_message(protocol.assistant_message(Response(image=image)))
  header = len(model.prompt_suffix("text_only"))
  mask = np.zeros(len(ids), bool)
  mask[header + 1 : len(ids) - len(model.newline_tokens)] = True
  return np.asarray(ids, np.int32), mask


def _loss(graphdef, params, tokens, mask):
  """Mean next-token cross-entropy over supervised positions; tokens/mask [B, L]."""
  decoder = nnx.merge(graphdef, params)
  real = tokens >= 0
  logits = decoder(jnp.maximum(tokens, 0)[:, :-1], attention_mask=real[:, :-1]).logits
  targets = jnp.maximum(tokens, 0)[:, 1:]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  weights = (mask[:, 1:] & real[:, 1:]).astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def train(
  model: TinyUnifiedModel, bench: release_lib.Release, config: TrainConfig = TrainConfig()
) -> list[float]:
  """Fits `model` in place on `bench` (a synthetic benchmark); returns the loss per step."""
  examples = [ground_truth_dialogue(model, bench, s) for s in bench.samples or ()]
  images = sorted(Path(p) for p in synthetic.ground_truth_images(bench.data_dir).values())
  if not examples:
    raise ValueError(f"{bench.data_dir}: no samples to train on")
  optimizer = optax.adamw(config.learning_rate, weight_decay=0.0)
  opt_state = optimizer.init(model.params)
  graphdef = model.graphdef

  @jax.jit
  def step(params, opt_state, tokens, mask):
    loss, grads = jax.value_and_grad(lambda p: _loss(graphdef, p, tokens, mask))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(config.seed)
  params, losses = model.params, []
  for _ in range(config.steps):
    rows = []
    for _ in range(config.batch_size):
      if images and rng.random() < config.unconditional_fraction:
        ids, supervised = unconditional_example(
          model, images[rng.integers(len(images))].read_bytes()
        )
      else:
        ids, supervised = examples[rng.integers(len(examples))]
      rows.append((ids[: config.max_length], supervised[: config.max_length]))
    # Padded to a multiple of 256 (at most max_length): a few compiled shapes, little padding.
    longest = max(len(ids) for ids, _ in rows)
    length = min(config.max_length, -(-longest // LENGTH_QUANTUM) * LENGTH_QUANTUM)
    tokens = np.full((config.batch_size, length), -1, np.int32)
    mask = np.zeros((config.batch_size, length), bool)
    for row, (ids, supervised) in enumerate(rows):
      tokens[row, : len(ids)], mask[row, : len(ids)] = ids, supervised
    params, opt_state, loss = step(params, opt_state, jnp.asarray(tokens), jnp.asarray(mask))
    losses.append(float(loss))
    if len(losses) % LOG_EVERY == 0:
      logging.info("tiny model training: step %d, loss %.3f", len(losses), np.mean(losses[-10:]))
  model.params = params
  model.reset()
  return losses
