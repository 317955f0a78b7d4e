"""The OpenAI-compatible judge client against a local fake server, plus the smoke-test judge."""

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from drivekd_jax.eval.judge_client import OpenAIChatJudge
from imug_jax.judges.base import ImagePart, JudgeError, JudgeReplyError, outermost_json_object
from imug_jax.judges.prompts import DYNAMIC_ROLE, PromptSet
from imug_jax.judges.random_judge import RandomJudge

SECRET = "sk-test-secret-0123456789"


def completion(content):
  return 200, json.dumps(
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
  )


class FakeServer:
  """Answers POST /v1/chat/completions from a script of (status, body) or ("sleep", seconds)."""

  def __init__(self, script):
    self.script = list(script)
    self.requests = []
    server = self

    class Handler(BaseHTTPRequestHandler):
      def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server.requests.append((self.path, dict(self.headers), json.loads(body)))
        step = server.script.pop(0) if server.script else (500, "script exhausted")
        if step[0] == "sleep":
          time.sleep(step[1])
          step = completion("late")
        status, text = step
        data = text.encode()
        # In the timeout case the client has already gone away: a broken pipe is expected.
        with contextlib.suppress(BrokenPipeError):
          self.send_response(status)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)

      def log_message(self, *args):
        pass

    self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

  def close(self):
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def serve():
  servers = []

  def start(*script):
    servers.append(FakeServer(script))
    return servers[-1]

  yield start
  for server in servers:
    server.close()


def make_judge(url, **kwargs):
  sleeps = []
  kwargs.setdefault("api_key_env", "IMUG_JUDGE_API_KEY")
  judge = OpenAIChatJudge(url, "judge-model", sleep=sleeps.append, **kwargs)
  return judge, sleeps


def test_success_sends_images_as_data_urls_and_key_from_env(serve, monkeypatch):
  monkeypatch.setenv("IMUG_JUDGE_API_KEY", SECRET)
  server = serve(completion('{"evaluation_results": []}'))
  judge, sleeps = make_judge(server.url)
  image = ImagePart.from_array(np.zeros((4, 4, 3), np.uint8))
  reply = judge.chat("system rules", [image, "Please output JSON results."])
  assert reply == '{"evaluation_results": []}'
  assert sleeps == []
  path, headers, body = server.requests[0]
  assert path == "/v1/chat/completions"
  assert headers["Authorization"] == f"Bearer {SECRET}"
  assert body["model"] == "judge-model" and body["temperature"] == 0.1
  system, user = body["messages"]
  assert system == {"role": "system", "content": "system rules"}
  assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
  assert user["content"][1] == {"type": "text", "text": "Please output JSON results."}
  assert SECRET not in repr(judge)


def test_429_then_success_backs_off(serve):
  server = serve((429, "slow down"), (503, "busy"), completion("ok"))
  judge, sleeps = make_judge(server.url, backoff_s=1.0)
  assert judge.chat("s", ["t"]) == "ok"
  assert len(server.requests) == 3
  assert len(sleeps) == 2 and 1.0 <= sleeps[0] < 1.2 and 2.0 <= sleeps[1] < 2.4


def test_client_errors_fail_at_once_without_leaking_the_key(serve, monkeypatch):
  monkeypatch.setenv("IMUG_JUDGE_API_KEY", SECRET)
  server = serve((401, "bad key"))
  judge, sleeps = make_judge(server.url)
  with pytest.raises(JudgeError, match="HTTP 401") as info:
    judge.chat("s", ["t"])
  assert SECRET not in str(info.value)
  assert len(server.requests) == 1 and sleeps == []


def test_malformed_body_is_retried_then_reported(serve):
  server = serve((200, "{not json"), (200, json.dumps({"choices": []})))
  judge, sleeps = make_judge(server.url, max_retries=1)
  with pytest.raises(JudgeError, match="gave up after 2 attempts: malformed chat-completion body"):
    judge.chat("s", ["t"])
  assert len(server.requests) == 2


def test_timeout_is_retried(serve):
  server = serve(("sleep", 1.0), completion("second try"))
  judge, sleeps = make_judge(server.url, timeout_s=0.2, max_retries=1)
  assert judge.chat("s", ["t"]) == "second try"
  assert len(sleeps) == 1
  server2 = serve(("sleep", 1.0), ("sleep", 1.0))
  judge2, _ = make_judge(server2.url, timeout_s=0.2, max_retries=1)
  with pytest.raises(JudgeError, match="timeout"):
    judge2.chat("s", ["t"])


def test_outermost_json_object():
  assert outermost_json_object('Sure! {"a": {"b": 1}} hope that helps') == {"a": {"b": 1}}
  for bad in ("no json here", '{"a": 1', "[1, 2]", '{"a": } {'):
    with pytest.raises(JudgeReplyError):
      outermost_json_object(bad)


def test_random_judge_is_seeded_and_weighted():
  text = "Sequence description:\n\n[Evaluation Points List]:\n1. red ball\n2. blue box\n3. sky\n"
  judge = RandomJudge()
  first = json.loads(judge.chat(PromptSet.ours().image, [text]))
  assert [p["point_id"] for p in first["evaluation_results"]] == [1, 2, 3]
  assert first == json.loads(RandomJudge(2026).chat(PromptSet.ours().image, [text]))
  draws = [
    p["score"]
    for i in range(400)
    for p in json.loads(judge.chat("x", [f"{i}\n[Evaluation Points List]:\n1. a\n"]))[
      "evaluation_results"
    ]
  ]
  counts = np.bincount(draws, minlength=6) / len(draws)
  np.testing.assert_allclose(counts, np.array([1, 2, 4, 5, 4, 2]) / 18, atol=0.06)
  dynamic = json.loads(judge.chat(PromptSet.ours().dynamic, ["question"]))
  assert dynamic["determined_answer"] in "ABCDEFG" and DYNAMIC_ROLE in PromptSet.ours().dynamic


def test_official_prompt_files_load_from_a_checkout(tmp_path):
  folder = tmp_path / "IMUG-Bench" / "scripts" / "auxiliary"
  folder.mkdir(parents=True)
  (folder / "eval_prompt.txt").write_text("official image rubric")
  (folder / "dynamic_prompt.txt").write_text("official dynamic rubric")
  prompts = PromptSet.official(tmp_path / "IMUG-Bench")
  assert (prompts.image, prompts.dynamic) == ("official image rubric", "official dynamic rubric")
  assert prompts.source.startswith("official:")
  with pytest.raises(FileNotFoundError, match="eval_prompt.txt"):
    PromptSet.official(tmp_path)
  ours = PromptSet.ours()
  assert "2-4" in ours.image and "evaluation_results" in ours.image and ours.source == "ours"
