"""A tiny unified model: one decoder over text tokens and palette-patch image tokens.

Vocabulary: `[0, V_text)` are the text tokenizer's ids (a BPE from
`drivekd_jax.data.tokenizer`, with `<|im_start|>`, `<|im_end|>`, `<img>`, `</img>`), then
`[V_text, V_text + 192)` the image tokens of `PaletteTokenizer` (12 x 12 = 144 per image). The
decoder is `drivekd_jax.models.qwen2.Decoder`; its output projection's image-token block is the
image head (Chameleon-style shared head); the output mode picks the window of logits sampled.

Chat format (BAGEL-like, images inline):
  <|im_start|>{role}\n{text | <img> 144 image tokens </img>}...<|im_end|>\n
and a turn to answer ends with `<|im_start|>assistant\n` (text) or `<|im_start|>assistant\n<img>`
(image: exactly 144 tokens are then sampled).

Multi-turn rollout (`respond`): one KV cache of fixed length is carried across turns and across
calls. Each call tokenizes the whole official history, keeps the longest prefix already in the
cache (rolling the cache back to it if the history differs, e.g. a reference-history control or
a re-tokenized answer), appends the rest as one padded chunk (a few fixed bucket lengths), and
samples with `drivekd_jax.models.sampling.SamplerLoop.turn`, jitted once per (mode, bucket).
The cache has 2N rows: N samples decoded as one batch (best-of-N), plus N unconditional rows for
classifier-free guidance of image tokens (they see only the image-turn header; logits
`u + s (c - u)`). Text is sampled in the text window with `<|im_end|>` as stop token.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from drivekd_jax.data import tokenizer as text_tokenizer
from drivekd_jax.models.config import DecoderConfig
from drivekd_jax.models.qwen2 import Decoder, KVCache
from drivekd_jax.models.sampling import SamplerLoop, SamplingMethod
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.carried_cache import CarriedCacheModel
from imug_jax.models.protocol import Message, ModelError, Response


@dataclasses.dataclass(frozen=True)
class WindowSampling(SamplingMethod):
  """Temperature / top-p sampling restricted to token ids in `[low, high)`."""

  low: int = 0
  high: int = 0

  def next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    ids = jnp.arange(logits.shape[-1])
    logits = jnp.where((ids >= self.low) & (ids < self.high), logits, -jnp.inf)
    return super().next_tokens(logits, rng)


@dataclasses.dataclass(frozen=True)
class GuidedSampling(WindowSampling):
  """Classifier-free guidance over a batch laid out `[N conditional rows, N unconditional rows]`.

  Both rows of a pair receive the same token, so the unconditional rows follow the image being
  drawn. `guidance` 1.0 is plain conditional sampling.
  """

  guidance: float = 3.0
  num_cond: int = 1

  def next_tokens(self, logits: jax.Array, rng: jax.Array) -> jax.Array:
    """fp32 `[2N, V]` -> int32 `[2N]`."""
    n = self.num_cond
    cond, uncond = logits[:n], logits[n : 2 * n]
    guided = jnp.where(
      jnp.isfinite(cond) & jnp.isfinite(uncond), uncond + self.guidance * (cond - uncond), -jnp.inf
    )
    tokens = super().next_tokens(guided, rng)
    return jnp.concatenate([tokens, tokens])


@dataclasses.dataclass(frozen=True)
class TinyConfig:
  """Shapes and decoding settings of the tiny unified model.

  Attributes:
    hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: decoder shape.
    cache_length: KV-cache slots S (fixed; the cache is reset when a history outgrows it).
    chunk_buckets: allowed lengths of an appended chunk (each is one compiled program per mode).
    max_text_tokens: text tokens sampled per text turn at most.
    guidance: classifier-free guidance scale for image tokens.
    num_samples: N, answers decoded together per call (`respond_batch`; `respond` uses the first).
    image_grid, image_patch: the palette tokenizer's lattice (grid x grid tokens per image).
  """

  hidden_size: int = 64
  num_layers: int = 2
  num_heads: int = 4
  num_kv_heads: int = 2
  intermediate_size: int = 128
  cache_length: int = 4096
  chunk_buckets: tuple[int, ...] = (64, 256, 1024)
  max_text_tokens: int = 16
  guidance: float = 3.0
  num_samples: int = 1
  image_grid: int = 12
  image_patch: int = 8


def _turn(loop: SamplerLoop, params, chunk, chunk_mask, cache, pending, pending_valid, rng):
  return loop.turn(params, chunk, chunk_mask, cache, pending, pending_valid, rng)


# One compiled program per (loop settings, shapes), shared by every model instance.
_JITTED_TURN = jax.jit(_turn, static_argnums=0, donate_argnums=4)


def split_into_pieces(tokens: list[int], largest: int, suffix: int) -> list[list[int]]:
  """Splits a chunk into pieces of at most `largest` tokens, in one pass over it.

  Pieces are cut from the front; the last piece keeps the final `suffix` tokens (the turn's
  header) whole, so it may be shorter than `largest` where a full cut would split the header.
  """
  pieces, start, end = [], 0, len(tokens)
  while end - start > largest:
    cut = min(largest, end - start - suffix)
    if cut <= 0:  # A header longer than a bucket: the last piece fails the bucket check.
      break
    pieces.append(tokens[start : start + cut])
    start += cut
  return [*pieces, tokens[start:]]


class TinyUnifiedModel(CarriedCacheModel):
  """A `UnifiedModel` running a small `Decoder` in process (see the module docstring).

  Args:
    tokenizer: the text tokenizer (needs `<|im_start|>`, `<|im_end|>`, `<img>`, `</img>`).
    config: `TinyConfig`.
    seed: parameter initialisation seed.
    name: the model's folder name in the output layout.
    max_traces: if set, the jitted turn fails when traced more often (tests: no retracing).
  """

  def __init__(
    self,
    tokenizer: text_tokenizer.Tokenizer,
    config: TinyConfig = TinyConfig(),
    *,
    seed: int = 0,
    name: str = "tiny_umm",
    max_traces: int | None = None,
  ):
    self.name = name
    self.config = config
    self.tokenizer = tokenizer
    self.images = itok.PaletteTokenizer(config.image_grid, config.image_patch)
    self.text_vocab = tokenizer.vocab_size
    ids = tokenizer.special_ids
    self.im_start, self.im_end = ids[text_tokenizer.IM_START], ids[text_tokenizer.IM_END]
    self.img_start, self.img_end = ids[text_tokenizer.IMG_START], ids[text_tokenizer.IMG_END]
    self.decoder_config = DecoderConfig(
      vocab_size=self.text_vocab + self.images.vocab_size,
      hidden_size=config.hidden_size,
      num_layers=config.num_layers,
      num_heads=config.num_heads,
      num_kv_heads=config.num_kv_heads,
      intermediate_size=config.intermediate_size,
      rope_theta=10_000.0,
    )
    decoder = Decoder(self.decoder_config, rngs=nnx.Rngs(seed))
    self.graphdef, self.params = nnx.split(decoder)
    if max_traces is None:
      self._jitted_turn = _JITTED_TURN
    else:  # A private program, so that the count is this instance's.
      self._jitted_turn = jax.jit(
        chex.assert_max_traces(_turn, n=max_traces), static_argnums=0, donate_argnums=4
      )
    self._lock = threading.Lock()
    self.newline_tokens = [int(t) for t in tokenizer.encode("\n")]
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    # A byte-level token's string has one character per byte: an upper bound of its characters.
    self.token_budget = protocol.TokenBudget(
      max_tokens=config.cache_length - 1 - min(config.max_text_tokens, self.images.num_tokens),
      tokens_per_image=self.images.num_tokens + 2,
      max_chars_per_token=max(len(token) for token in vocab),
    )
    self.reset()

  # ------------------------------------------------------------------------------ tokenization

  def _header(self, role: str) -> list[int]:
    return [self.im_start, *map(int, self.tokenizer.encode(f"{role}\n"))]

  def image_tokens(self, data: bytes) -> list[int]:
    """Encoded image -> `<img>` + 144 image-token ids (offset by V_text) + `</img>`."""
    codes = self.images.encode(itok.read_image(data))
    return [self.img_start, *(int(c) + self.text_vocab for c in codes), self.img_end]

  def encode_message(self, msg: Message) -> list[int]:
    tokens = self._header(msg["role"])
    for item in msg["content"]:
      if item["type"] == "text":
        tokens += map(int, self.tokenizer.encode(item["text"]))
      else:
        tokens += self.image_tokens(protocol.decode_image(item["image"]))
    return tokens + [self.im_end, *self.newline_tokens]

  def prompt_suffix(self, output_mode: str) -> list[int]:
    """The tokens that force the output mode: the assistant header (+ `<img>`)."""
    header = self._header("assistant")
    return header + [self.img_start] if output_mode == "image_only" else header

  def encode_prompt(self, history: Sequence[Message], output_mode: str) -> list[int]:
    tokens = []
    for msg in history:
      tokens += self.encode_message(msg)
    return tokens + self.prompt_suffix(output_mode)

  # ------------------------------------------------------------------------------- the cache

  @property
  def rows(self) -> int:
    return 2 * self.config.num_samples

  def reset(self) -> None:
    """Forgets the carried cache (the next call re-encodes its whole history)."""
    self.cache = KVCache.create(self.decoder_config, self.rows, self.config.cache_length)
    self.tokens: list[int] = []  # Real tokens held by the conditional rows, in order.
    self.slots: list[int] = []  # The cache slot of each of them.

  def _committed(self) -> list:
    return self.tokens

  def _pieces(self, delta: list[int], suffix: int) -> list[list[int]]:
    return split_into_pieces(delta, self.config.chunk_buckets[-1], suffix)

  def _slots_needed(self, pieces: list[list[int]], new_tokens: int) -> int:
    """Cache slots a call occupies at its peak: earlier pieces stay, the last one samples."""
    kept = sum(1 + self._bucket(len(p)) for p in pieces[:-1])
    return kept + max(
      1 + self._bucket(len(pieces[-1])) + new_tokens,
      1 + self.config.max_text_tokens if len(pieces) > 1 else 0,
    )

  def _respond(self, history, output_mode, temperature, rng) -> list[Response]:
    image_mode = output_mode == "image_only"
    prompt = self.encode_prompt(history, output_mode)
    suffix = len(self.prompt_suffix(output_mode))
    new_tokens = self.images.num_tokens if image_mode else self.config.max_text_tokens
    common = 0
    for a, b in zip(prompt, self.tokens):
      if a != b:
        break
      common += 1
    keep = min(common, len(prompt) - suffix)  # The chunk always holds the whole header.
    self._rollback(keep)
    pieces = self._pieces(prompt[keep:], suffix)
    if int(self.cache.length) + self._slots_needed(pieces, new_tokens) > self.config.cache_length:
      self.reset()  # History outgrew the carried cache: start over with the whole prompt.
      pieces = self._pieces(prompt, suffix)
      if self._slots_needed(pieces, new_tokens) > self.config.cache_length:
        raise ModelError(
          f"a prompt of {len(prompt)} tokens does not fit the cache "
          f"({self.config.cache_length} slots)"
        )
    for piece in pieces[:-1]:  # Prefill only: append, then drop what was sampled.
      kept = len(self.tokens) + len(piece)
      self._append(piece, image_mode=False, temperature=temperature, rng=rng, suffix=0)
      self._rollback(kept)
    sampled, counts = self._append(
      pieces[-1], image_mode=image_mode, temperature=temperature, rng=rng, suffix=suffix
    )
    n = self.config.num_samples
    if n > 1:  # Different rows hold different answers: keep only the shared prompt.
      self._rollback(len(self.tokens))
    return [self._to_response(sampled[i, : counts[i]], image_mode) for i in range(n)]

  def _append(
    self, piece: list[int], *, image_mode: bool, temperature: float, rng: jax.Array, suffix: int
  ) -> tuple[np.ndarray, np.ndarray]:
    """Writes `piece` into the cache and samples; returns (tokens [2N, T], counts [2N]).

    The piece's tokens are committed; with N == 1 so are the sampled tokens that were fed back
    (all but the last, pending one).
    """
    n = self.config.num_samples
    bucket = self._bucket(len(piece))
    chunk = np.zeros((self.rows, bucket), np.int32)
    mask = np.zeros((self.rows, bucket), bool)
    chunk[:, : len(piece)] = piece
    mask[:n, : len(piece)] = True
    if image_mode:  # Unconditional rows: only the image-turn header.
      mask[n:, len(piece) - suffix : len(piece)] = True
    window = (
      dict(low=self.text_vocab, high=self.decoder_config.vocab_size)
      if image_mode
      else (dict(low=0, high=self.text_vocab))
    )
    if image_mode:
      method = GuidedSampling(
        temperature=temperature, guidance=self.config.guidance, num_cond=n, **window
      )
    else:
      method = WindowSampling(temperature=temperature, **window)
    loop = SamplerLoop(
      graphdef=self.graphdef,
      max_new_tokens=self.images.num_tokens if image_mode else self.config.max_text_tokens,
      stop_token_ids=() if image_mode else (self.im_end,),
      method=method,
    )
    start = int(self.cache.length)
    state = self._jitted_turn(
      loop,
      self.params,
      jnp.asarray(chunk),
      jnp.asarray(mask),
      self.cache,
      jnp.zeros((self.rows,), jnp.int32),
      jnp.zeros((self.rows,), bool),
      rng,
    )
    self.cache = state.cache
    first_slot = start + 1  # Slot `start` is the (unused) pending-token slot.
    self.tokens += piece
    self.slots += range(first_slot, first_slot + len(piece))
    sampled = np.asarray(jax.device_get(state.tokens))
    counts = np.asarray(jax.device_get(state.num_tokens))
    if n == 1:
      fed = sampled[0, : counts[0] - 1].tolist()
      self.tokens += fed
      self.slots += range(first_slot + bucket, first_slot + bucket + len(fed))
    return sampled, counts

  def _to_response(self, tokens: np.ndarray, image_mode: bool) -> Response:
    if image_mode:
      codes = tokens - self.text_vocab
      if codes.shape[0] != self.images.num_tokens or codes.min() < 0:
        raise ModelError(
          f"image decoding produced {codes.shape[0]} valid tokens, expected "
          f"{self.images.num_tokens}"
        )
      return Response(image=itok.png_bytes(self.images.decode(codes)))
    if tokens.size and tokens[-1] == self.im_end:
      tokens = tokens[:-1]
    return Response(text=self.tokenizer.decode(tokens.tolist()))
