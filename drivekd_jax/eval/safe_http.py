"""One JSON POST over HTTP(S) that a hostile or broken server cannot turn against the caller.

`post_json` is the only way this project talks to a remote server (the judge client, the `/infer`
model client). What it guarantees:

* Redirects are refused, never followed: a 3xx reply raises `HttpError` (not retried). Following
  one would hand the `Authorization` header to whatever host the reply names, and urllib turns a
  redirected POST into a GET whose reply would be taken for the answer.
* Secrets (the header values passed in `secret_headers`) never appear in an error: everything a
  server sends back and this module quotes is passed through `redact` first, and is cut short.
* A key is sent over plain `http://` only to a loopback host (unless `allow_insecure=True`).
* Replies larger than `max_reply_bytes` are refused, and the whole exchange has a deadline
  (`timeout_s` per socket operation and 2x that for the whole reply), so a server that trickles
  bytes cannot hold a worker forever.
* URLs carrying credentials (`user:pass@host`) are refused up front (they would end up in logs).
* Proxies from the environment are used for remote hosts and never for loopback ones.
"""

from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
REDACTED = "<redacted>"
_PREVIEW_CHARS = 200
_CHUNK = 1 << 16


class HttpError(Exception):
  """A request that failed; `retryable` says whether trying again may help.

  Attributes:
    status: the HTTP status, or None for a transport failure (connection, timeout).
    retry_after: seconds the server asked to wait (429/503 `Retry-After`), or None.
  """

  def __init__(
    self,
    message: str,
    *,
    status: int | None = None,
    retryable: bool = False,
    retry_after: float | None = None,
  ):
    super().__init__(message)
    self.status = status
    self.retryable = retryable
    self.retry_after = retry_after


def redact(text: str, secrets: Sequence[str]) -> str:
  """`text` with every secret (4 characters or more) replaced by `<redacted>`."""
  for secret in secrets:
    if secret and len(secret) >= 4:
      text = text.replace(secret, REDACTED)
  return text


def preview(data: bytes | str, secrets: Sequence[str] = ()) -> str:
  """A short, printable, redacted quote of what a server sent."""
  text = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
  text = redact(text, secrets)
  cut = text[:_PREVIEW_CHARS]
  return repr(cut) + ("..." if len(text) > _PREVIEW_CHARS else "")


def check_url(url: str) -> str:
  """Returns `url` if it is http(s) with a host and no credentials; else ValueError."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https") or not parts.hostname:
    raise ValueError(f"URL must be http(s)://host[:port]/..., got {url!r}")
  if parts.username is not None or parts.password is not None:
    raise ValueError(
      "URL must not carry credentials (user:password@); pass the key through the environment"
    )
  return url


def is_loopback(url: str) -> bool:
  return (urllib.parse.urlsplit(url).hostname or "") in LOOPBACK_HOSTS


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
  def redirect_request(self, req, fp, code, msg, headers, newurl):
    return None  # urllib then raises HTTPError for the 3xx reply itself.


_OPENERS = {
  True: urllib.request.build_opener(_RefuseRedirects, urllib.request.ProxyHandler({})),
  False: urllib.request.build_opener(_RefuseRedirects),
}


def _retry_after(headers) -> float | None:
  value = headers.get("Retry-After") if headers is not None else None
  try:
    return max(0.0, float(value)) if value is not None else None
  except ValueError:
    return None


def _read_limited(response, limit: int, deadline: float, secrets: Sequence[str]) -> bytes:
  chunks, size = [], 0
  while True:
    if time.monotonic() > deadline:
      raise HttpError("reply took longer than its deadline", retryable=True)
    chunk = response.read(min(_CHUNK, limit + 1 - size))
    if not chunk:
      return b"".join(chunks)
    chunks.append(chunk)
    size += len(chunk)
    if size > limit:
      raise HttpError(f"reply larger than {limit} bytes", retryable=True)


def post_json(
  url: str,
  body: bytes,
  *,
  headers: Mapping[str, str] | None = None,
  secret_headers: Mapping[str, str] | None = None,
  timeout_s: float = 60.0,
  max_reply_bytes: int = 64 << 20,
  allow_insecure: bool = False,
) -> bytes:
  """POSTs a JSON body; returns the body of a 2xx reply.

  Args:
    url: http(s) URL without credentials.
    body: the encoded JSON request.
    headers: plain headers.
    secret_headers: headers whose values are secret (e.g. `Authorization`); they are sent only
      over https or to loopback, and redacted from every message.
    timeout_s: per socket operation; the whole reply must arrive within 2 * timeout_s.
    max_reply_bytes: larger replies are refused.
    allow_insecure: let secret headers travel over plain http to a remote host.

  Raises:
    HttpError: any failure; its message quotes at most a redacted preview of the reply. 429, 5xx,
      timeouts, connection errors and oversized or slow replies are `retryable`; other 4xx and
      every 3xx (redirects are never followed) are not.
  """
  check_url(url)
  secret_headers = dict(secret_headers or {})
  secrets = [v for v in secret_headers.values() if v]
  for value in list(secrets):  # "Bearer <key>" also hides a bare echo of <key>.
    secrets += [part for part in value.split() if len(part) >= 8]
  loopback = is_loopback(url)
  if secrets and not loopback and not allow_insecure and url.startswith("http://"):
    raise HttpError(
      f"refusing to send credentials over plain http to {urllib.parse.urlsplit(url).hostname}; "
      "use https (or allow_insecure)"
    )
  request = urllib.request.Request(
    url,
    data=body,
    method="POST",
    headers={"Content-Type": "application/json", **(headers or {}), **secret_headers},
  )
  deadline = time.monotonic() + 2 * timeout_s
  try:
    with _OPENERS[loopback].open(request, timeout=timeout_s) as response:
      return _read_limited(response, max_reply_bytes, deadline, secrets)
  except urllib.error.HTTPError as error:
    status = error.code
    try:
      detail = error.read(_PREVIEW_CHARS * 4)
    except OSError:
      detail = b""
    finally:
      error.close()
    if 300 <= status < 400:
      raise HttpError(
        f"HTTP {status}: the server redirected; redirects are not followed", status=status
      ) from None
    raise HttpError(
      f"HTTP {status} {redact(str(error.reason), secrets)}: {preview(detail, secrets)}",
      status=status,
      retryable=status == 429 or status >= 500,
      retry_after=_retry_after(error.headers),
    ) from None
  except HttpError:
    raise
  except TimeoutError:
    raise HttpError(f"timeout after {timeout_s}s", retryable=True) from None
  except urllib.error.URLError as error:
    if isinstance(error.reason, TimeoutError):
      raise HttpError(f"timeout after {timeout_s}s", retryable=True) from None
    reason = redact(str(error.reason), secrets)
    raise HttpError(f"connection error: {reason}", retryable=True) from None
  except (OSError, ValueError, http.client.HTTPException) as error:  # A garbled reply.
    reason = redact(f"{type(error).__name__}: {error}", secrets)
    raise HttpError(f"connection error: {reason}", retryable=True) from None
