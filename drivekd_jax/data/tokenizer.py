"""Tokenizer for InternVL3 / Qwen2.5 models over local files (HF `tokenizers`, no transformers).

Image tokens differ by model family (`IMAGE_TOKENS`): InternVL3 writes an image as
`<img>` + `<IMG_CONTEXT>`* + `</img>`, Qwen2.5-VL as `<|vision_start|>` + `<|image_pad|>`* +
`<|vision_end|>`. A tokenizer resolves a family's ids only when asked (`image_token_ids`), so a
real Qwen2.5-VL tokenizer, which lacks InternVL's tokens, loads.

Two ways to get one:
  * `Tokenizer.from_path(path)` loads a real tokenizer: a `tokenizer.json` file, or a directory
    holding `tokenizer.json` (or the slow layout `vocab.json` + `merges.txt`) together with the
    added tokens of `tokenizer_config.json` (`added_tokens_decoder`) and `added_tokens.json`.
  * `train_bpe_tokenizer(texts, vocab_size, path)` trains a small byte-level BPE in-process with
    the Qwen2 pre-tokenisation and the InternVL3 special tokens, for tests, the demo and synthetic
    data. Nothing is downloaded.

Encoding never adds a BOS (Qwen2 has none); special tokens written in the text are recognised as
single ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
VISION_START = "<|vision_start|>"
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"

# Order of the special tokens in a trained tokenizer: ids 0..5.
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMG_START, IMG_END, IMG_CONTEXT)

# (start, image token, end) of one image in a prompt, by model family.
IMAGE_TOKENS = {
  "internvl": (IMG_START, IMG_CONTEXT, IMG_END),
  "qwen2.5-vl": (VISION_START, IMAGE_PAD, VISION_END),
}

# Qwen2's pre-tokenisation split (the same regex the Qwen2 fast tokenizer uses).
QWEN2_SPLIT_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _qwen2_pipeline(backend: tokenizers.Tokenizer) -> None:
  """Sets the Qwen2 normaliser, pre-tokeniser and decoder on a byte-level BPE backend."""
  backend.normalizer = normalizers.NFC()
  backend.pre_tokenizer = pre_tokenizers.Sequence(
    [
      pre_tokenizers.Split(
        tokenizers.Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False
      ),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ]
  )
  backend.decoder = decoders.ByteLevel()


def _token_content(value) -> str | None:
  """`tokenizer_config.json` writes tokens either as strings or as {"content": ...} dicts."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and "content" in value:
    return value["content"]
  raise ValueError(f"cannot read a token from {value!r}")


class Tokenizer:
  """A byte-level BPE tokenizer that knows the chat tokens and each family's image tokens.

  Attributes:
    backend: the underlying `tokenizers.Tokenizer`.
    pad_token / eos_token: strings; `pad_id` / `eos_id` their ids. For InternVL3 the pad token is
      `<|endoftext|>` and generation stops at `<|im_end|>`.
    source: where the tokenizer was loaded from (for error messages).
  """

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    *,
    pad_token: str = ENDOFTEXT,
    eos_token: str = IM_END,
    source: str = "<in-memory>",
  ):
    self.backend = backend
    self.source = source
    self.pad_token = pad_token
    self.eos_token = eos_token
    # Resolve every id now, so a tokenizer lacking one fails at load time, not mid-epoch.
    self.pad_id = self.token_id(pad_token)
    self.eos_id = self.token_id(eos_token)
    self.im_start_id = self.token_id(IM_START)
    self.im_end_id = self.token_id(IM_END)

  @property
  def img_start_id(self) -> int:
    return self.token_id(IMG_START)

  @property
  def img_end_id(self) -> int:
    return self.token_id(IMG_END)

  @property
  def img_context_id(self) -> int:
    """InternVL's `<IMG_CONTEXT>` id (KeyError naming the tokenizer when it has none)."""
    return self.token_id(IMG_CONTEXT)

  def image_token_ids(self, family: str) -> tuple[int, int, int]:
    """(start, image token, end) ids of a family of `IMAGE_TOKENS`; KeyError naming the
    tokenizer and the token when one is missing."""
    if family not in IMAGE_TOKENS:
      raise ValueError(f"unknown model family {family!r}; known: {', '.join(IMAGE_TOKENS)}")
    start, image, end = (self.token_id(token) for token in IMAGE_TOKENS[family])
    return start, image, end

  def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
    """This tokenizer if it holds every token of `tokens`, else a copy with the missing ones
    appended as special tokens (ids `vocab_size`, `vocab_size + 1`, ... in order).

    How a BPE trained by `train_bpe_tokenizer` (InternVL's image tokens) feeds a Qwen2.5-VL:
    the ids of every other token stay, and the result is the same on every call.
    """
    missing = [t for t in tokens if self.backend.token_to_id(t) is None]
    if not missing:
      return self
    backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
    backend.add_special_tokens(
      [tokenizers.AddedToken(t, special=True, normalized=False) for t in missing]
    )
    source = f"{self.source} + {', '.join(missing)}"
    return Tokenizer(backend, pad_token=self.pad_token, eos_token=self.eos_token, source=source)

  # -- loading ------------------------------------------------------------------------------

  @classmethod
  def from_path(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a tokenizer from a `tokenizer.json` file or a HF tokenizer directory.

    In a directory, `tokenizer.json` is used when present, else `vocab.json` + `merges.txt` with
    the Qwen2 pre-tokenisation. Tokens listed in `tokenizer_config.json` (`added_tokens_decoder`)
    and `added_tokens.json` are added with exactly their listed ids (an id that cannot be
    reproduced is an error), and `pad_token` / `eos_token` are read from `tokenizer_config.json`.
    """
    path = Path(path)
    if path.is_file():
      backend = tokenizers.Tokenizer.from_file(str(path))
      config_dir = path.parent if (path.parent / "tokenizer_config.json").exists() else None
    elif path.is_dir():
      if (path / "tokenizer.json").exists():
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
      elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
        bpe = models.BPE.from_file(
          str(path / "vocab.json"), str(path / "merges.txt"), fuse_unk=False, byte_fallback=False
        )
        backend = tokenizers.Tokenizer(bpe)
        _qwen2_pipeline(backend)
      else:
        raise FileNotFoundError(
          f"{path}: no tokenizer.json and no vocab.json + merges.txt in this directory"
        )
      config_dir = path
    else:
      raise FileNotFoundError(f"{path}: no such tokenizer file or directory")

    pad_token, eos_token = ENDOFTEXT, IM_END
    if config_dir is not None:
      added = _read_added_tokens(config_dir)
      _add_tokens_with_ids(backend, added, config_dir)
      config_file = config_dir / "tokenizer_config.json"
      if config_file.exists():
        config = json.loads(config_file.read_text())
        pad_token = _token_content(config.get("pad_token")) or pad_token
        eos_token = _token_content(config.get("eos_token")) or eos_token
    return cls(backend, pad_token=pad_token, eos_token=eos_token, source=str(path))

  def save(self, path: str | os.PathLike) -> None:
    """Writes the backend as a single `tokenizer.json`."""
    self.backend.save(str(path))

  # -- ids ----------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.backend.get_vocab_size(with_added_tokens=True)

  def token_id(self, token: str) -> int:
    """The id of one token, or a KeyError naming the tokenizer."""
    token_id = self.backend.token_to_id(token)
    if token_id is None:
      raise KeyError(f"tokenizer {self.source}: token {token!r} is not in the vocabulary")
    return token_id

  @property
  def fingerprint(self) -> str:
    """SHA-256 of what decides the ids: BPE vocabulary and merges, added tokens, pre-tokeniser.

    Two tokenizers with one fingerprint give the same ids for every text, whatever file layout
    they were loaded from; Drive-KD needs this between the student and every teacher.
    """
    spec = json.loads(self.backend.to_str())
    model = spec.get("model") or {}
    merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges") or []]
    added = sorted((t["id"], t["content"], bool(t.get("special"))) for t in spec["added_tokens"])
    identity = {
      "type": model.get("type"),
      "vocab": sorted((model.get("vocab") or {}).items(), key=lambda item: item[1]),
      "merges": merges,
      "added": added,
      "pre_tokenizer": spec.get("pre_tokenizer"),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()

  @property
  def special_ids(self) -> dict[str, int]:
    return {token: self.token_id(token) for token in SPECIAL_TOKENS}

  # -- text ---------------------------------------------------------------------------------

  def encode(self, text: str) -> np.ndarray:
    """Token ids of `text` as int32 `[n]`; no BOS, special tokens in the text stay atomic."""
    return np.asarray(self.backend.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """Ids that end a generated answer: `<|im_end|>`, plus the configured eos if different."""
    return tuple(sorted({self.im_end_id, self.eos_id}))


def check_same_tokenizer(reference: Tokenizer, *others: Tokenizer) -> None:
  """Raises ValueError naming the first tokenizer whose ids could differ from `reference`'s.

  Drive-KD compares student and teacher attention maps position by position, which is only
  meaningful when every model sees the identical token sequence.
  """
  for other in others:
    if other.fingerprint != reference.fingerprint:
      raise ValueError(
        f"tokenizer {other.source} differs from {reference.source}: the student and the teachers "
        "must share one tokenizer"
      )


def _read_added_tokens(directory: Path) -> list[tuple[int, str, bool]]:
  """(id, content, special) from tokenizer_config.json and added_tokens.json, sorted by id."""
  found: dict[int, tuple[str, bool]] = {}
  config_file = directory / "tokenizer_config.json"
  if config_file.exists():
    config = json.loads(config_file.read_text())
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
      found[int(key)] = (entry["content"], bool(entry.get("special", True)))
  added_file = directory / "added_tokens.json"
  if added_file.exists():
    for content, token_id in json.loads(added_file.read_text()).items():
      previous = found.get(int(token_id))
      if previous is not None and previous[0] != content:
        raise ValueError(
          f"{added_file}: id {token_id} is {content!r} but tokenizer_config.json says "
          f"{previous[0]!r}"
        )
      found.setdefault(int(token_id), (content, True))
  return sorted((token_id, content, special) for token_id, (content, special) in found.items())


def _add_tokens_with_ids(
  backend: tokenizers.Tokenizer, added: Sequence[tuple[int, str, bool]], directory: Path
) -> None:
  """Adds tokens so that each gets exactly its listed id, or raises naming the token."""
  for token_id, content, special in added:
    existing = backend.token_to_id(content)
    token = tokenizers.AddedToken(content, special=special, normalized=not special)
    if existing is None:
      if special:
        backend.add_special_tokens([token])
      else:
        backend.add_tokens([token])
      existing = backend.token_to_id(content)
    elif special:
      backend.add_special_tokens([token])  # marks an in-vocabulary token as special
    if existing != token_id:
      raise ValueError(
        f"{directory}: added token {content!r} should have id {token_id} but the vocabulary "
        f"gives it {existing} (the added tokens must extend the vocabulary in id order)"
      )


def train_bpe_tokenizer(
  texts: Iterable[str],
  vocab_size: int,
  path: str | os.PathLike,
  *,
  min_frequency: int = 1,
) -> Tokenizer:
  """Trains a byte-level BPE with the Qwen2 pre-tokenisation and saves it as tokenizer.json.

  The InternVL3 special tokens get ids 0..5 in the order of `SPECIAL_TOKENS`; all 256 bytes are
  in the alphabet, so any text encodes and decodes back exactly.

  Args:
    texts: training text (e.g. generated questions and answers).
    vocab_size: target size including the special tokens and the 256 byte tokens.
    path: where tokenizer.json is written (a directory gets `tokenizer.json` inside it).
    min_frequency: minimum pair count for a merge.

  Returns:
    The trained `Tokenizer`.
  """
  if vocab_size < len(SPECIAL_TOKENS) + 256:
    raise ValueError(
      f"vocab_size {vocab_size} is below {len(SPECIAL_TOKENS) + 256} (special + byte tokens)"
    )
  backend = tokenizers.Tokenizer(models.BPE(fuse_unk=False, byte_fallback=False))
  _qwen2_pipeline(backend)
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    min_frequency=min_frequency,
    show_progress=False,
    special_tokens=[
      tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS
    ],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  backend.train_from_iterator(list(texts), trainer=trainer)
  path = Path(path)
  if path.is_dir():
    path = path / "tokenizer.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  backend.save(str(path))
  return Tokenizer(backend, source=str(path))
