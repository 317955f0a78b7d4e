"""Client for model servers speaking the official `/infer` protocol (standard library only).

POST `<url>/infer` with `{"history", "output_mode", "temperature"}`; the reply is
`{"response": {"text": ...}}`, `{"response": {"image": <base64 PNG>}}` or an error object.
Several server URLs are used round-robin (each attempt moves on to the next URL, so a dead
server costs one attempt, not the request). Transport errors, timeouts, 5xx/429 replies, server
error objects, garbage replies and replies in the wrong modality (text for an image turn or the
reverse) are retried; other 4xx replies (our request is wrong) and redirects are not. Transport
is the project's one safe POST (`drivekd_jax.eval.safe_http.post_json`): redirects are never
followed, replies are bounded in size and time, and quoted replies are short.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Sequence
from typing import Any

from drivekd_jax.eval import safe_http
from imug_jax.models.protocol import OUTPUT_MODES, Message, ModelError, ProtocolError, Response


class HttpModel:
  """A `UnifiedModel` backed by one or more `/infer` servers.

  Attributes:
    name: the model name used in the output layout.
    urls: server base URLs (`http://host:port`, with or without `/infer`).
    timeout: seconds per request (the official client uses 600).
    retries: attempts per turn (the official client uses 3).
    backoff: seconds before the second attempt, doubled each further attempt.
  """

  def __init__(
    self,
    name: str,
    urls: str | Sequence[str],
    *,
    timeout: float = 600.0,
    retries: int = 3,
    backoff: float = 1.0,
    max_image_bytes: int = 64 << 20,
  ):
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
      raise ValueError("HttpModel needs at least one server URL")
    if retries < 1:
      raise ValueError(f"retries must be >= 1, got {retries}")
    self.name = name
    self.urls = [
      safe_http.check_url(
        u.rstrip("/") if u.rstrip("/").endswith("/infer") else u.rstrip("/") + "/infer"
      )
      for u in urls
    ]
    self.timeout = timeout
    self.retries = retries
    self.backoff = backoff
    self.max_image_bytes = max_image_bytes
    self._next_url = itertools.cycle(range(len(self.urls)))
    self._lock = threading.Lock()

  def _pick_url(self) -> str:
    with self._lock:
      return self.urls[next(self._next_url)]

  def _post(self, url: str, body: bytes) -> Any:
    limit = 2 * self.max_image_bytes  # A base64 image plus the JSON around it.
    raw = safe_http.post_json(url, body, timeout_s=self.timeout, max_reply_bytes=limit)
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
      raise ProtocolError(
        f"reply is not JSON ({type(e).__name__}): {safe_http.preview(raw[:80])}"
      ) from None

  def respond(
    self, history: Sequence[Message], output_mode: str, temperature: float = 0.7, rng: Any = None
  ) -> Response:
    """Sends the turn; returns the parsed reply or raises ModelError after the last attempt."""
    del rng  # The server draws its own randomness.
    if output_mode not in OUTPUT_MODES:
      raise ValueError(f"output_mode must be one of {OUTPUT_MODES}, got {output_mode!r}")
    body = json.dumps(
      {"history": list(history), "output_mode": output_mode, "temperature": temperature}
    ).encode("utf-8")
    failures = []
    for attempt in range(self.retries):
      if attempt:
        time.sleep(self.backoff * 2 ** (attempt - 1))
      url = self._pick_url()
      try:
        response = Response.from_json(self._post(url, body), max_image_bytes=self.max_image_bytes)
      except safe_http.HttpError as e:
        failures.append(f"{url}: {e}")
        if not e.retryable:
          break
        continue
      except (ProtocolError, ModelError) as e:
        failures.append(f"{url}: {type(e).__name__}: {e}")
        continue
      if (output_mode == "image_only") != (response.image is not None):
        failures.append(f"{url}: asked for {output_mode}, got the other modality")
        continue
      return response
    raise ModelError(f"{self.name}: {len(failures)} failed attempts; last: {failures[-1]}")
