"""/infer: our HTTP client against our server in a subprocess on loopback (127.0.0.1 only)."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.http import HttpModel
from imug_jax.models.protocol import ModelError

ROOT = Path(__file__).resolve().parents[1]

SERVERS = textwrap.dedent("""
    import json, sys, threading, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    import numpy as np
    from imug_jax.models import image_tokenizer as itok
    from imug_jax.models.protocol import ModelError, Response
    from imug_jax.serve import make_server

    class Fake:
      def __init__(self, name):
        self.name = name
      def respond(self, history, output_mode, temperature, rng=None):
        text = history[-1]["content"][0]["text"]
        if text == "fail":
          raise ModelError("the fake model failed")
        if text == "slow":
          time.sleep(3)
        if output_mode == "image_only":
          return Response(image=itok.png_bytes(np.full((8, 8, 3), 200, np.uint8)))
        return Response(text=f"{self.name}:{text}:{temperature}")

    class Garbage(BaseHTTPRequestHandler):
      def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        body = b"<html>not json</html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
      def log_message(self, *args):
        pass

    servers = [make_server(Fake("a"), max_request_bytes=200_000),
               make_server(Fake("b"), max_request_bytes=200_000),
               ThreadingHTTPServer(("127.0.0.1", 0), Garbage)]
    for server in servers:
      threading.Thread(target=server.serve_forever, daemon=True).start()
    print(json.dumps([s.server_address for s in servers]), flush=True)
    sys.stdin.read()  # Serve until the test closes stdin.
""")


@pytest.fixture(scope="module")
def servers():
  process = subprocess.Popen(
    [sys.executable, "-c", SERVERS],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    text=True,
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    addresses = json.loads(process.stdout.readline())
    assert all(host == "127.0.0.1" for host, _ in addresses)
    yield [f"http://127.0.0.1:{port}" for _, port in addresses]
  finally:
    process.stdin.close()
    process.wait(timeout=10)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _user(text, *images):
  return [
    protocol.message("user", [protocol.text_item(text), *(protocol.image_item(i) for i in images)])
  ]


def _post(url, body: bytes):
  request = urllib.request.Request(
    url + "/infer", data=body, method="POST", headers={"Content-Type": "application/json"}
  )
  try:
    with urllib.request.urlopen(request, timeout=10) as reply:
      return reply.status, json.loads(reply.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def test_text_and_image_round_trip(servers):
  client = HttpModel("fake", servers[0], retries=1)
  png = itok.png_bytes(np.zeros((4, 4, 3), np.uint8))
  assert client.respond(_user("hello", png), "text_only", 0.3).text == "a:hello:0.3"
  image = client.respond(_user("draw"), "image_only").image
  assert itok.read_image(image).shape == (8, 8, 3)


def test_urls_are_balanced_and_dead_ones_skipped(servers):
  client = HttpModel("fake", [servers[0], servers[1]], retries=1)
  answers = [client.respond(_user("x"), "text_only").text[0] for _ in range(4)]
  assert answers == ["a", "b", "a", "b"]
  dead = f"http://127.0.0.1:{_free_port()}"
  client = HttpModel("fake", [dead, servers[1]], retries=2, backoff=0.0)
  assert client.respond(_user("x"), "text_only").text == "b:x:0.7"


def test_server_errors_timeouts_and_garbage_are_retried_then_raised(servers):
  client = HttpModel("fake", servers[0], retries=3, backoff=0.0)
  with pytest.raises(ModelError, match="3 failed attempts.*HTTP 500.*the fake model failed"):
    client.respond(_user("fail"), "text_only")
  slow = HttpModel("fake", servers[0], retries=2, backoff=0.0, timeout=0.5)
  start = time.monotonic()
  with pytest.raises(ModelError, match="2 failed attempts.*timeout"):
    slow.respond(_user("slow"), "text_only")
  assert time.monotonic() - start < 3
  garbage = HttpModel("fake", servers[2], retries=2, backoff=0.0)
  with pytest.raises(ModelError, match="not JSON"):
    garbage.respond(_user("x"), "text_only")
  # A request the server rejects (4xx) is not retried.
  bad = HttpModel("fake", servers[0], retries=3, backoff=0.0)
  history = _user("x") + [protocol.message("assistant", [protocol.text_item("y")])]
  with pytest.raises(ModelError, match="1 failed attempts.*HTTP 400.*last message"):
    bad.respond(history, "text_only")


def test_server_validates_requests(servers):
  url = servers[0]
  assert _post(url, b"{not json")[0] == 400
  status, reply = _post(
    url,
    json.dumps(
      {
        "history": [protocol.message("user", [{"type": "image", "image": "not base64!"}])],
        "output_mode": "text_only",
      }
    ).encode(),
  )
  assert status == 400 and "history[0].content[0].image: invalid base64" in reply["error"]
  fake_png = protocol.encode_image(b"GIF89a but not really")
  status, reply = _post(
    url,
    json.dumps(
      {
        "history": [protocol.message("user", [{"type": "image", "image": fake_png}])],
        "output_mode": "text_only",
      }
    ).encode(),
  )
  assert status == 400 and "not a readable image" in reply["error"]
  status, reply = _post(
    url, json.dumps({"history": _user("x" * 300_000), "output_mode": "text_only"}).encode()
  )
  assert status == 413 and "exceeds" in reply["error"]
  with urllib.request.urlopen(url + "/health", timeout=5) as health:
    assert json.loads(health.read()) == {"status": "ok", "model": "a"}


@pytest.mark.slow
def test_serve_cli_serves_the_demo_model(tmp_path):
  port = _free_port()
  process = subprocess.Popen(
    [
      sys.executable,
      "-m",
      "imug_jax.serve",
      "--config=configs/imug/demo.py",
      f"--port={port}",
      f"--workdir={tmp_path}",
      "--config.data.num_samples=4",
      "--config.model.train.steps=0",
    ],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  try:
    line = ""
    while "serving" not in line:
      line = process.stdout.readline()
      assert line or process.poll() is None, "server exited"
    assert f"http://127.0.0.1:{port}/infer" in line
    client = HttpModel("tiny", f"http://127.0.0.1:{port}", retries=1, timeout=120)
    assert isinstance(client.respond(_user("Draw a red square."), "text_only").text, str)
    image = client.respond(_user("Draw a red square."), "image_only").image
    assert itok.read_image(image).shape == (96, 96, 3)
  finally:
    process.terminate()
    process.wait(timeout=10)


def test_eval_config_rolls_out_a_release_through_infer_servers(servers, tmp_path):
  import importlib.util

  from imug_jax import run as run_lib
  from imug_jax.data import synthetic

  bench = synthetic.write_synthetic(tmp_path / "release", num_samples=4, seed=0)
  spec = importlib.util.spec_from_file_location("eval_config", ROOT / "configs/imug/eval.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.release_dir = str(bench.data_dir)
  config.model.urls = tuple(servers[:2])
  config.model.name = "fake_remote"
  config.rollout.progress = False
  summary = run_lib.run(config, str(tmp_path / "work"))
  counts = summary["runs"]["fake_remote"]
  assert (counts["done"], counts["failed"], counts["error_turns"]) == (4, 0, 0)
  results = list((tmp_path / "work/outputs/model_outputs/fake_remote").rglob("result.json"))
  assert len(results) == 4
  config.data.release_dir = ""
  with pytest.raises(ValueError, match="release_dir"):
    run_lib.run(config, str(tmp_path / "work"))
