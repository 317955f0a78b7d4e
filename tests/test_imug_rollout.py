"""IMUG rollout: official layout, own/reference history, errors, resume after a kill, demo run."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from imug_jax import run as run_lib
from imug_jax.data import synthetic
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol
from imug_jax.models.protocol import ModelError, Response
from imug_jax.rollout import history, runner
from imug_jax.scoring import layout

ROOT = Path(__file__).resolve().parents[1]


class FakeModel:
  """Deterministic: text turns answer "A"; image turns draw a grey square; "fail" turns raise."""

  name = "fake"

  def __init__(self, fail_substring: str | None = None):
    self.calls = []
    self.fail_substring = fail_substring
    self.lock = threading.Lock()

  def respond(self, history, output_mode, temperature, rng=None):
    with self.lock:
      self.calls.append((json.loads(json.dumps(history)), output_mode, temperature))
    question = history[-1]["content"][0]["text"]
    if self.fail_substring and self.fail_substring in question:
      raise ModelError("refused")
    if output_mode == "image_only":
      return Response(image=itok.png_bytes(np.full((16, 16, 3), len(history), np.uint8)))
    return Response(text="A")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
  return synthetic.write_synthetic(tmp_path_factory.mktemp("bench"), num_samples=8, seed=5)


def test_rollout_writes_the_official_layout_with_own_history(bench, tmp_path):
  model = FakeModel(fail_substring="How many blocks are in the stack")
  summary = runner.run_rollout(
    model, bench.samples, images_dir=bench.images_dir, out_dir=tmp_path, progress=False
  )
  assert (summary.done, summary.skipped, summary.failed) == (8, 0, 0)
  assert summary.turns == sum(len(s.tasks) for s in bench.samples)
  errors = 0
  for sample in bench.samples:
    folder = tmp_path / "fake" / sample.domain / sample.subdomain / f"question_{sample.sample_id}"
    raw = json.loads((folder / "result.json").read_text())
    assert {k: v for k, v in raw.items() if k != "tasks"} == {
      k: v for k, v in sample.to_json().items() if k != "tasks"
    }
    result = layout.load_result(tmp_path / "fake", sample.key)  # What the scorers read.
    for task, done in zip(sample.tasks, result.tasks):
      assert done.to_json() | {"model_response": None} == task.to_json() | {"model_response": None}
      if done.model_response.startswith("ERROR:"):
        errors += 1
        assert "refused" in done.model_response
      elif task.modality == "image":
        assert done.model_response == f"turn_{task.turn}_output.png"
        assert layout.find_output_image(tmp_path / "fake", sample.key, task.turn) == (
          folder / done.model_response
        )
        assert (folder / done.model_response).read_bytes().startswith(runner.PNG_MAGIC)
      else:
        assert done.model_response == "A"
  assert errors == summary.error_turns > 0
  # The histories the model saw: system prompt, user turns with images, its own answers.
  calls = [
    c for c in model.calls if c[0][1]["content"][0]["text"] == bench.samples[0].tasks[0].instruction
  ]
  sample = bench.samples[0]
  last_history, _, temperature = max(calls, key=lambda c: len(c[0]))
  assert temperature == 0.7
  assert [m["role"] for m in last_history] == ["system"] + ["user", "assistant"] * (
    len(sample.tasks) - 1
  ) + ["user"]
  assert last_history[0]["content"] == [protocol.text_item(sample.system_prompt)]
  folder = layout.question_dir(tmp_path / "fake", sample.key)
  for index, task in enumerate(sample.tasks[:-1]):
    assistant = last_history[2 + 2 * index]["content"]
    if task.modality == "image":
      assert assistant == [
        protocol.image_item((folder / f"turn_{task.turn}_output.png").read_bytes())
      ]
    else:
      assert assistant == [protocol.text_item("A")]
  modes = [mode for h, mode, _ in model.calls if h[1] == last_history[1]]
  assert modes == [t.output_mode for t in sample.tasks]
  # The failed turn's assistant message is "Error", as in the official client.
  failed = [
    h
    for h, _, _ in model.calls
    if h[-1]["content"][0]["text"].startswith("How many blocks are in the stack")
  ]
  later = [
    h
    for h, _, _ in model.calls
    if any(
      m["content"][0].get("text", "").startswith("How many blocks are in the stack") for m in h[:-1]
    )
  ]
  assert failed and later
  for h in later:
    at = next(
      i
      for i, m in enumerate(h)
      if m["content"][0].get("text", "").startswith("How many blocks are in the stack")
    )
    assert h[at + 1]["content"] == [protocol.text_item("Error")]


def test_rerun_skips_finished_samples_and_force_redoes_them(bench, tmp_path):
  runner.run_rollout(
    FakeModel(), bench.samples, images_dir=bench.images_dir, out_dir=tmp_path, progress=False
  )
  again = FakeModel()
  summary = runner.run_rollout(
    again, bench.samples, images_dir=bench.images_dir, out_dir=tmp_path, progress=False
  )
  assert (summary.done, summary.skipped, again.calls) == (0, 8, [])
  forced = FakeModel()
  summary = runner.run_rollout(
    forced,
    bench.samples,
    images_dir=bench.images_dir,
    out_dir=tmp_path,
    force=True,
    concurrency=4,
    progress=False,
  )
  assert summary.done == 8 and len(forced.calls) == summary.turns


def test_reference_history_replaces_earlier_images(bench, tmp_path):
  truth = synthetic.ground_truth_images(bench.data_dir)
  model = FakeModel()
  source = history.ReferenceHistory(truth)
  assert source.missing(bench.samples) == []
  runner.run_rollout(
    model,
    bench.samples,
    images_dir=bench.images_dir,
    out_dir=tmp_path,
    model_name="fake__refhist",
    history_source=source,
    progress=False,
  )
  checked = 0
  for h, _, _ in model.calls:
    for message in h:
      if message["role"] != "assistant":
        continue
      item = message["content"][0]
      if item["type"] == "image":
        assert protocol.decode_image(item["image"]) in {p.read_bytes() for p in truth.values()}
        checked += 1
      else:
        assert item["text"] == "A"
  assert checked > 0
  # Another run's outputs can be the reference too; a missing reference fails only that sample.
  own = history.outputs_of_run(tmp_path / "fake__refhist", bench.samples)
  assert set(own) == set(truth)
  dropped = dict(own)
  first = sorted(dropped, key=str)[0]
  del dropped[first]
  summary = runner.run_rollout(
    FakeModel(),
    bench.samples,
    images_dir=bench.images_dir,
    out_dir=tmp_path,
    model_name="partial",
    history_source=history.ReferenceHistory(dropped),
    progress=False,
  )
  sample_turns = [t for s in bench.samples if s.key == first[0] for t in s.tasks]
  needs_it = any(t.turn > first[1] for t in sample_turns)
  assert summary.failed == int(needs_it)
  assert (layout.question_dir(tmp_path / "partial", first[0]) / "result.json").exists() == (
    not needs_it
  )


KILLED_RUN = textwrap.dedent("""
    import sys, time
    import numpy as np
    from imug_jax.data import release
    from imug_jax.models import image_tokenizer as itok
    from imug_jax.models.protocol import Response
    from imug_jax.rollout import runner

    class Slow:
      name = "slow"
      def respond(self, history, output_mode, temperature, rng=None):
        time.sleep(0.05)
        if output_mode == "image_only":
          return Response(image=itok.png_bytes(np.zeros((64, 64, 3), np.uint8)))
        return Response(text="B")

    bench = release.load_release(sys.argv[1])
    runner.run_rollout(Slow(), bench.samples, images_dir=bench.images_dir, out_dir=sys.argv[2],
                       progress=False)
""")


def test_killed_rollout_resumes_without_losing_or_duplicating(bench, tmp_path):
  process = subprocess.Popen(
    [sys.executable, "-c", KILLED_RUN, str(bench.data_dir), str(tmp_path)],
    cwd=ROOT,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  model_dir = tmp_path / "slow"
  deadline = time.monotonic() + 60
  while len(list(model_dir.rglob("result.json"))) < 3:
    assert process.poll() is None, "the rollout ended before it could be killed"
    assert time.monotonic() < deadline
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  before = {p: p.stat().st_mtime_ns for p in model_dir.rglob("result.json")}
  assert 3 <= len(before) < len(bench.samples)
  for path in before:  # Whatever the kill interrupted, no result.json is partial.
    json.loads(path.read_text())
  resumed = FakeModel()
  resumed.name = "slow"
  summary = runner.run_rollout(
    resumed, bench.samples, images_dir=bench.images_dir, out_dir=tmp_path, progress=False
  )
  assert summary.skipped == len(before)
  assert summary.done == len(bench.samples) - len(before)
  # Nothing lost: every sample complete, once; nothing duplicated: finished ones untouched.
  results = sorted(model_dir.rglob("result.json"))
  assert len(results) == len(bench.samples)
  assert {p: p.stat().st_mtime_ns for p in before} == before
  assert not list(model_dir.rglob("*.tmp"))  # Interrupted writes were cleaned up on redo.
  todo = [
    s for s in bench.samples if layout.question_dir(model_dir, s.key) / "result.json" not in before
  ]
  assert len(resumed.calls) == sum(len(s.tasks) for s in todo)
  assert all(runner.is_complete(model_dir, s) for s in bench.samples)


@pytest.mark.slow
def test_demo_config_runs_end_to_end(tmp_path):
  spec = importlib.util.spec_from_file_location("demo", ROOT / "configs" / "imug" / "demo.py")
  demo = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(demo)
  config = demo.get_config()
  config.data.num_samples = 4
  config.data.train_samples = 4
  config.model.train.steps = 2
  config.model.tiny.chunk_buckets = (256,)
  config.rollout.progress = False
  config.tts.strategies = ("cot",)
  summary = run_lib.run(config, str(tmp_path))
  assert set(summary["runs"]) == {"tiny_umm", "tiny_umm__refhist"}
  for name, counts in summary["runs"].items():
    assert counts["done"] == 4 and counts["failed"] == 0, (name, counts)
    results = list((tmp_path / "outputs" / "model_outputs" / name).rglob("result.json"))
    assert len(results) == 4
  report = summary.pop("report")
  assert json.loads((tmp_path / "outputs" / "rollout_summary.json").read_text()) == summary
  assert report["runs"]["references"] == {"tiny_umm": "tiny_umm__refhist"}
  assert set(report["models"]) == {"tiny_umm", "tiny_umm__refhist", "tiny_umm+cot"}
  assert report["scoring"]["judge"] == "oracle" and set(report["tts"]) == {"tiny_umm+cot"}
  assert (tmp_path / "report" / "summary.json").is_file()
  assert len(summary["train_losses"]) == 2 and all(np.isfinite(summary["train_losses"]))
  # A second run resumes: nothing to do.
  again = run_lib.run(config, str(tmp_path))
  assert all(c["skipped"] == 4 and c["done"] == 0 for c in again["runs"].values())
