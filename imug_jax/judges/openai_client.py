"""OpenAI-compatible chat-completions client (stdlib only), used by IMUG and DriveBench judging.

POST {base_url}/chat/completions with {"model", "messages", "temperature"}; images travel as base64
data URLs in `image_url` parts (images first, then text, for image scoring; the caller decides the
order). The API key is read from an environment variable at call time and is never logged, stored
in reprs, or put into error messages. Retries with exponential backoff (plus jitter) on 429, 5xx,
timeouts and connection errors; other 4xx fail at once.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from imug_jax.judges.base import DEFAULT_TEMPERATURE, ImagePart, JudgeError, Part

_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}


class OpenAIChatJudge:
  """A judge behind any OpenAI-compatible `/chat/completions` endpoint.

  Args:
    base_url: e.g. "https://api.openai.com/v1" or "http://127.0.0.1:8000/v1".
    model: model name sent in the request.
    api_key_env: name of the environment variable holding the key (may be unset for local
      servers; then no Authorization header is sent).
    timeout_s: per-request socket timeout (the official dynamic resolver uses 150 s).
    max_retries: retries after the first attempt on retryable failures.
    backoff_s / max_backoff_s: first delay and cap; each retry multiplies the delay by 2.
    sleep: injectable for tests.
  """

  def __init__(
    self,
    base_url: str,
    model: str,
    *,
    api_key_env: str = "IMUG_JUDGE_API_KEY",
    timeout_s: float = 150.0,
    max_retries: int = 5,
    backoff_s: float = 2.0,
    max_backoff_s: float = 60.0,
    max_tokens: int | None = None,
    sleep: Callable[[float], None] = time.sleep,
    seed: int = 0,
  ):
    if not base_url or not model:
      raise ValueError("OpenAIChatJudge needs base_url and model")
    self.base_url = base_url.rstrip("/")
    self.model = model
    self.name = f"openai:{model}"
    self.api_key_env = api_key_env
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self.max_tokens = max_tokens
    self._sleep = sleep
    self._jitter = random.Random(seed)
    host = urllib.parse.urlparse(self.base_url).hostname or ""
    handlers = [urllib.request.ProxyHandler({})] if host in _LOCAL_HOSTS else []
    self._opener = urllib.request.build_opener(*handlers)
    self.calls = 0

  def __repr__(self) -> str:
    return (
      f"OpenAIChatJudge(base_url={self.base_url!r}, model={self.model!r},"
      f" key_env={self.api_key_env!r})"
    )

  def chat(
    self, system: str, parts: Sequence[Part], *, temperature: float = DEFAULT_TEMPERATURE
  ) -> str:
    """Sends one system + user message and returns the assistant's text content."""
    body = {
      "model": self.model,
      "messages": [
        {"role": "system", "content": system},
        {"role": "user", "content": [_content_part(part) for part in parts]},
      ],
      "temperature": temperature,
    }
    if self.max_tokens is not None:
      body["max_tokens"] = self.max_tokens
    data = json.dumps(body).encode("utf-8")
    delay = self.backoff_s
    last_error = ""
    for attempt in range(self.max_retries + 1):
      if attempt:
        self._sleep(min(delay, self.max_backoff_s) + self._jitter.random() * 0.1 * delay)
        delay *= 2
      self.calls += 1
      try:
        return self._post_once(data)
      except _RetryableError as error:
        last_error = str(error)
        logging.warning("judge %s attempt %d failed: %s", self.name, attempt + 1, last_error)
    raise JudgeError(
      f"{self.name} at {self.base_url}: gave up after {self.max_retries + 1} attempts: {last_error}"
    )

  def _post_once(self, data: bytes) -> str:
    """One request; returns the reply text, raises _RetryableError or JudgeError."""
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env)
    if key:
      headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
      f"{self.base_url}/chat/completions", data=data, headers=headers, method="POST"
    )
    try:
      with self._opener.open(request, timeout=self.timeout_s) as response:
        raw = response.read()
    except urllib.error.HTTPError as error:
      message = f"HTTP {error.code} {error.reason}"
      if error.code == 429 or error.code >= 500:
        raise _RetryableError(message) from None
      raise JudgeError(f"{self.name} at {self.base_url}: {message}") from None
    except TimeoutError:
      raise _RetryableError(f"timeout after {self.timeout_s}s") from None
    except urllib.error.URLError as error:
      if isinstance(error.reason, (TimeoutError, socket.timeout)):
        raise _RetryableError(f"timeout after {self.timeout_s}s") from None
      raise _RetryableError(f"connection error: {error.reason}") from None
    except OSError as error:
      raise _RetryableError(f"connection error: {error}") from None
    try:
      content = json.loads(raw.decode("utf-8"))["choices"][0]["message"]["content"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError) as error:
      raise _RetryableError(
        f"malformed chat-completion body ({type(error).__name__}): {raw[:200]!r}"
      ) from None
    if content is None:
      return ""
    if not isinstance(content, str):
      raise _RetryableError(f"chat-completion content is {type(content).__name__}, not text")
    return content


class _RetryableError(Exception):
  pass


def _content_part(part: Part) -> dict:
  if isinstance(part, ImagePart):
    return {"type": "image_url", "image_url": {"url": part.data_url()}}
  if isinstance(part, str):
    return {"type": "text", "text": part}
  raise TypeError(f"judge message part must be str or ImagePart, got {type(part).__name__}")
