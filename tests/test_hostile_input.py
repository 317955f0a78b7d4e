"""Probes of a hostile but fair user: key leaks, path escapes, server hangs (loopback only)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import stat
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from drivekd_jax import paths
from drivekd_jax.eval.judge_client import JudgeError, OpenAIChatJudge
from imug_jax.data.schema import SampleKey
from imug_jax.models import protocol
from imug_jax.models.http import HttpModel
from imug_jax.models.protocol import ModelError, Response
from imug_jax.scoring import layout
from imug_jax.serve import make_server

SECRET = "sk-hostile-test-0123456789abcdef"
KEY_ENV = "HOSTILE_TEST_JUDGE_KEY"


def _completion(content: str) -> bytes:
  return json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()


class Recorder:
  """A loopback server whose handler is `respond(handler, body) -> (status, headers, body)`."""

  def __init__(self, respond):
    self.requests = []
    self.in_flight = self.peak = 0
    lock = threading.Lock()
    recorder = self

    class Handler(BaseHTTPRequestHandler):
      def _serve(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        with lock:
          recorder.requests.append((self.command, self.path, dict(self.headers), body))
          recorder.in_flight += 1
          recorder.peak = max(recorder.peak, recorder.in_flight)
        try:
          status, headers, data = respond(self, body)
        finally:
          with lock:
            recorder.in_flight -= 1
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
          self.send_response(status)
          for name, value in headers.items():
            self.send_header(name, value)
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)

      do_GET = do_POST = _serve

      def log_message(self, *args):
        pass

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def serve():
  started = []

  def start(respond):
    started.append(Recorder(respond))
    return started[-1]

  yield start
  for server in started:
    server.close()


def _judge(url, **kwargs):
  sleeps = []
  judge = OpenAIChatJudge(url, "judge-m", api_key_env=KEY_ENV, sleep=sleeps.append, **kwargs)
  return judge, sleeps


# ------------------------------------------------------------------------------ the judge client


def test_judge_refuses_redirects_and_never_hands_the_key_on(serve, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  thief = serve(lambda h, b: (200, {}, _completion("stolen verdict")))
  judge_server = serve(lambda h, b: (302, {"Location": thief.url + "/v1/chat/completions"}, b""))
  judge, sleeps = _judge(judge_server.url + "/v1")
  with pytest.raises(JudgeError, match="302.*redirects are not followed"):
    judge.chat("s", ["t"])
  assert thief.requests == []  # Neither the key nor the body reached the other address.
  assert len(judge_server.requests) == 1 and sleeps == []  # Not retried.


def test_judge_redacts_a_key_echoed_back(serve, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  echo = serve(lambda h, b: (400, {}, f"bad key {h.headers['Authorization']}".encode()))
  judge, _ = _judge(echo.url + "/v1")
  with pytest.raises(JudgeError) as info:
    judge.chat("s", ["t"])
  assert "HTTP 400" in str(info.value) and SECRET not in str(info.value)
  assert "<redacted>" in str(info.value)
  garbage = serve(lambda h, b: (200, {}, f"<html>{SECRET}</html>".encode()))
  judge, _ = _judge(garbage.url + "/v1", max_retries=0)
  with pytest.raises(JudgeError, match="malformed") as info:
    judge.chat("s", ["t"])
  assert SECRET not in str(info.value)
  parrot = serve(lambda h, b: (200, {}, _completion(f"your key is {SECRET}")))
  judge, _ = _judge(parrot.url + "/v1")
  assert judge.chat("s", ["t"]) == "your key is <redacted>"


def test_key_is_never_sent_over_plain_http_to_a_remote_host(monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  judge, _ = _judge("http://judge.invalid/v1", max_retries=0)
  with pytest.raises(JudgeError, match="refusing to send credentials over plain http"):
    judge.chat("s", ["t"])
  with pytest.raises(ValueError, match="must not carry credentials"):
    OpenAIChatJudge("https://user:pw@judge.invalid/v1", "m")


def test_reply_cache_pays_once_and_replays_exactly(serve, tmp_path, monkeypatch):
  monkeypatch.setenv(KEY_ENV, SECRET)
  replies = iter(["first", "second", "third"])
  server = serve(lambda h, b: (200, {}, _completion(next(replies))))
  judge, _ = _judge(server.url + "/v1", cache_dir=tmp_path / "judge")
  # The same request asked twice (a scorer re-asking after an unparseable reply) is paid twice.
  assert [judge.chat("s", ["t"]), judge.chat("s", ["t"])] == ["first", "second"]
  assert judge.chat("s", ["t"], temperature=0.5) == "third"
  assert len(server.requests) == 3
  rerun, _ = _judge(server.url + "/v1", cache_dir=tmp_path / "judge")
  got = [rerun.chat("s", ["t"]), rerun.chat("s", ["t"]), rerun.chat("s", ["t"], temperature=0.5)]
  assert got == ["first", "second", "third"] and len(server.requests) == 3 and rerun.calls == 0
  # The endpoint is not part of the key (a loopback judge restarts on a fresh port).
  replay, _ = _judge("http://127.0.0.1:9/v1", cache_dir=tmp_path / "judge", replay_only=True)
  assert replay.chat("s", ["t"]) == "first"
  with pytest.raises(JudgeError, match="not in the cache"):
    replay.chat("other", ["t"])
  assert len(server.requests) == 3
  log = [json.loads(line) for line in (tmp_path / "judge" / "judge_requests.jsonl").open()]
  assert [entry["status"] for entry in log].count("ok") == 3
  assert [entry["status"] for entry in log].count("cached") == 4
  for path in (tmp_path / "judge").iterdir():
    assert SECRET not in path.read_text()
  assert SECRET not in repr(judge) and SECRET not in str(vars(judge))


def test_concurrency_is_bounded_and_retry_after_is_honoured(serve):
  def slow(handler, body):
    time.sleep(0.2)
    return 200, {}, _completion("ok")

  server = serve(slow)
  judge, _ = _judge(server.url + "/v1", concurrency=2)
  replies = judge.chat_many([("s", [f"item {i}"]) for i in range(6)])
  assert replies == ["ok"] * 6 and server.peak <= 2
  server.peak = 0  # Threads of the caller's own share the same bound.
  threads = [threading.Thread(target=judge.chat, args=("s", [f"x {i}"])) for i in range(6)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert server.peak == 2
  busy = iter([(429, {"Retry-After": "7"}, b"later"), (200, {}, _completion("now"))])
  server = serve(lambda h, b: next(busy))
  judge, sleeps = _judge(server.url + "/v1", backoff_s=1.0, max_backoff_s=60.0)
  assert judge.chat("s", ["t"]) == "now" and sleeps[0] >= 7


# ---------------------------------------------------------------------------- the /infer client


def test_infer_client_refuses_redirects(serve):
  other = serve(lambda h, b: (200, {}, json.dumps({"response": {"text": "hijacked"}}).encode()))
  server = serve(lambda h, b: (302, {"Location": other.url + "/infer"}, b""))
  client = HttpModel("m", server.url, retries=3, backoff=0.0)
  with pytest.raises(ModelError, match="1 failed attempts.*redirects are not followed"):
    client.respond([protocol.message("user", [protocol.text_item("x")])], "text_only")
  assert other.requests == []


# -------------------------------------------------------------------------------- the /infer server


class CountingModel:
  """Answers text; counts calls; declares a small token budget."""

  name = "counting"
  token_budget = protocol.TokenBudget(max_tokens=100, tokens_per_image=40, max_chars_per_token=4)

  def __init__(self):
    self.calls = 0

  def respond(self, history, output_mode, temperature, rng=None):
    self.calls += 1
    return Response(text="ok")


@pytest.fixture
def infer_server(request):
  """Two workers and no backlog, so a third connection is refused (503). A test marked
  `@pytest.mark.parametrize("infer_server", [backlog], indirect=True)` gets that backlog: the
  connection of a request just answered may hold its slot for a moment after the reply."""
  model = CountingModel()
  backlog = getattr(request, "param", 0)
  server = make_server(
    model, read_timeout_s=0.5, workers=2, backlog=backlog, max_request_bytes=1 << 20
  )
  threading.Thread(target=server.serve_forever, daemon=True).start()
  yield server.server_address[1], model
  server.shutdown()
  server.server_close()


def _raw(port: int, data: bytes, *, wait: float = 5.0) -> tuple[int, dict]:
  """Sends raw bytes; returns (status, JSON body) of the reply."""
  with socket.create_connection(("127.0.0.1", port), timeout=wait) as sock:
    sock.sendall(data)
    reply = b""
    while b"\r\n\r\n" not in reply or len(reply.split(b"\r\n\r\n", 1)[1]) < _length(reply):
      chunk = sock.recv(65536)
      if not chunk:
        break
      reply += chunk
  head, _, body = reply.partition(b"\r\n\r\n")
  return int(head.split()[1]), json.loads(body)


def _length(reply: bytes) -> int:
  for line in reply.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
    name, _, value = line.partition(b":")
    if name.strip().lower() == b"content-length":
      return int(value)
  return 0


def _request(body: bytes, length: int | str | None = None) -> bytes:
  head = b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
  if length is not None:
    head += f"Content-Length: {length}\r\n".encode()
  return head + b"\r\n" + body


def _body(history, mode="text_only") -> bytes:
  return json.dumps({"history": history, "output_mode": mode}).encode()


@pytest.mark.parametrize("infer_server", [16], indirect=True)
def test_malformed_bodies_all_get_a_4xx_json_reply(infer_server):
  port, model = infer_server
  good = _body([protocol.message("user", [protocol.text_item("hi")])])
  assert _raw(port, _request(good, len(good)))[0] == 200
  cases = [
    (_request(good, -1), 400, "Content-Length must be a byte count"),
    (_request(good, "ten"), 400, "Content-Length must be a byte count"),
    (_request(good), 411, "Content-Length required"),
    (_request(good, 1 << 30), 413, "exceeds"),
    (_request(b"[" * 100_000, 100_000), 400, "nested too deeply"),
    (_request(b'{"output_mode": 5}', 18), 400, "output_mode must be one of"),
    (
      _request(b'{"history": [{"role": "user", "content": [7]}], "output_mode": "text_only"}', 75),
      400,
      "history[0].content[0]",
    ),
  ]
  for data, status, message in cases:
    got_status, reply = _raw(port, data)
    assert (
      got_status == status
      and json.dumps(reply)
      and message in reply["error"]
      or (pytest.fail(f"{data[:80]!r}: {got_status} {reply}"))
    )
  assert model.calls == 1


def test_a_body_shorter_than_its_length_times_out_with_408(infer_server):
  port, _ = infer_server
  start = time.monotonic()
  status, reply = _raw(port, _request(b'{"hist', 1000))
  assert status == 408 and "ended after 6 of 1000 bytes" in reply["error"]
  assert time.monotonic() - start < 3


def test_a_prompt_that_cannot_fit_is_refused_before_any_work(infer_server):
  port, model = infer_server
  huge = "word " * 200_000  # 1 MB: at least 1e6 / (3 * 4) tokens, far over 100.
  data = _body([protocol.message("user", [protocol.text_item(huge[: (1 << 20) - 200])])])
  status, reply = _raw(port, _request(data, len(data)))
  assert status == 413 and "needs at least" in reply["error"] and model.calls == 0
  # Three images cost 120 tokens: refused before their (invalid) base64 is even decoded.
  images = [{"type": "image", "image": "not base64!"}] * 3
  data = _body([protocol.message("user", [protocol.text_item("x"), *images])])
  status, reply = _raw(port, _request(data, len(data)))
  assert status == 413 and model.calls == 0


def test_undecodable_image_error_shows_no_object_repr(infer_server):
  port, _ = infer_server
  fake = protocol.encode_image(b"GIF89a but not really")
  data = _body([protocol.message("user", [{"type": "image", "image": fake}])])
  status, reply = _raw(port, _request(data, len(data)))
  assert status == 400 and "not a readable image" in reply["error"]
  assert "object at 0x" not in reply["error"] and "BytesIO" not in reply["error"]


def test_the_worker_pool_is_bounded(infer_server):
  port, _ = infer_server
  idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]  # Fill both workers.
  try:
    time.sleep(0.1)
    good = _body([protocol.message("user", [protocol.text_item("hi")])])
    status, reply = _raw(port, _request(good, len(good)))
    assert status == 503 and "busy" in reply["error"]
  finally:
    for sock in idle:
      sock.close()
  time.sleep(0.7)  # The idle connections time out and free their workers.
  assert _raw(port, _request(good, len(good)))[0] == 200


def test_tiny_model_prompt_processing_is_linear():
  from imug_jax.models.tiny import split_into_pieces

  tokens = list(range(200_000))
  start = time.monotonic()
  pieces = split_into_pieces(tokens, 8, 3)
  assert time.monotonic() - start < 2.0
  assert list(itertools.chain(*pieces)) == tokens and max(map(len, pieces)) == 8
  assert split_into_pieces(list(range(10)), 8, 4) == [list(range(6)), list(range(6, 10))]


def test_tiny_model_refuses_an_overlong_prompt_before_tokenizing(tmp_path):
  from drivekd_jax.data.tokenizer import train_bpe_tokenizer
  from imug_jax.models.tiny import TinyConfig, TinyUnifiedModel

  tok = train_bpe_tokenizer(["Draw a red square.", "Answer A or B."] * 3, 300, tmp_path / "t.json")
  config = TinyConfig(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, cache_length=256)
  model = TinyUnifiedModel(tok, config)
  history = [protocol.message("user", [protocol.text_item("Draw a red square. " * 300_000)])]
  start = time.monotonic()
  with pytest.raises(protocol.PromptTooLong, match="holds"):
    model.respond(history, "text_only", 0.0)
  assert time.monotonic() - start < 1.0


# ---------------------------------------------------------------------------- paths and workdirs


def test_output_layout_never_leaves_the_model_folder(tmp_path):
  for key in (
    SampleKey("../../../../elsewhere", "s", "1"),
    SampleKey("d", "..", "1"),
    SampleKey("d", "s", "1/../../../x"),
  ):
    with pytest.raises(ValueError, match="plain name"):
      layout.question_dir(tmp_path / "model", key)
  good = SampleKey("d", "s", "1")
  folder = layout.question_dir(tmp_path / "model", good)
  folder.mkdir(parents=True)
  (tmp_path / "model" / "d" / "evil.png").write_bytes(b"x")
  from imug_jax.data.schema import parse_sample

  result = parse_sample(
    {
      "domain": "d",
      "subdomain": "s",
      "sample_id": "1",
      "tasks": [
        {
          "turn": 1,
          "modality": "image",
          "input": [{"text": "draw"}],
          "output": {"evaluation_points": ["p"]},
          "model_response": "../../evil.png",
        }
      ],
    }
  )
  assert layout.find_output_image(tmp_path / "model", good, 1, result) is None


def test_rollout_model_name_must_be_a_plain_name(tmp_path):
  from imug_jax.rollout.runner import run_rollout

  with pytest.raises(ValueError, match="model name"):
    run_rollout(CountingModel(), [], images_dir=tmp_path, out_dir=tmp_path, model_name="../evil")


def test_build_folder_is_all_or_nothing(tmp_path):
  target = tmp_path / "bench"

  def interrupted(folder):
    (folder / "benchmark.jsonl").write_text("{}\n")
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    paths.build_folder(target, interrupted)
  assert not target.exists() and list(tmp_path.iterdir()) == []
  target.mkdir()
  (target / "benchmark.jsonl").write_text("half\n")  # An older layout: no marker.
  paths.build_folder(target, lambda folder: (folder / "benchmark.jsonl").write_text("whole\n"))
  assert (target / "benchmark.jsonl").read_text() == "whole\n" and paths.is_complete(target)
  (aside,) = tmp_path.glob("bench.incomplete-*")
  assert (aside / "benchmark.jsonl").read_text() == "half\n"  # Kept, not deleted.
  calls = []
  paths.build_folder(target, calls.append)
  assert calls == []


def test_default_workdirs_are_per_user_and_per_run():
  first, second = paths.default_workdir("imug_serve"), paths.default_workdir("imug_serve")
  try:
    assert first != second and first.parent == second.parent == Path(tempfile.gettempdir())
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o700
  finally:
    first.rmdir()
    second.rmdir()
  with pytest.raises(ValueError, match="task"):
    paths.default_workdir("../x")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
  target = tmp_path / "f.json"
  paths.write_text_atomic(target, "old")

  with pytest.raises(TypeError):  # The write fails half way (here: not bytes at all).
    paths.write_bytes_atomic(target, object())
  assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_imug_first_start_is_recoverable_and_num_samples_is_checked(tmp_path, capsys):
  from ml_collections import ConfigDict

  from imug_jax import run as run_lib
  from imug_jax.data import synthetic

  config = ConfigDict({"data": {"source": "synthetic", "num_samples": -3, "seed": 0}})
  with pytest.raises(ValueError, match="data.num_samples must be an integer >= 1, got -3"):
    run_lib.load_benchmark(config, tmp_path)
  with pytest.raises(SystemExit):
    synthetic.main(["--out", str(tmp_path / "cli"), "--num_samples", "-3"])
  assert "--num_samples must be >= 1" in capsys.readouterr().err
  assert not (tmp_path / "cli").exists()
  # A first start killed after benchmark.jsonl was written (the older order): not taken as done.
  (tmp_path / "benchmark").mkdir()
  (tmp_path / "benchmark" / "benchmark.jsonl").write_text("")
  config.data.num_samples = 2
  bench = run_lib.load_benchmark(config, tmp_path)
  assert len(bench.samples) == 2 and paths.is_complete(tmp_path / "benchmark")
  assert len(list(tmp_path.glob("benchmark.incomplete-*"))) == 1
