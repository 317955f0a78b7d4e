r"""Serves any in-process model on the official `/infer` protocol (standard library HTTP server).

  python -m imug_jax.serve --config=configs/imug/demo.py --port 8000 [--host 127.0.0.1]

POST /infer  {"history": [...], "output_mode": "text_only" | "image_only", "temperature": t}
  200 {"response": {"text": ...}} | {"response": {"image": <base64 PNG>}}
  400 {"error": ...}  malformed request (bad JSON, fields, base64 image); 413 too large
  500 {"error": ...}  the model failed
GET /health  {"status": "ok", "model": name}

Bound to 127.0.0.1 unless --host says otherwise. Requests larger than --max_request_mb are
refused before they are read, a prompt that cannot fit the model's token budget (from its text
lengths and image count) before any decoding, every malformed body gets a 4xx JSON reply, reads
time out after --read_timeout_s, and a fixed pool of --workers threads answers (connections past
the pool and its backlog get 503). Calls into the model are serialised (in-process models are
not thread-safe); each request gets its own PRNG key (seed, request counter). The default
--workdir is a fresh per-user, per-run folder.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import logging
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import jax

from imug_jax.models import protocol
from imug_jax.models.protocol import ModelError, PromptTooLong, ProtocolError, UnifiedModel

_MIN_BYTES_PER_S = 1 << 20  # A body must arrive at least this fast (after read_timeout_s).


class BoundedHTTPServer(HTTPServer):
  """An HTTPServer answering on a fixed pool of `workers` threads.

  At most `workers + backlog` connections are admitted at once; a further one gets an immediate
  503 JSON reply and is closed, so a flood of (slow) clients cannot grow threads without bound.
  """

  daemon_threads = True

  def __init__(self, address, handler, *, workers: int = 8, backlog: int = 32):
    super().__init__(address, handler)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    self._admitted = threading.BoundedSemaphore(workers + backlog)

  def process_request(self, request, client_address):
    if not self._admitted.acquire(blocking=False):
      body = json.dumps({"error": "server busy, try again"}).encode()
      with contextlib.suppress(OSError):
        request.sendall(
          b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
          + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
          + body
        )
      self.shutdown_request(request)
      return
    self._pool.submit(self._work, request, client_address)

  def _work(self, request, client_address):
    try:
      self.finish_request(request, client_address)
    except Exception:
      self.handle_error(request, client_address)
    finally:
      self.shutdown_request(request)
      self._admitted.release()

  def server_close(self):
    super().server_close()
    self._pool.shutdown(wait=False, cancel_futures=True)


def make_server(
  model: UnifiedModel,
  *,
  host: str = "127.0.0.1",
  port: int = 0,
  max_request_bytes: int = 64 << 20,
  seed: int = 0,
  read_timeout_s: float = 30.0,
  workers: int = 8,
  backlog: int = 32,
) -> BoundedHTTPServer:
  """An HTTP server (not yet serving) answering `/infer` with `model`; port 0 picks a free one.

  Args:
    model: any UnifiedModel; its optional `token_budget` (`protocol.TokenBudget`) is checked
      before any image is decoded, and a request that cannot fit gets 413.
    max_request_bytes: larger bodies are refused (413) before they are read.
    seed: base of the per-request PRNG keys.
    read_timeout_s: a connection that sends nothing for this long is answered 408 and closed.
    workers / backlog: see `BoundedHTTPServer`.
  """
  lock = threading.Lock()
  counter = itertools.count()
  budget = getattr(model, "token_budget", None)

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = read_timeout_s  # Socket timeout of every read (StreamRequestHandler applies it).

    def _reply(self, status: int, body: dict[str, Any]) -> None:
      data = json.dumps(body).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      if self.close_connection:
        self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(data)

    def _refuse(self, status: int, error: str) -> None:
      """A 4xx reply after which the connection closes (any unread body must not be parsed)."""
      self.close_connection = True
      self._reply(status, {"error": error})

    def log_message(self, format, *args):
      logging.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
      if self.path.rstrip("/") == "/health":
        self._reply(HTTPStatus.OK, {"status": "ok", "model": model.name})
      else:
        self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path[:200]}"})

    def _read_body(self) -> bytes | None:
      """The request body, or None after a 4xx reply."""
      if self.headers.get("Transfer-Encoding"):
        self._refuse(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not Transfer-Encoding")
        return None
      raw = self.headers.get("Content-Length")
      if raw is None:
        self._refuse(HTTPStatus.LENGTH_REQUIRED, "Content-Length required")
        return None
      try:
        length = int(raw)
      except ValueError:
        length = -1
      if length < 0:
        self._refuse(
          HTTPStatus.BAD_REQUEST, f"Content-Length must be a byte count, got {raw[:40]!r}"
        )
        return None
      if length > max_request_bytes:
        self._refuse(
          HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
          f"request of {length} bytes exceeds {max_request_bytes}",
        )
        return None
      data = bytearray()
      deadline = time.monotonic() + read_timeout_s + length / _MIN_BYTES_PER_S
      try:  # In pieces, so that a client trickling bytes cannot hold the worker forever.
        while len(data) < length and time.monotonic() < deadline:
          chunk = self.rfile.read1(min(length - len(data), 1 << 16))
          if not chunk:
            break
          data += chunk
      except TimeoutError:
        pass
      if len(data) < length:
        self._refuse(
          HTTPStatus.REQUEST_TIMEOUT,
          f"the body ended after {len(data)} of {length} bytes (read timeout {read_timeout_s}s)",
        )
        return None
      return bytes(data)

    def do_POST(self):
      if self.path.rstrip("/") != "/infer":
        self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path[:200]}"})
        return
      data = self._read_body()
      if data is None:
        return
      try:
        body = json.loads(data)
        history, mode, temperature = protocol.validate_request(
          body, max_image_bytes=max_request_bytes, budget=budget
        )
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        self._reply(HTTPStatus.BAD_REQUEST, {"error": f"request is not JSON: {e}"})
        return
      except RecursionError:
        self._reply(HTTPStatus.BAD_REQUEST, {"error": "request JSON is nested too deeply"})
        return
      except PromptTooLong as e:
        self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": str(e)})
        return
      except ProtocolError as e:
        self._reply(HTTPStatus.BAD_REQUEST, {"error": str(e)})
        return
      try:
        with lock:
          rng = jax.random.fold_in(jax.random.key(seed), next(counter))
          response = model.respond(history, mode, temperature, rng)
        if (mode == "image_only") != (response.image is not None):
          raise ModelError(f"model answered {mode} with the other modality")
      except PromptTooLong as e:  # The model's exact count, after the server's lower bound.
        self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": str(e)})
        return
      except Exception as e:
        logging.exception("model failed")
        self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": protocol.describe_error(e)})
        return
      self._reply(HTTPStatus.OK, {"response": response.to_json()})

  return BoundedHTTPServer((host, port), Handler, workers=workers, backlog=backlog)


def main(argv):
  from absl import flags

  from drivekd_jax import paths
  from imug_jax import run as run_lib

  del argv
  config = _CONFIG.value
  workdir = flags.FLAGS.workdir or str(paths.default_workdir("imug_serve"))
  model = run_lib.build_model(config, workdir)
  server = make_server(
    model,
    host=flags.FLAGS.host,
    port=flags.FLAGS.port,
    max_request_bytes=int(flags.FLAGS.max_request_mb * (1 << 20)),
    read_timeout_s=flags.FLAGS.read_timeout_s,
    workers=flags.FLAGS.workers,
  )
  host, port = server.server_address[:2]
  print(f"serving {model.name} on http://{host}:{port}/infer", flush=True)
  try:
    server.serve_forever()
  finally:
    server.server_close()


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (default loopback only).")
  flags.DEFINE_integer("port", 8000, "Port (0: any free port).")
  flags.DEFINE_float("max_request_mb", 64.0, "Largest request body accepted, in MiB.")
  flags.DEFINE_float("read_timeout_s", 30.0, "Seconds a connection may stay silent.")
  flags.DEFINE_integer("workers", 8, "Threads answering requests.")
  flags.DEFINE_string(
    "workdir",
    "",
    "Where the model's files (tokenizer, synthetic benchmark) live; default a fresh per-user, "
    "per-run folder in the system temp directory.",
  )
  flags.mark_flags_as_required(["config"])
  app.run(main)
