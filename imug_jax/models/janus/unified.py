"""Janus as an in-process `UnifiedModel`, with a jitted multi-turn rollout.

Chat format (DeepSeek / Janus "deepseek" template; roles are plain text):

  <｜begin▁of▁sentence｜>{system}\n\n<|User|>: {content}\n\n
  <|Assistant|>: {content}<｜end▁of▁sentence｜><|User|>: ...

(one line; broken here for width).

A content is its items joined by "\n"; an image item is `<begin_of_image>` + `num_image_tokens`
`<image_placeholder>` + `<end_of_image>`, the placeholders replaced by the image's SigLIP features
(images are resized, padded to a square with the mean colour and normalised as the Janus image
processor does). A turn to answer ends with `<|Assistant|>:` (text) or `<|Assistant|>:
<begin_of_image>` (image: `num_image_tokens` codes are sampled with classifier-free guidance and
decoded to pixels by the VQ decoder, at the tokenizer's resolution).

Multi-turn rollout (`respond`): one KV cache of fixed length with 2N rows (N samples decoded as
one batch, then N unconditional rows for guidance) is carried across turns and calls. Each call
encodes the whole official history as a list of keys (a text id, or `(image digest, index)` for
an image feature), keeps the longest prefix already in the cache (rolling the cache back if the
history differs, e.g. a generated image that comes back as an understanding input), and appends
the rest as one chunk padded to a bucket length. The chunk's embeddings are built on device (text
embeddings, then each image's aligned features written in place), and the turn runs
`SamplerLoop.turn`, jitted once per (mode, bucket): text through the LM head, image codes through
the generation embedding / head (`network.ImageGeneration`). For an image turn the unconditional
rows get the whole prompt with every token but BOS and `<begin_of_image>` replaced by the pad
token (as transformers and the original Janus do); they are emptied again afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
import tokenizers
from flax import nnx
from PIL import Image

from drivekd_jax.models.qwen2 import KVCache
from drivekd_jax.models.sampling import SamplerLoop, SamplingMethod
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.carried_cache import CarriedCacheModel
from imug_jax.models.janus.checkpoint import from_pretrained
from imug_jax.models.janus.generate import JanusGenerator, image_sampling
from imug_jax.models.janus.network import Janus
from imug_jax.models.protocol import Message, ModelError, Response

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
IMAGE = "<image_placeholder>"
BOI = "<begin_of_image>"
EOI = "<end_of_image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, BOI, EOI)
ROLE_NAMES = {"user": "<|User|>", "assistant": "<|Assistant|>"}


class JanusTokenizer:
  """The text tokenizer (`tokenizer.json`) and the ids of Janus' special tokens."""

  def __init__(self, backend: tokenizers.Tokenizer, source: str = "<in-memory>"):
    self.backend = backend
    self.source = source
    ids = {}
    for token in SPECIAL_TOKENS:
      token_id = backend.token_to_id(token)
      if token_id is None:
        raise ModelError(f"tokenizer {source}: special token {token!r} is missing")
      ids[token] = token_id
    self.pad_id, self.bos_id, self.eos_id = ids[PAD], ids[BOS], ids[EOS]
    self.image_id, self.boi_id, self.eoi_id = ids[IMAGE], ids[BOI], ids[EOI]

  @classmethod
  def from_path(cls, path: str | os.PathLike) -> JanusTokenizer:
    """From a `tokenizer.json` file or a directory holding one."""
    path = os.fspath(path)
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise ModelError(f"{path}: no tokenizer.json")
    return cls(tokenizers.Tokenizer.from_file(file), source=file)

  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.backend.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def train_tokenizer(texts: Sequence[str], vocab_size: int, path: str | os.PathLike):
  """A small byte-level BPE with the Janus special tokens at ids 0..5 (tests and demos)."""
  backend = tokenizers.Tokenizer(tokenizers.models.BPE())
  backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=vocab_size,
    show_progress=False,
    special_tokens=[tokenizers.AddedToken(t, special=True) for t in SPECIAL_TOKENS],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  backend.train_from_iterator(list(texts), trainer=trainer)
  backend.save(os.fspath(path))
  return JanusTokenizer(backend, source=os.fspath(path))


@dataclasses.dataclass(frozen=True)
class JanusRolloutConfig:
  """Decoding settings of the in-process Janus.

  Attributes:
    cache_length: KV-cache slots S (the cache is reset when a history outgrows it).
    chunk_buckets: allowed lengths of an appended chunk (each one program per mode).
    max_text_tokens: text tokens sampled per text turn at most.
    guidance: classifier-free guidance scale for image tokens (Janus-Pro uses 5).
    num_samples: N, answers decoded together per call (`respond_batch`).
    top_p: nucleus size when sampling.
    image_mean, image_std: the understanding processor's normalisation (Janus-Pro: 0.5, 0.5).
  """

  cache_length: int = 8192
  chunk_buckets: tuple[int, ...] = (256, 1024, 4096)
  max_text_tokens: int = 256
  guidance: float = 5.0
  num_samples: int = 1
  top_p: float = 1.0
  image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
  image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def _turn(loop: SamplerLoop, params, chunk, chunk_mask, cache, pending, pending_valid, rng):
  return loop.turn(params, chunk, chunk_mask, cache, pending, pending_valid, rng)


def _text_embeds(graphdef, params, ids):
  return nnx.merge(graphdef, params).language_model.embed(ids)


def _insert_features(embeds, features, start, num_rows):
  """Writes `features [N, D]` into rows `[0, num_rows)` of `embeds [R, T, D]` from `start`."""
  rows = jnp.broadcast_to(features.astype(embeds.dtype), (num_rows, *features.shape))
  return jax.lax.dynamic_update_slice(embeds, rows, (0, start, 0))


def _image_features(graphdef, params, pixels):
  return nnx.merge(graphdef, params).image_features(pixels)[0]


def _decode_codes(graphdef, params, codes):
  return nnx.merge(graphdef, params).vqmodel.decode(codes)


class JanusUnifiedModel(CarriedCacheModel):
  """A `UnifiedModel` running Janus in process (see the module docstring).

  Args:
    janus: the network.
    tokenizer: its `JanusTokenizer`.
    config: `JanusRolloutConfig`.
    name: the model's folder name in the output layout.
    max_traces: if set, each jitted function fails when traced more often (tests: no retrace).
  """

  def __init__(
    self,
    janus: Janus,
    tokenizer: JanusTokenizer,
    config: JanusRolloutConfig = JanusRolloutConfig(),
    *,
    name: str = "janus",
    max_traces: int | None = None,
  ):
    self.name = name
    self.config = config
    self.janus = janus
    self.tokenizer = tokenizer
    if tokenizer.image_id != janus.config.image_token_id:
      raise ModelError(
        f"tokenizer {tokenizer.source}: {IMAGE} is id {tokenizer.image_id} but the model's "
        f"image_token_id is {janus.config.image_token_id}"
      )
    if tokenizer.vocab_size > janus.config.text.vocab_size:
      raise ModelError(
        f"tokenizer {tokenizer.source} has {tokenizer.vocab_size} ids, more than the model's "
        f"vocabulary of {janus.config.text.vocab_size}"
      )
    self.num_image_tokens = janus.config.vision.num_image_tokens
    split = JanusGenerator(janus)  # The whole model, the text LM and the image-token LM.
    self.graphdef, self.params = split.graphdef, split.params
    self.text_graphdef, self.text_params = split.text_graphdef, split.text_params
    self.image_graphdef, self.image_params = split.image_graphdef, split.image_params

    def jit(fn, **kw):
      fn = fn if max_traces is None else chex.assert_max_traces(fn, n=max_traces)
      return jax.jit(fn, **kw)

    self._jitted_turn = jit(_turn, static_argnums=0, donate_argnums=4)
    self._text_embeds = jit(_text_embeds, static_argnums=0)
    self._insert = jit(_insert_features, static_argnums=3, donate_argnums=0)
    self._features = jit(_image_features, static_argnums=0)
    self._decode = jit(_decode_codes, static_argnums=0)
    self._feature_cache: dict[str, jax.Array] = {}
    self._lock = threading.Lock()
    self.reset()

  @classmethod
  def from_pretrained(
    cls, path: str | os.PathLike, config: JanusRolloutConfig | None = None, **kwargs
  ) -> JanusUnifiedModel:
    """Network, tokenizer (`tokenizer.json`) and normalisation (`preprocessor_config.json`,
    when present) from one transformers checkpoint directory."""
    config = config or JanusRolloutConfig()
    processor = os.path.join(os.fspath(path), "preprocessor_config.json")
    if os.path.exists(processor):
      with open(processor) as f:
        values = json.load(f)
      config = dataclasses.replace(
        config,
        image_mean=tuple(values.get("image_mean", config.image_mean)),
        image_std=tuple(values.get("image_std", config.image_std)),
      )
    janus = from_pretrained(path, kwargs.pop("dtype", "float32"))
    return cls(janus, JanusTokenizer.from_path(path), config, **kwargs)

  # ------------------------------------------------------------------------------ encoding

  def preprocess(self, data: bytes) -> np.ndarray:
    """Encoded image -> float32 `[S, S, 3]` normalised as transformers' `JanusImageProcessor`
    (longest side bicubically to S, centred on a square of the mean colour, then normalised)."""
    size = self.janus.config.vision.encoder.image_size
    image = itok.read_image(data)
    height, width = image.shape[:2]
    scale = size / max(height, width)
    # As `JanusImageProcessor`: no side below its `min_size` of 14 pixels.
    new = (max(round(width * scale), 14), max(round(height * scale), 14))
    resized = np.asarray(Image.fromarray(image).resize(new, Image.Resampling.BICUBIC))
    mean, std = np.asarray(self.config.image_mean), np.asarray(self.config.image_std)
    canvas = np.empty((size, size, 3), np.uint8)
    canvas[:] = (mean * 255).astype(np.uint8)
    top, left = (size - resized.shape[0]) // 2, (size - resized.shape[1]) // 2
    canvas[top : top + resized.shape[0], left : left + resized.shape[1]] = resized
    return ((canvas.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)

  def _image_keys(self, data: bytes, images: dict[str, bytes]) -> list:
    digest = hashlib.sha256(data).hexdigest()
    images[digest] = data
    placeholders = [(digest, i) for i in range(self.num_image_tokens)]
    return [self.tokenizer.boi_id, *placeholders, self.tokenizer.eoi_id]

  def encode_prompt(self, history: Sequence[Message], output_mode: str):
    """The prompt's keys (text ids or `(image digest, index)`), and the images by digest."""
    tok = self.tokenizer
    keys: list = [tok.bos_id]
    images: dict[str, bytes] = {}
    for msg in history:
      parts: list[list] = []
      for item in msg["content"]:
        if item["type"] == "text":
          parts.append(tok.encode(item["text"]))
        else:
          parts.append(self._image_keys(protocol.decode_image(item["image"]), images))
      content = []
      for i, part in enumerate(parts):
        content += (tok.encode("\n") if i else []) + part
      if msg["role"] == "system":
        keys += content + tok.encode("\n\n")
      elif msg["role"] == "user":
        keys += tok.encode(ROLE_NAMES["user"] + ": ") + content + tok.encode("\n\n")
      else:
        keys += tok.encode(ROLE_NAMES["assistant"] + ": ") + content + [tok.eos_id]
    return keys + self.prompt_suffix(output_mode), images

  def prompt_suffix(self, output_mode: str) -> list[int]:
    header = self.tokenizer.encode(ROLE_NAMES["assistant"] + ":")
    return header + [self.tokenizer.boi_id] if output_mode == "image_only" else header

  # ------------------------------------------------------------------------------- the cache

  @property
  def rows(self) -> int:
    return 2 * self.config.num_samples

  def reset(self) -> None:
    """Forgets the carried cache (the next call re-encodes its whole history)."""
    self.cache = KVCache.create(
      self.janus.config.text, self.rows, self.config.cache_length, self.janus.dtype
    )
    self.keys: list = []  # What the conditional rows hold, in order.
    self.reused_tokens = 0  # Prompt tokens the last call found in the cache.
    self.slots: list[int] = []  # The cache slot of each of them.

  def _committed(self) -> list:
    return self.keys

  def _respond(self, history, output_mode, temperature, rng) -> list[Response]:
    image_mode = output_mode == "image_only"
    prompt, images = self.encode_prompt(history, output_mode)
    suffix = len(self.prompt_suffix(output_mode))
    new_tokens = self.num_image_tokens if image_mode else self.config.max_text_tokens
    common = 0
    for a, b in zip(prompt, self.keys):
      if a != b:
        break
      common += 1
    keep = min(common, len(prompt) - suffix)  # The chunk always holds the whole header.
    while keep and isinstance(prompt[keep], tuple) and prompt[keep][1] > 0:
      keep -= 1  # Never split an image's features across chunks.
    self._rollback(keep)
    self.reused_tokens = keep
    if self._slots_needed(len(prompt) - keep, len(prompt), image_mode, new_tokens) > (
      self.config.cache_length - int(self.cache.length)
    ):
      self.reset()  # The history outgrew the carried cache: start over with the whole prompt.
      keep = self.reused_tokens = 0
      if self._slots_needed(len(prompt), len(prompt), image_mode, new_tokens) > (
        self.config.cache_length
      ):
        raise ModelError(
          f"a prompt of {len(prompt)} tokens does not fit the cache "
          f"({self.config.cache_length} slots)"
        )
    sampled, counts = self._append(prompt, keep, images, image_mode, temperature, rng)
    n = self.config.num_samples
    if n > 1:  # Different rows hold different answers: keep only the shared prompt.
      self._rollback(len(self.keys))
    return [self._to_response(sampled[i, : counts[i]], image_mode) for i in range(n)]

  def _slots_needed(self, chunk: int, prompt: int, image_mode: bool, new_tokens: int) -> int:
    return 1 + self._bucket(max(chunk, prompt if image_mode else 0)) + new_tokens

  def _image_features_of(self, digest: str, data: bytes) -> jax.Array:
    if digest not in self._feature_cache:
      if len(self._feature_cache) > 64:
        self._feature_cache.clear()
      pixels = jnp.asarray(self.preprocess(data))[None]
      self._feature_cache[digest] = self._features(self.graphdef, self.params, pixels)
    return self._feature_cache[digest]

  def _append(self, prompt, keep, images, image_mode, temperature, rng):
    """Writes `prompt[keep:]` into the cache (and, for an image turn, the unconditional prompt)
    and samples; returns (tokens [2N, max_new], counts [2N])."""
    n, tok = self.config.num_samples, self.tokenizer
    delta = prompt[keep:]
    length = max(len(delta), len(prompt) if image_mode else 0)
    bucket = self._bucket(length)
    ids = np.full((self.rows, bucket), tok.pad_id, np.int32)
    mask = np.zeros((self.rows, bucket), bool)
    ids[:n, : len(delta)] = [k if isinstance(k, int) else tok.image_id for k in delta]
    mask[:n, : len(delta)] = True
    if image_mode:
      text = [k if isinstance(k, int) else tok.image_id for k in prompt]
      ids[n:, : len(prompt)] = np.where(np.isin(text, (tok.bos_id, tok.boi_id)), text, tok.pad_id)
      mask[n:, : len(prompt)] = True
    embeds = self._text_embeds(self.graphdef, self.params, jnp.asarray(ids))
    for start, key in enumerate(delta):
      if isinstance(key, tuple) and key[1] == 0:
        features = self._image_features_of(key[0], images[key[0]])
        embeds = self._insert(embeds, features, start, n)
    method_args = dict(temperature=temperature, top_p=self.config.top_p)
    if image_mode:
      graphdef, params = self.image_graphdef, self.image_params
      method = image_sampling(
        n, self.config.guidance, self.janus.config.vq.num_embeddings, **method_args
      )
      stop = ()
    else:
      graphdef, params = self.text_graphdef, self.text_params
      method = SamplingMethod(**method_args)
      stop = (tok.eos_id,)
    loop = SamplerLoop(
      graphdef=graphdef,
      max_new_tokens=self.num_image_tokens if image_mode else self.config.max_text_tokens,
      stop_token_ids=stop,
      pad_token_id=tok.pad_id,
      method=method,
    )
    start = int(self.cache.length)
    state = self._jitted_turn(
      loop,
      params,
      embeds,
      jnp.asarray(mask),
      self.cache,
      jnp.zeros((self.rows,), jnp.int32),
      jnp.zeros((self.rows,), bool),
      rng,
    )
    self.cache = state.cache
    first_slot = start + 1  # Slot `start` is the (unused) pending-token slot.
    self.keys += delta
    self.slots += range(first_slot, first_slot + len(delta))
    sampled = np.asarray(jax.device_get(state.tokens))
    counts = np.asarray(jax.device_get(state.num_tokens))
    if n == 1:
      fed = sampled[0, : counts[0] - 1].tolist()
      self.keys += [("code", c) for c in fed] if image_mode else fed
      self.slots += range(first_slot + bucket, first_slot + bucket + len(fed))
    if image_mode:  # The unconditional rows are rebuilt by every image turn.
      self._rollback(len(self.keys))
    return sampled, counts

  def _to_response(self, tokens: np.ndarray, image_mode: bool) -> Response:
    if image_mode:
      if tokens.shape[0] != self.num_image_tokens:
        raise ModelError(
          f"image decoding produced {tokens.shape[0]} codes, expected {self.num_image_tokens}"
        )
      codes = jnp.asarray(tokens[None], jnp.int32)
      pixels = np.asarray(self._decode(self.graphdef, self.params, codes)[0], np.float32)
      # As the Janus post-processing: [-1, 1] -> [0, 255], clipped, truncated to uint8.
      return Response(image=itok.png_bytes(np.clip((pixels + 1) * 127.5, 0, 255).astype(np.uint8)))
    if tokens.size and tokens[-1] == self.tokenizer.eos_id:
      tokens = tokens[:-1]
    return Response(text=self.tokenizer.decode(tokens.tolist()))
