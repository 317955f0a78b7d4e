"""Teacher-forced training of the tiny unified model on the synthetic benchmark's ground truth.

Each synthetic sample becomes one dialogue in the official message format whose assistant turns
are the ground truth: the target image of an image turn, the gold letters of a text turn (a
dynamic answer resolved exactly from the ground-truth image by the synthetic oracle). It is
tokenized exactly as the model tokenizes a history at inference (`TinyUnifiedModel.encode_message`)
and trained with next-token cross-entropy on the assistant content only (answer text or
`<img>`-enclosed image tokens, and the closing `<|im_end|>`). A fraction of the examples is an
image alone after the bare assistant header, which is the context the unconditional rows of
classifier-free guidance see.

The test-time-scaling strategies (`imug_jax.tts`) ask the model things the benchmark never does;
with the fractions of `TrainConfig` some rows teach them, each on an image turn of the train
split after its ground-truth history, in the wrappers' exact messages and prompts:

  plan   `ChainOfThought`: the plan (`synthetic.plan_text` of the target: objects, colours,
         counts, positions), then the target image after `DRAW_PROMPT` with the plan in context;
  check  `SelfVerification`: a candidate image, `CHECK_PROMPT`, "YES" when it is the target
         (the oracle's match is 1), else "NO";
  rate   `SelfVerifier` (best-of-N): a candidate, `RATE_PROMPT`, the digit of the oracle judge's
         point score of it (5 x patch match, rounded).

A candidate is the target itself (`target_candidate_fraction`) or a wrong one made cheaply from
the ground truth (`wrong_candidate`: a colour swapped, the drawing moved, part of it erased,
another turn's target, or a share of its patches replaced by random ones like a poor sample).

`configs/imug/demo.py` fits it on the synthetic train split (another generator seed than the
evaluated samples) for a few minutes on a CPU, which lifts its image turns well above the
untrained model's under the oracle judge (`imug_jax.judges.oracle`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from imug_jax.data import release as release_lib
from imug_jax.data import synthetic
from imug_jax.judges import oracle
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.protocol import Message, Response
from imug_jax.models.tiny import TinyUnifiedModel
from imug_jax.rollout.runner import user_message
from imug_jax.tts import verifiers, wrappers

LOG_EVERY = 50
LENGTH_QUANTUM = 256
WRONG_KINDS = ("recolour", "shift", "erase", "other_turn", "noise")
ROW_KINDS = ("dialogue", "unconditional", "plan", "check", "rate")
YES, NO = "YES", "NO"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Steps of `batch_size` rows cut to `max_length` tokens; Adam at `learning_rate`.

  Each row is, with these probabilities, a lone image (`unconditional_fraction`: guidance's
  unconditional context), a plan, check or rate example (module docstring), else a whole
  ground-truth dialogue. `target_candidate_fraction` of the check and rate candidates are the
  target itself; the others are wrong ones drawn by kind with the weights `wrong_candidates`
  ({kind: weight} over `WRONG_KINDS`; normalised).
  """

  steps: int = 100
  batch_size: int = 4
  max_length: int = 1024
  learning_rate: float = 3e-3
  unconditional_fraction: float = 0.1
  seed: int = 0
  plan_fraction: float = 0.0
  check_fraction: float = 0.0
  rate_fraction: float = 0.0
  target_candidate_fraction: float = 0.5
  wrong_candidates: Mapping[str, float] = dataclasses.field(
    default_factory=lambda: dict.fromkeys(WRONG_KINDS, 1.0)
  )

  def row_probabilities(self) -> np.ndarray:
    """Probabilities of `ROW_KINDS` [5]; raises ValueError on a bad mixture."""
    shares = {
      "unconditional_fraction": self.unconditional_fraction,
      "plan_fraction": self.plan_fraction,
      "check_fraction": self.check_fraction,
      "rate_fraction": self.rate_fraction,
    }
    for name, value in shares.items():
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"model.train.{name} must be in [0, 1], got {value!r}")
    if sum(shares.values()) > 1.0 + 1e-9:
      raise ValueError(f"model.train fractions sum to more than 1: {shares}")
    return np.asarray([max(0.0, 1.0 - sum(shares.values())), *shares.values()])

  def wrong_probabilities(self) -> np.ndarray:
    """Probabilities of `WRONG_KINDS` [5]; raises ValueError on unknown kinds or no weight."""
    unknown = set(self.wrong_candidates) - set(WRONG_KINDS)
    weights = np.asarray([float(self.wrong_candidates.get(k, 0.0)) for k in WRONG_KINDS])
    if unknown or (weights < 0).any() or weights.sum() <= 0:
      raise ValueError(
        f"model.train.wrong_candidates must weigh some of {WRONG_KINDS} (>= 0), got "
        f"{dict(self.wrong_candidates)}"
      )
    if not 0.0 <= self.target_candidate_fraction <= 1.0:
      raise ValueError(
        f"model.train.target_candidate_fraction must be in [0, 1], got "
        f"{self.target_candidate_fraction!r}"
      )
    return weights / weights.sum()


def strategy_texts() -> list[str]:
  """What the strategies' rows add to the text the tokenizer learns: prompts and answers."""
  return [
    wrappers.PLAN_PROMPT,
    wrappers.DRAW_PROMPT,
    wrappers.CHECK_PROMPT,
    verifiers.RATE_PROMPT,
    YES,
    NO,
    "0 1 2 3 4 5",
  ]


def plan_texts(bench: release_lib.Release) -> list[str]:
  """The plan of every image turn of a synthetic benchmark (for the tokenizer's corpus)."""
  return [
    synthetic.plan_text(key.subdomain, _target(path))
    for (key, _), path in synthetic.ground_truth_images(bench.data_dir).items()
  ]


def _target(path: Path) -> np.ndarray:
  return oracle.lattice_tokens(itok.read_image(Path(path).read_bytes()))


def _png(tokens: np.ndarray) -> bytes:
  return itok.png_bytes(synthetic.TOKENIZER.decode(np.asarray(tokens).reshape(-1)))


def wrong_candidate(
  kind: str, target: np.ndarray, others: Sequence[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
  """A wrong image for a target, tokens [G, G] -> [G, G], never equal to it.

  Kinds: "recolour" (one colour of the drawing becomes another palette colour, lines kept),
  "shift" (the drawing moved 1-2 patches, white where it left), "erase" (a band of 1-4 rows of
  the drawing made white), "other_turn" (one of `others`, the sample's other targets; any other
  target when none differs), "noise" (a random share of the patches replaced by random tokens).
  A kind that cannot change this target (e.g. "other_turn" without others) gives "noise".
  """
  target = np.asarray(target)
  tok = synthetic.TOKENIZER
  colours, edges = tok.colours(target), target % itok.NUM_EDGE_CODES
  white, black = itok.colour_index("white"), itok.colour_index("black")
  candidate = None
  if kind == "recolour":
    painted = sorted(set(np.unique(colours).tolist()) - {white, black})
    if painted:
      old = painted[int(rng.integers(len(painted)))]
      new = [c for c in range(len(itok.COLOUR_NAMES)) if c not in (old, white, black)]
      colour = new[int(rng.integers(len(new)))]
      candidate = np.where(colours == old, colour * itok.NUM_EDGE_CODES + edges, target)
  elif kind == "shift":
    dy, dx = 0, 0
    while dy == dx == 0:
      dy, dx = (int(v) for v in rng.integers(-2, 3, size=2))
    candidate = np.full_like(target, tok.token("white"))
    grid = target.shape[0]
    src = target[max(0, -dy) : grid - max(0, dy), max(0, -dx) : grid - max(0, dx)]
    candidate[max(0, dy) : max(0, dy) + src.shape[0], max(0, dx) : max(0, dx) + src.shape[1]] = src
  elif kind == "erase":
    rows = np.flatnonzero((target != tok.token("white")).any(axis=1))
    if rows.size:
      start = int(rows[rng.integers(rows.size)])
      candidate = target.copy()
      candidate[start : start + int(rng.integers(1, 5))] = tok.token("white")
  elif kind == "other_turn":
    different = [o for o in others if not np.array_equal(o, target)]
    if different:
      candidate = np.asarray(different[int(rng.integers(len(different)))])
  elif kind != "noise":
    raise ValueError(f"unknown wrong-candidate kind {kind!r}; known: {WRONG_KINDS}")
  while candidate is None or np.array_equal(candidate, target):
    replaced = rng.random(target.shape) < rng.uniform(0.05, 1.0)
    noise = rng.integers(0, tok.vocab_size, target.shape)
    candidate = np.where(replaced, noise, target).astype(target.dtype)
  return candidate


def check_label(target: np.ndarray, candidate: np.ndarray) -> str:
  """ "YES" when the oracle matches the candidate with the target in full, else "NO"."""
  return YES if oracle.patch_match(target, candidate) == 1.0 else NO


def rating_digit(match: float) -> int:
  """The oracle judge's point score of a patch match (5 x match), rounded half up to a digit."""
  return int(np.floor(oracle.MAX_POINT_SCORE * match + 0.5))


def rate_label(target: np.ndarray, candidate: np.ndarray) -> str:
  """The rate row's answer: the digit of the oracle's score of the candidate."""
  return str(rating_digit(oracle.patch_match(target, candidate)))


def ground_truth_messages(bench: release_lib.Release, sample) -> list[tuple[Message, int | None]]:
  """The sample as a dialogue with ground-truth assistant turns: (message, turn) in order, the
  turn being that of a user or assistant message (None for the system prompt)."""
  truth = synthetic.ground_truth_images(bench.data_dir)
  meta = synthetic.load_meta(bench.data_dir)
  messages: list[tuple[Message, int | None]] = []
  if sample.system_prompt:
    messages.append((protocol.message("system", [protocol.text_item(sample.system_prompt)]), None))
  for task in sample.tasks:
    messages.append((user_message(task, bench.images_dir), task.turn))
    if task.modality == "image":
      response = Response(image=truth[(sample.key, task.turn)].read_bytes())
    else:
      response = Response(text=synthetic.ground_truth_answer(sample.key, task, truth, meta))
    messages.append((protocol.assistant_message(response), task.turn))
  return messages


def encode_rows(
  model: TinyUnifiedModel, messages: Sequence[tuple[Message, bool]]
) -> tuple[list[int], list[bool]]:
  """(tokens, loss mask) of messages, each with whether its content is supervised.

  A supervised message is predicted from its first content token (for an image, from the first
  image token, since `<img>` is part of the forced prompt) to its `<|im_end|>`; the trailing
  newline is not predicted.
  """
  header = len(model.prompt_suffix("text_only"))
  newline = len(model.newline_tokens)
  tokens: list[int] = []
  mask: list[bool] = []
  for message, supervised in messages:
    ids = model.encode_message(message)
    start = header + (message["content"][0]["type"] == "image")
    tokens.extend(ids)
    mask.extend(supervised and start <= i < len(ids) - newline for i in range(len(ids)))
  return tokens, mask


def ground_truth_dialogue(
  model: TinyUnifiedModel, bench: release_lib.Release, sample
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [L], loss mask bool [L]) of one sample with ground-truth assistant turns,
  tokenized as the model tokenizes a history at inference; every assistant turn is supervised."""
  tokens, mask = encode_rows(
    model, [(m, m["role"] == "assistant") for m, _ in ground_truth_messages(bench, sample)]
  )
  return np.asarray(tokens, np.int32), np.asarray(mask, bool)


@dataclasses.dataclass(frozen=True)
class ImageTurn:
  """An image turn of the train split: the tokens up to and including its user message (the
  ground-truth history), its target [G, G], the sample's other targets, the script's name."""

  name: str
  prefix: tuple[int, ...]
  target: np.ndarray
  others: tuple[np.ndarray, ...]
  subdomain: str


class StrategyRows:
  """The plan, check and rate rows of a synthetic train split (module docstring).

  Args:
    model: the tiny model (its tokenization).
    bench: the synthetic train split.
    config: the mixture (`target_candidate_fraction`, `wrong_candidates`) and `max_length`.
  """

  def __init__(self, model: TinyUnifiedModel, bench: release_lib.Release, config: TrainConfig):
    self.model, self.config = model, config
    self.wrong_probabilities = config.wrong_probabilities()
    self.cot = wrappers.ChainOfThought(model)
    truth = synthetic.ground_truth_images(bench.data_dir)
    self.turns: list[ImageTurn] = []
    for sample in bench.samples or ():
      targets = {
        t.turn: _target(truth[(sample.key, t.turn)]) for t in sample.tasks if t.modality == "image"
      }
      prefix: list[int] = []
      for message, turn in ground_truth_messages(bench, sample):
        prefix += model.encode_message(message)
        if message["role"] == "user" and turn in targets:
          self.turns.append(
            ImageTurn(
              name=f"{bench.data_dir}: sample {sample.key} turn {turn}",
              prefix=tuple(prefix),
              target=targets[turn],
              others=tuple(v for t, v in targets.items() if t != turn),
              subdomain=sample.key.subdomain,
            )
          )
    if not self.turns:
      raise ValueError(f"{bench.data_dir}: no image turns for the strategies' rows")

  def _row(self, turn: ImageTurn, kind: str, messages) -> tuple[np.ndarray, np.ndarray]:
    tokens, mask = encode_rows(self.model, messages)
    length = len(turn.prefix) + len(tokens)
    if length > self.config.max_length:
      raise ValueError(
        f"{turn.name}: its {kind} row has {length} tokens, more than model.train.max_length "
        f"{self.config.max_length}"
      )
    return (
      np.asarray([*turn.prefix, *tokens], np.int32),
      np.asarray([False] * len(turn.prefix) + mask, bool),
    )

  def plan(self, turn: ImageTurn) -> tuple[np.ndarray, np.ndarray]:
    """ChainOfThought's exchange: the plan and then the target image, both supervised."""
    plan = synthetic.plan_text(turn.subdomain, turn.target)
    draw = self.cot.draw_request([], plan)
    image = protocol.assistant_message(Response(image=_png(turn.target)))
    return self._row(turn, "plan", [(m, m["role"] == "assistant") for m in [*draw, image]])

  def candidate(self, turn: ImageTurn, rng: np.random.Generator) -> np.ndarray:
    """The target itself (`target_candidate_fraction`) or a wrong candidate [G, G]."""
    if rng.random() < self.config.target_candidate_fraction:
      return turn.target
    kind = WRONG_KINDS[rng.choice(len(WRONG_KINDS), p=self.wrong_probabilities)]
    return wrong_candidate(kind, turn.target, turn.others, rng)

  def judged(
    self, turn: ImageTurn, candidate: np.ndarray, kind: str
  ) -> tuple[np.ndarray, np.ndarray]:
    """The candidate as the assistant's image, the check or rate question, its oracle label."""
    if kind == "check":
      question, label = wrappers.CHECK_PROMPT, check_label(turn.target, candidate)
    elif kind == "rate":
      question, label = verifiers.RATE_PROMPT, rate_label(turn.target, candidate)
    else:
      raise ValueError(f"a judged row is 'check' or 'rate', got {kind!r}")
    asked = verifiers.with_candidate([], _png(candidate), question)
    answer = protocol.assistant_message(Response(text=label))
    return self._row(turn, kind, [(m, False) for m in asked] + [(answer, True)])

  def sample(self, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random row of `kind` ("plan", "check" or "rate") on a random image turn."""
    turn = self.turns[int(rng.integers(len(self.turns)))]
    if kind == "plan":
      return self.plan(turn)
    return self.judged(turn, self.candidate(turn, rng), kind)


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

  probabilities = config.row_probabilities()
  strategies = StrategyRows(model, bench, config) if probabilities[2:].sum() > 0 else None
  rng = np.random.default_rng(config.seed)
  params, losses = model.params, []
  for _ in range(config.steps):
    rows = []
    for _ in range(config.batch_size):
      kind = ROW_KINDS[rng.choice(len(ROW_KINDS), p=probabilities)]
      if kind == "unconditional" and images:
        ids, supervised = unconditional_example(
          model, images[rng.integers(len(images))].read_bytes()
        )
      elif kind in ("plan", "check", "rate"):
        ids, supervised = strategies.sample(kind, rng)
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
