"""Task "drivekd.eval" end to end on its embedded default, shrunk: synthetic DriveBench files, a
random tiny InternVL, the loopback overlap judge; then a relaunch that resumes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from drivekd_jax.eval import answers as answers_lib
from drivekd_jax.tasks import eval_drivebench

REPO = Path(__file__).resolve().parents[1]


def _config(**overrides):
  spec = importlib.util.spec_from_file_location(
    "eval_drivebench_config", REPO / "configs/drivekd/eval_drivebench.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.synthetic.num_train_frames = 2
  config.data.synthetic.num_test_frames = 1
  config.settings = "clean,fog"
  config.max_new_tokens = 4
  config.max_items = 5
  config.efficiency.new_tokens = 2
  config.efficiency.presets = "tiny"
  config.efficiency.dtype = "float32"
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_eval_task_scores_reports_and_resumes(tmp_path):
  result = eval_drivebench.run(_config(), str(tmp_path))
  assert set(result["scores"]) == {"clean", "fog"}
  for setting in ("clean", "fog"):
    scores = json.loads((tmp_path / "drivebench" / setting / "scores.json").read_text())
    assert scores["setting"] == setting and scores["items"] == 5
    assert scores["judge"]["scored"] + scores["judge"]["failed"] == 5
    assert scores["judge"]["name"] == "openai:overlap"
    for key in ("perception", "reasoning", "planning", "average", "accuracy", "language"):
      assert key in scores
    lines = answers_lib.read_jsonl(answers_lib.answers_path(tmp_path, setting))
    assert len(lines) == 5 and all("pred" in line and "question" in line for line in lines)
  report = (tmp_path / "drivebench" / "report.md").read_text()
  assert "random tiny" in report and (tmp_path / "drivebench" / "settings.png").is_file()
  assert "| tiny (random init, text prompt) | - | - | - | - | - |" in report  # efficiency only
  summary = json.loads((tmp_path / "drivebench" / "summary.json").read_text())
  assert set(summary["settings"]) == {"clean", "fog"}
  assert json.loads((tmp_path / "drivebench" / "efficiency.json").read_text())["tokens_per_s"] > 0

  # A relaunch answers nothing again and asks the judge nothing new (replayed from its cache).
  before = {
    s: (tmp_path / "drivebench" / s / "answers.jsonl").read_bytes() for s in ("clean", "fog")
  }
  again = eval_drivebench.run(_config(), str(tmp_path))
  for setting, content in before.items():
    assert (tmp_path / "drivebench" / setting / "answers.jsonl").read_bytes() == content
  assert again["scores"]["clean"]["average"] == result["scores"]["clean"]["average"]


def test_eval_task_refuses_an_empty_setting_list(tmp_path):
  with pytest.raises(ValueError, match="config.settings is empty"):
    eval_drivebench.run(_config(settings=" , "), str(tmp_path))
