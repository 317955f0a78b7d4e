"""Exposure-bias statistics, the report (summary.json, markdown, PNG plots) and run pairing."""

import dataclasses
import io
import json
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from imug_jax import report
from imug_jax.data import synthetic
from imug_jax.models.protocol import Response
from imug_jax.rollout import runner
from imug_jax.scoring import exposure, layout
from imug_jax.scoring.summary import TurnRow


def rows_with_trend(model, slope, *, samples=30, turns=(1, 2, 3, 4), noise=4.0, seed=0):
  gen = np.random.default_rng(seed)
  rows = []
  for s in range(samples):
    for domain in ("Apparel", "Botany"):
      for t in turns:
        score = float(np.clip(80 + slope * (t - 1) + gen.normal(0, noise), 0, 100))
        rows.append(TurnRow(model, domain, "sub", str(s), t, "image", score))
  return rows


def test_slope_drop_and_gap_recover_a_known_trend():
  own = rows_with_trend("m", -6.0)
  ref = rows_with_trend("m__refhist", -1.0, seed=1)
  result = exposure.analyse(own, ref, num_boot=300)
  overall = result["groups"]["overall"]
  assert overall["slope"]["value"] == pytest.approx(-6.0, abs=0.6)
  assert overall["slope"]["low"] < overall["slope"]["value"] < overall["slope"]["high"]
  assert overall["slope"]["high"] < 0
  assert overall["drop_first_to_last"]["value"] == pytest.approx(18.0, abs=2.0)
  assert set(result["groups"]) == {"overall", "Static Spatial", "Temporal Causal"}
  turn_one = overall["by_turn"][1]
  assert turn_one["count"] == 60 and turn_one["mean"]["low"] < turn_one["mean"]["value"]
  gap = result["gap"]["overall"]
  assert gap["by_turn"][1]["value"] == pytest.approx(0.0, abs=2.5)
  assert gap["by_turn"][4]["value"] == pytest.approx(-15.0, abs=3.0)
  assert gap["by_turn"][4]["high"] < 0
  assert gap["slope_difference"] == pytest.approx(-5.0, abs=0.8)


def test_gap_is_paired_when_both_runs_hold_the_same_turns():
  own = rows_with_trend("m", -6.0, samples=10)
  same = [dataclasses.replace(r, model="m__refhist") for r in own]
  shifted = [dataclasses.replace(r, score=r.score - 3.0) for r in same]
  for reference, expected in ((same, 0.0), (shifted, 3.0)):
    gap = exposure.analyse(own, reference, num_boot=200)["gap"]["overall"]["by_turn"]
    for turn in (1, 2, 3, 4):  # Identical partners: no sampling noise in the difference.
      assert gap[turn] == pytest.approx({"value": expected, "low": expected, "high": expected})
  unpaired = exposure.analyse(own, same[: len(same) // 2], num_boot=200)["gap"]["overall"]
  assert unpaired["by_turn"][1]["low"] < unpaired["by_turn"][1]["high"]  # independent draws


def test_exposure_ignores_text_rows_and_single_turns():
  rows = [
    TurnRow("m", "Apparel", "s", "1", 1, "image", 50.0),
    TurnRow("m", "Apparel", "s", "1", 2, "text", 0.0),
  ]
  result = exposure.analyse(rows, num_boot=50)
  assert result["groups"]["overall"]["slope"]["value"] is None
  assert result["groups"]["overall"]["by_turn"][1]["mean"]["value"] == 50.0
  assert "gap" not in result


def test_run_pairing():
  baselines, refs, tts = report.pair_runs(["m", "m__refhist", "m+cot", "x+verify", "n"])
  assert baselines == ["m", "x+verify", "n"] and refs == {"m": "m__refhist"}
  assert tts == {"m+cot": "m"}


def copy_run(bench, root, name, *, corrupt_from_turn=None):
  """A rollout whose images are the ground truth (optionally noise from some turn on)."""
  truth = synthetic.ground_truth_images(bench.data_dir)
  for sample in bench.samples:
    folder = layout.question_dir(root / name, sample.key)
    folder.mkdir(parents=True)
    responses = {}
    for task in sample.tasks:
      if task.modality == "image":
        data = truth[(sample.key, task.turn)].read_bytes()
        if corrupt_from_turn is not None and task.turn >= corrupt_from_turn:
          noise = np.random.default_rng(task.turn).integers(0, 255, (96, 96, 3), np.uint8)
          path = folder / f"turn_{task.turn}_output.png"
          Image.fromarray(noise).save(path)
        else:
          (folder / f"turn_{task.turn}_output.png").write_bytes(data)
        responses[task.turn] = f"turn_{task.turn}_output.png"
      else:
        responses[task.turn] = "A" if task.is_dynamic else task.answer
    (folder / "result.json").write_text(json.dumps(sample.with_responses(responses).to_json()))


def test_score_and_report_writes_everything(tmp_path):
  bench = synthetic.write_synthetic(tmp_path / "bench", 12, seed=3)
  out = tmp_path / "outputs" / "model_outputs"
  copy_run(bench, out, "m", corrupt_from_turn=3)
  copy_run(bench, out, "m__refhist")
  copy_run(bench, out, "m+cot", corrupt_from_turn=3)
  (out / "empty_folder").mkdir()
  payload = report.score_and_report(
    out, bench.data_dir, "random:7", num_boot=100, print_tables=False
  )
  report_dir = tmp_path / "outputs" / "report"
  assert payload["runs"] == {
    "baselines": ["m"],
    "references": {"m": "m__refhist"},
    "tts": {"m+cot": "m"},
  }
  on_disk = json.loads((report_dir / "summary.json").read_text())
  assert on_disk["score_unit"] == "percentage" and set(on_disk["models"]) == {
    "m",
    "m__refhist",
    "m+cot",
  }
  # The summary's overall is the micro-mean of the per-turn records' scores, rounded to 2.
  records = [json.loads(line) for line in (report_dir / "scores" / "m.jsonl").open()]
  scored = [r for r in records if r["status"] == "ok"]
  assert {r["modality"] for r in scored} == {"text", "image"}
  for modality in ("all", "text", "image"):
    scores = [r["score"] for r in scored if modality in ("all", r["modality"])]
    expected = {"mean": round(float(np.mean(scores)), 2), "count": len(scores)}
    assert on_disk["models"]["m"]["overall"][modality] == expected, modality
  assert (
    payload["scoring"]["mcq_parser"] == "official" and payload["scoring"]["judge"] == "random:7"
  )
  # Same random judge and identical images: the copy scores exactly as the baseline.
  assert payload["tts"]["m+cot"]["overall"]["gain"] == 0.0
  for name in ("score_by_turn_m.png", "own_vs_reference_m.png", "tts_gains.png"):
    with Image.open(report_dir / name) as image:
      assert image.format == "PNG" and image.size == (720, 440)
  text = (report_dir / "report.md").read_text()
  for fragment in (
    "# IMUG-Bench report",
    "MCQ parser: **official**",
    "## Exposure bias",
    "own - reference",
    "## Test-time scaling",
    "![TTS gains](tts_gains.png)",
  ):
    assert fragment in text
  assert "| Overall |" in (report_dir / "summary.md").read_text()
  # A rerun reuses every judge result.
  again = report.score_and_report(out, bench.data_dir, "random:7", num_boot=100, print_tables=False)
  assert all(c["judge_calls"] == 0 for c in again["counts"].values())
  assert again["models"] == payload["models"]
  shutil.rmtree(out)
  with pytest.raises(FileNotFoundError, match="no run folders"):
    report.score_and_report(out, bench.data_dir, "random", print_tables=False)


class SolidModel:
  """Paints a solid canvas whose colour comes from the key; answers "A"."""

  name = "solid"

  def respond(self, history, output_mode, temperature, rng=None):
    if output_mode == "text_only":
      return Response(text="A")
    value = int(jax.random.randint(rng, (), 0, 255))
    buffer = io.BytesIO()
    Image.fromarray(np.full((96, 96, 3), value, np.uint8)).save(buffer, format="PNG")
    return Response(image=buffer.getvalue())


def test_run_from_config_rolls_out_tts_and_reports(tmp_path):
  bench = synthetic.write_synthetic(tmp_path / "benchmark", 4, seed=1)
  model = SolidModel()
  out = tmp_path / "outputs" / "model_outputs"
  runner.run_rollout(model, bench.samples, images_dir=bench.images_dir, out_dir=out, progress=False)
  config = ml_collections.ConfigDict(
    {
      "data": {"max_samples": 0},
      "rollout": {"temperature": 0.7, "seed": 0, "force": False, "progress": False},
      "scoring": {"judge": "oracle", "mcq_parser": "corrected", "num_boot": 50},
      "tts": {"strategies": ["cot", "verify", "bon"], "rounds": 1, "n": 2, "verifier": "self"},
    }
  )
  payload = report.run_from_config(config, tmp_path, model, bench)
  assert set(payload["tts"]) == {"solid+cot", "solid+verify", "solid+bon2-self"}
  assert payload["scoring"]["mcq_parser"] == "corrected" and payload["scoring"]["judge"] == "oracle"
  assert payload["scoring"]["grid_subdomains"] == []  # the oracle scores the grids too
  # The oracle knows the ground truth: no model may consult it, nor may a config pick noise.
  config.tts.verifier = "judge"
  with pytest.raises(ValueError, match="oracle judge knows the ground truth"):
    report.run_from_config(config, tmp_path, model, bench)
  config.scoring.judge = "random"
  with pytest.raises(ValueError, match="must be 'oracle', 'openai' or 'local'"):
    report.run_from_config(config, tmp_path, model, bench)
  assert (tmp_path / "report" / "report.md").exists()
  assert all(payload["counts"][run]["samples"] == 4 for run in payload["counts"])
