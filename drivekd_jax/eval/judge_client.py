"""The project's one OpenAI-compatible judge client (DriveBench judging, IMUG-Bench scoring).

POST {base_url}/chat/completions with {"model", "messages", "temperature"[, "max_tokens"]};
images travel as base64 data URLs in `image_url` parts, in the order the caller gives them.

* The API key is read from an environment variable at call time; it is never stored on the
  object, logged, written to a file or quoted in an error (replies are redacted before they are
  quoted). Transport is `drivekd_jax.eval.safe_http.post_json`: no redirects, bounded replies.
* Retries with exponential backoff (plus jitter, at least the server's `Retry-After`) on 429,
  5xx, timeouts and connection errors; other 4xx and redirects fail at once.
* `concurrency` bounds the requests in flight across threads; `chat_many` runs a batch.
* With `cache_dir`, every reply is appended to `<cache_dir>/judge_cache.jsonl`, keyed by the
  hash of the request (model, messages, temperature, max_tokens) and by how many times
  this client has asked that same request before (a scorer that re-asks after an unparseable
  reply gets the next reply, not the same one). A re-run or a resumed run reads its replies back
  and never pays twice; `replay_only=True` forbids the network, so a judged run is replayed
  exactly. Every request (network or cache) is logged to `<cache_dir>/judge_requests.jsonl`.
"""

from __future__ import annotations

import base64
import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from drivekd_jax.eval import safe_http

DEFAULT_TEMPERATURE = 0.1
CACHE_FILE = "judge_cache.jsonl"
REQUEST_LOG = "judge_requests.jsonl"


class JudgeError(RuntimeError):
  """A judge call failed (transport, HTTP status, or a reply that is not a chat completion)."""


@dataclasses.dataclass(frozen=True)
class ImagePart:
  """One encoded image in a judge message (bytes of a PNG or JPEG file)."""

  data: bytes
  media_type: str = "image/png"

  @classmethod
  def from_path(cls, path: str | Path) -> ImagePart:
    """Reads a file; the media type follows the official rule (.png -> png, else jpeg)."""
    path = Path(path)
    media_type = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return cls(path.read_bytes(), media_type)

  @classmethod
  def from_array(cls, pixels: np.ndarray) -> ImagePart:
    """Encodes an RGB uint8 array [H, W, 3] as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(pixels, np.uint8)).save(buffer, format="PNG")
    return cls(buffer.getvalue(), "image/png")

  def data_url(self) -> str:
    return f"data:{self.media_type};base64,{base64.b64encode(self.data).decode('ascii')}"

  def to_pil(self) -> Image.Image:
    return Image.open(io.BytesIO(self.data)).convert("RGB")

  def __repr__(self) -> str:  # Never dump image bytes into logs.
    return f"ImagePart({self.media_type}, {len(self.data)} bytes)"


Part = str | ImagePart


def _content_part(part: Part) -> dict:
  if isinstance(part, ImagePart):
    return {"type": "image_url", "image_url": {"url": part.data_url()}}
  if isinstance(part, str):
    return {"type": "text", "text": part}
  raise TypeError(f"judge message part must be str or ImagePart, got {type(part).__name__}")


class ReplyCache:
  """Append-only JSONL store of replies: (request hash, occurrence) -> reply text.

  A torn last line (a run killed mid-write) is skipped with a warning; the request is paid again.
  """

  def __init__(self, folder: str | Path):
    self.folder = Path(folder)
    self.folder.mkdir(parents=True, exist_ok=True)
    self.path = self.folder / CACHE_FILE
    self.log_path = self.folder / REQUEST_LOG
    self._replies: dict[tuple[str, int], str] = {}
    self._lock = threading.Lock()
    if self.path.exists():
      with self.path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
          try:
            entry = json.loads(line)
            self._replies[(entry["request"], int(entry["occurrence"]))] = entry["reply"]
          except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            logging.warning("%s:%d: unreadable cache line skipped", self.path, number)

  def __len__(self) -> int:
    return len(self._replies)

  def get(self, request: str, occurrence: int) -> str | None:
    with self._lock:
      return self._replies.get((request, occurrence))

  def put(self, request: str, occurrence: int, reply: str, model: str) -> None:
    entry = {"request": request, "occurrence": occurrence, "model": model, "reply": reply}
    with self._lock:
      self._replies[(request, occurrence)] = reply
      self._append(self.path, entry)

  def log(self, entry: dict[str, Any]) -> None:
    with self._lock:
      self._append(self.log_path, entry)

  @staticmethod
  def _append(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as file:
      file.write(json.dumps(entry, ensure_ascii=False) + "\n")
      file.flush()


class OpenAIChatJudge:
  """A judge behind any OpenAI-compatible `/chat/completions` endpoint.

  Args:
    base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1" (no credentials).
    model: model name sent in the request.
    api_key_env: name of the environment variable holding the key (may be unset for local
      servers; then no Authorization header is sent).
    timeout_s: per socket operation (the official IMUG resolver uses 150 s).
    max_retries: retries after the first attempt on retryable failures.
    backoff_s / max_backoff_s: first delay and cap; each retry multiplies the delay by 2.
    max_tokens: sent when set.
    concurrency: requests in flight at once, across all threads using this judge.
    cache_dir: where the reply cache and the request log live (kept with the results); None:
      no cache, no log.
    replay_only: answer only from the cache; a miss raises JudgeError without any request.
    allow_insecure_key: let the key travel over plain http to a non-loopback host.
    sleep: injectable for tests.
    seed: of the backoff jitter.
  """

  def __init__(
    self,
    base_url: str,
    model: str,
    *,
    api_key_env: str = "JUDGE_API_KEY",
    timeout_s: float = 150.0,
    max_retries: int = 5,
    backoff_s: float = 2.0,
    max_backoff_s: float = 60.0,
    max_tokens: int | None = None,
    concurrency: int = 4,
    cache_dir: str | Path | None = None,
    replay_only: bool = False,
    allow_insecure_key: bool = False,
    sleep: Callable[[float], None] = time.sleep,
    seed: int = 0,
  ):
    if not base_url or not model:
      raise ValueError("OpenAIChatJudge needs base_url and model")
    if concurrency < 1 or max_retries < 0:
      raise ValueError(f"concurrency >= 1 and max_retries >= 0, got {concurrency}, {max_retries}")
    self.base_url = safe_http.check_url(base_url.rstrip("/"))
    self.model = model
    self.name = f"openai:{model}"
    self.api_key_env = api_key_env
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self.max_tokens = max_tokens
    self.concurrency = concurrency
    self.replay_only = replay_only
    self.allow_insecure_key = allow_insecure_key
    self.cache = ReplyCache(cache_dir) if cache_dir is not None else None
    if replay_only and self.cache is None:
      raise ValueError("replay_only needs a cache_dir")
    self._sleep = sleep
    self._jitter = random.Random(seed)
    self._slots = threading.BoundedSemaphore(concurrency)
    self._lock = threading.Lock()
    self._occurrences: collections.Counter[str] = collections.Counter()
    self.calls = 0  # Network attempts.
    self.cache_hits = 0

  def __repr__(self) -> str:
    return (
      f"OpenAIChatJudge(base_url={self.base_url!r}, model={self.model!r},"
      f" key_env={self.api_key_env!r})"
    )

  def request_body(
    self, system: str, parts: Sequence[Part], temperature: float = DEFAULT_TEMPERATURE
  ) -> dict[str, Any]:
    """The JSON body sent for one system + user message."""
    body: dict[str, Any] = {
      "model": self.model,
      "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": [_content_part(part) for part in parts]},
      ],
      "temperature": temperature,
    }
    if self.max_tokens is not None:
      body["max_tokens"] = self.max_tokens
    return body

  def request_key(self, body: dict[str, Any]) -> str:
    """The cache key of a request: a hash of its body (model, messages, temperature, max_tokens).

    Neither the key nor the endpoint is part of it: the same model asked the same thing behind
    another URL (a loopback judge on a fresh port, a mirror) is the same request.
    """
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

  def chat(
    self, system: str, parts: Sequence[Part], *, temperature: float = DEFAULT_TEMPERATURE
  ) -> str:
    """Sends one system + user message and returns the assistant's text content."""
    body = self.request_body(system, parts, temperature)
    key = self.request_key(body)
    with self._lock:
      occurrence = self._occurrences[key]
      self._occurrences[key] += 1
    if self.cache is not None:
      cached = self.cache.get(key, occurrence)
      if cached is not None:
        with self._lock:
          self.cache_hits += 1
        self._log(key, occurrence, "cached")
        return cached
      if self.replay_only:
        self._log(key, occurrence, "miss", error="replay_only: not in the cache")
        raise JudgeError(
          f"{self.name}: request {key[:12]} (occurrence {occurrence}) is not in the cache "
          f"{self.cache.path} and replay_only forbids asking"
        )
    reply = self._ask(json.dumps(body).encode("utf-8"), key, occurrence)
    if self.cache is not None:
      self.cache.put(key, occurrence, reply, self.model)
    return reply

  def chat_many(
    self,
    requests: Sequence[tuple[str, Sequence[Part]]],
    *,
    temperature: float = DEFAULT_TEMPERATURE,
  ) -> list[str | JudgeError]:
    """`chat` for each (system, parts), `concurrency` at a time; failures come back in place."""

    def one(request: tuple[str, Sequence[Part]]) -> str | JudgeError:
      try:
        return self.chat(request[0], request[1], temperature=temperature)
      except JudgeError as error:
        return error

    with concurrent.futures.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
      return list(pool.map(one, requests))

  def _log(self, key: str, occurrence: int, status: str, **fields: Any) -> None:
    if self.cache is not None:
      self.cache.log(
        {
          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
          "request": key,
          "occurrence": occurrence,
          "model": self.model,
          "status": status,
          **fields,
        }
      )

  def _ask(self, data: bytes, key: str, occurrence: int) -> str:
    delay = self.backoff_s
    last_error = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        self._sleep(min(delay, self.max_backoff_s) + self._jitter.random() * 0.1 * delay)
        delay *= 2
      with self._lock:
        self.calls += 1
      start = time.monotonic()
      try:
        with self._slots:
          reply, usage = self._post_once(data)
      except _RetryableError as error:
        last_error = str(error)
        self._log(key, occurrence, "retry", attempt=attempt + 1, error=last_error)
        logging.warning("judge %s attempt %d failed: %s", self.name, attempt + 1, last_error)
        if error.retry_after is not None:
          delay = max(delay, min(error.retry_after, self.max_backoff_s))
        continue
      except JudgeError as error:
        self._log(key, occurrence, "error", attempt=attempt + 1, error=str(error))
        raise
      self._log(
        key,
        occurrence,
        "ok",
        attempt=attempt + 1,
        elapsed_s=round(time.monotonic() - start, 3),
        usage=usage,
      )
      return reply
    self._log(key, occurrence, "gave_up", error=last_error)
    raise JudgeError(
      f"{self.name} at {self.base_url}: gave up after {self.max_retries + 1} attempts: {last_error}"
    )

  def _post_once(self, data: bytes) -> tuple[str, Any]:
    """One request; returns (reply text, usage), raises _RetryableError or JudgeError."""
    key = os.environ.get(self.api_key_env)
    secrets = {"Authorization": f"Bearer {key}"} if key else {}
    try:
      raw = safe_http.post_json(
        f"{self.base_url}/chat/completions",
        data,
        secret_headers=secrets,
        timeout_s=self.timeout_s,
        allow_insecure=self.allow_insecure_key,
      )
    except safe_http.HttpError as error:
      if error.retryable:
        raise _RetryableError(str(error), error.retry_after) from None
      raise JudgeError(f"{self.name} at {self.base_url}: {error}") from None
    secret_values = [key] if key else []
    try:
      payload = json.loads(raw.decode("utf-8"))
      content = payload["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
      raise _RetryableError(
        f"malformed chat-completion body ({type(error).__name__}): "
        f"{safe_http.preview(raw, secret_values)}"
      ) from None
    usage = payload.get("usage") if isinstance(payload, dict) else None
    if isinstance(usage, dict):  # Only counts reach the log.
      usage = {k: v for k, v in usage.items() if isinstance(k, str) and isinstance(v, int)}
    else:
      usage = None
    if content is None:
      return "", usage
    if not isinstance(content, str):
      raise _RetryableError(f"chat-completion content is {type(content).__name__}, not text")
    return safe_http.redact(content, secret_values), usage


class _RetryableError(Exception):
  def __init__(self, message: str, retry_after: float | None = None):
    super().__init__(message)
    self.retry_after = retry_after
