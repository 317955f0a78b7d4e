"""A deterministic local judge and a loopback OpenAI-compatible server for any judge.

`OverlapJudge` needs no model and no network: it reads the ground truth and the prediction out
of a DriveBench rubric message written with `rubrics.OUR_TEMPLATES` ("Correct answer:" /
"Predicted answer:") or out of a DriveLM rating message ("This is the correct answer:" / "This
is my answer:"), and scores them: a one-letter ground truth (an MCQ) gets 100 when the strict
parser reads the same letter in the prediction, else 0; any other answer gets 100 times the
unigram F1 of the two token lists (`language.simple_tokenize`). It replies with a score sheet
ending in `Total Score: N` (DriveBench) or with the number alone (DriveLM). It is a stand-in
for demos and end-to-end tests of the pipeline, not a judge of answer quality; a message it
cannot read raises `JudgeError`, which scoring counts as a failure.

`LoopbackJudgeServer(judge)` serves `POST <url>/chat/completions` on 127.0.0.1 (an ephemeral
port by default) with any object that has `chat(system, parts, *, temperature)`, so the real
`judge_client.OpenAIChatJudge` (retries, cache, request log) can be exercised end to end.
"""

from __future__ import annotations

import collections
import json
import re
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from drivekd_jax.eval import language
from drivekd_jax.eval.judge_client import JudgeError

_DRIVEBENCH = re.compile(r"Correct answer: (.*)\nPredicted answer: (.*?)\n\nCriteria:", re.DOTALL)
_DRIVELM = re.compile(r"This is the correct answer: (.*) This is my answer: (.*)\Z", re.DOTALL)
_LETTER = re.compile(r"^\s*([A-D])\.?\s*$")
_MAX_BODY_BYTES = 8 * 1024 * 1024


def overlap_score(truth: str, pred: str) -> int:
  """100 x unigram F1 of the tokens; for a one-letter truth, 100 if the strict parser agrees."""
  from drivekd_jax.eval.drivebench import parse_choice_strict

  letter = _LETTER.match(truth)
  if letter:
    return 100 if parse_choice_strict(pred) == letter.group(1) else 0
  want = collections.Counter(language.simple_tokenize(truth).split())
  got = collections.Counter(language.simple_tokenize(pred).split())
  common = sum((want & got).values())
  if not common:
    return 0
  precision, recall = common / sum(got.values()), common / sum(want.values())
  return round(100 * 2 * precision * recall / (precision + recall))


class OverlapJudge:
  """The deterministic stand-in judge of the module docstring."""

  name = "local:overlap"
  concurrency = 1

  def __init__(self):
    self.calls = 0

  def chat(self, system: str, parts: Sequence[str], *, temperature: float = 0.0) -> str:
    del system, temperature  # deterministic
    self.calls += 1
    text = "\n".join(part for part in parts if isinstance(part, str))
    match = _DRIVEBENCH.search(text)
    if match:
      score = overlap_score(match.group(1), match.group(2))
      return f"Token overlap: {score}\nTotal Score: {score}\nBrief Summary: lexical overlap only."
    match = _DRIVELM.search(text)
    if match:
      return str(overlap_score(match.group(1), match.group(2)))
    raise JudgeError("OverlapJudge reads only messages built from our rubrics or DriveLM's")


class LoopbackJudgeServer:
  """Serves `judge` as an OpenAI-compatible `/chat/completions` endpoint on 127.0.0.1.

  Example:
    with LoopbackJudgeServer(OverlapJudge()) as server:
      client = OpenAIChatJudge(server.url, "overlap")
  """

  def __init__(self, judge, *, port: int = 0):
    outer = self
    self.judge = judge
    self.requests = 0

    class Handler(BaseHTTPRequestHandler):
      def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if not self.path.endswith("/chat/completions") or not 0 < length <= _MAX_BODY_BYTES:
          return self._send(404 if length else 400, {"error": "POST a chat completion request"})
        try:
          body = json.loads(self.rfile.read(length))
          system, parts = _messages(body["messages"])
          temperature = float(body.get("temperature", 0.0))
        except (ValueError, KeyError, TypeError) as e:
          return self._send(400, {"error": f"bad request: {e}"})
        outer.requests += 1
        try:
          reply = outer.judge.chat(system, parts, temperature=temperature)
        except JudgeError as e:
          return self._send(422, {"error": str(e)})
        message = {"role": "assistant", "content": reply}
        self._send(
          200, {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}
        )

      def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      def log_message(self, *args):
        pass

    self._httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
    self._thread.start()
    self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

  def close(self) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()
    self._thread.join()

  def __enter__(self) -> LoopbackJudgeServer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _messages(messages) -> tuple[str, list[str]]:
  """(system text, user text parts) of an OpenAI chat request (image parts are dropped)."""
  system, parts = "", []
  for message in messages:
    content = message["content"]
    texts = (
      [content]
      if isinstance(content, str)
      else [c["text"] for c in content if c.get("type") == "text"]
    )
    if message["role"] == "system":
      system = "\n".join(texts)
    else:
      parts.extend(texts)
  return system, parts
