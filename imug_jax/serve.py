r"""Serves any in-process model on the official `/infer` protocol (standard library HTTP server).

  python -m imug_jax.serve --config=configs/imug/demo.py --port 8000 [--host 127.0.0.1]

POST /infer  {"history": [...], "output_mode": "text_only" | "image_only", "temperature": t}
  200 {"response": {"text": ...}} | {"response": {"image": <base64 PNG>}}
  400 {"error": ...}  malformed request (bad JSON, fields, base64 image); 413 too large
  500 {"error": ...}  the model failed
GET /health  {"status": "ok", "model": name}

Bound to 127.0.0.1 unless --host says otherwise. Requests larger than --max_request_mb are
refused before they are read. Calls into the model are serialised (in-process models are not
thread-safe); each request gets its own PRNG key (seed, request counter).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax

from imug_jax.models import protocol
from imug_jax.models.protocol import ModelError, ProtocolError, UnifiedModel


def make_server(
  model: UnifiedModel,
  *,
  host: str = "127.0.0.1",
  port: int = 0,
  max_request_bytes: int = 64 << 20,
  seed: int = 0,
) -> ThreadingHTTPServer:
  """An HTTP server (not yet serving) answering `/infer` with `model`; port 0 picks a free one."""
  lock = threading.Lock()
  counter = itertools.count()

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, status: int, body: dict[str, Any]) -> None:
      data = json.dumps(body).encode("utf-8")
      self.send_response(status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def log_message(self, format, *args):
      logging.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
      if self.path.rstrip("/") == "/health":
        self._reply(HTTPStatus.OK, {"status": "ok", "model": model.name})
      else:
        self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})

    def do_POST(self):
      if self.path.rstrip("/") != "/infer":
        self._reply(HTTPStatus.NOT_FOUND, {"error": f"no route {self.path}"})
        return
      try:
        length = int(self.headers.get("Content-Length", ""))
      except ValueError:
        self.close_connection = True
        self._reply(HTTPStatus.LENGTH_REQUIRED, {"error": "Content-Length required"})
        return
      if length > max_request_bytes:
        self.close_connection = True  # The unread body must not be parsed as a next request.
        self._reply(
          HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
          {"error": f"request of {length} bytes exceeds {max_request_bytes}"},
        )
        return
      try:
        body = json.loads(self.rfile.read(length))
        history, mode, temperature = protocol.validate_request(
          body, max_image_bytes=max_request_bytes
        )
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        self._reply(HTTPStatus.BAD_REQUEST, {"error": f"request is not JSON: {e}"})
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
      except Exception as e:
        logging.exception("model failed")
        self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
        return
      self._reply(HTTPStatus.OK, {"response": response.to_json()})

  server = ThreadingHTTPServer((host, port), Handler)
  server.daemon_threads = True
  return server


def main(argv):
  from absl import flags

  from imug_jax import run as run_lib

  del argv
  config = _CONFIG.value
  workdir = flags.FLAGS.workdir
  model = run_lib.build_model(config, workdir)
  server = make_server(
    model,
    host=flags.FLAGS.host,
    port=flags.FLAGS.port,
    max_request_bytes=int(flags.FLAGS.max_request_mb * (1 << 20)),
  )
  host, port = server.server_address[:2]
  print(f"serving {model.name} on http://{host}:{port}/infer", flush=True)
  try:
    server.serve_forever()
  finally:
    server.server_close()


if __name__ == "__main__":
  import os
  import tempfile

  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.")
  flags.DEFINE_string("host", "127.0.0.1", "Interface to bind (default loopback only).")
  flags.DEFINE_integer("port", 8000, "Port (0: any free port).")
  flags.DEFINE_float("max_request_mb", 64.0, "Largest request body accepted, in MiB.")
  flags.DEFINE_string(
    "workdir",
    os.path.join(tempfile.gettempdir(), "imug_serve"),
    "Where the model's files (tokenizer, synthetic benchmark) live.",
  )
  flags.mark_flags_as_required(["config"])
  app.run(main)
