"""The oracle judge: exact scores against the synthetic ground truth, alone and in the pipeline."""

import json

import numpy as np
import pytest

from imug_jax.data import synthetic
from imug_jax.data.schema import SampleKey, Turn
from imug_jax.judges.oracle import OracleJudge, patch_match
from imug_jax.models import image_tokenizer as itok
from imug_jax.scoring import layout, pipeline

GRID = [["1", "0", "r"], ["0", "g", "0"], ["1", "1", "0"]]


def _png(tmp_path, name, tokens):
  path = tmp_path / name
  path.write_bytes(itok.png_bytes(synthetic.TOKENIZER.decode(tokens)))
  return path


def _one_grid_benchmark(tmp_path):
  """A hand-made benchmark folder: one sample, one image turn whose target is GRID."""
  key = SampleKey("Geometric_Coloring", "grid_coloring", "1")
  (tmp_path / synthetic.GROUND_TRUTH).mkdir()
  _png(
    tmp_path / synthetic.GROUND_TRUTH,
    synthetic.ground_truth_name(key, 1),
    synthetic.draw_grid(GRID),
  )
  (tmp_path / synthetic.META).write_text(
    json.dumps({"domain": key.domain, "subdomain": key.subdomain, "sample_id": "1", "dynamic": []})
  )
  task = Turn(turn=1, modality="image", inputs=(), evaluation_points=("grid", "cells", "red"))
  return key, task


def test_patch_match_counts_foreground_patches_only():
  white = synthetic.TOKENIZER.token("white")
  target = np.full((4, 4), white)
  target[0, :2] = synthetic.TOKENIZER.token("red")
  candidate = target.copy()
  assert patch_match(target, candidate) == 1.0
  candidate[0, 1] = synthetic.TOKENIZER.token("blue")  # 1 of the 2 foreground patches wrong
  assert patch_match(target, candidate) == 0.5
  candidate[3, 3] = synthetic.TOKENIZER.token("red", itok.EDGE_TOP)  # a stray mark: 1 of 3 right
  assert patch_match(target, candidate) == pytest.approx(1 / 3)
  assert patch_match(np.full((4, 4), white), np.full((4, 4), white)) == 1.0
  with pytest.raises(ValueError, match="shape"):
    patch_match(target, candidate[:2])


def test_oracle_scores_hand_made_grids(tmp_path):
  key, task = _one_grid_benchmark(tmp_path)
  oracle = OracleJudge(tmp_path)
  exact = oracle.score_image(key, task, _png(tmp_path, "exact.png", synthetic.draw_grid(GRID)))
  assert exact["match"] == 1.0
  assert [p["score"] for p in exact["points"]] == [5.0, 5.0, 5.0]
  wrong_cell = [row[:] for row in GRID]
  wrong_cell[0][2] = "g"  # The red cell painted green: its 4 inner patches are wrong.
  one_wrong = oracle.score_image(
    key, task, _png(tmp_path, "one.png", synthetic.draw_grid(wrong_cell))
  )
  foreground = int((synthetic.draw_grid(GRID) != synthetic.TOKENIZER.token("white")).sum())
  assert one_wrong["match"] == pytest.approx(1 - 4 / foreground, abs=1e-4)
  assert 4.0 < one_wrong["points"][0]["score"] < 5.0
  emptied = [row[:] for row in GRID]
  emptied[1][1] = emptied[2][0] = "0"
  two_wrong = oracle.score_image(key, task, _png(tmp_path, "two.png", synthetic.draw_grid(emptied)))
  assert two_wrong["match"] < one_wrong["match"]
  blank = oracle.score_image(key, task, _png(tmp_path, "blank.png", synthetic.draw_canvas("white")))
  assert blank["match"] == 0.0 and blank["points"][0]["score"] == 0.0
  missing = oracle.score_image(key, task, None)
  assert missing["match"] == 0.0 and missing["points"][0]["reason"] == "no image output"
  with pytest.raises(KeyError, match="no ground-truth image"):
    oracle.match(key, 2, None)
  with pytest.raises(FileNotFoundError, match="only the synthetic benchmark"):
    OracleJudge(tmp_path / "elsewhere")


def _write_run(bench, run_dir, image_for):
  """A rollout folder whose image turn t holds `image_for(sample, t)` and whose text turns
  answer the ground truth."""
  truth = synthetic.ground_truth_images(bench.data_dir)
  meta = synthetic.load_meta(bench.data_dir)
  for sample in bench.samples:
    folder = layout.question_dir(run_dir, sample.key)
    folder.mkdir(parents=True)
    responses = {}
    for task in sample.tasks:
      if task.modality == "image":
        name = f"turn_{task.turn}_output.png"
        (folder / name).write_bytes(image_for(sample, task.turn))
        responses[task.turn] = name
      else:
        responses[task.turn] = synthetic.ground_truth_answer(sample.key, task, truth, meta)
    (folder / "result.json").write_text(json.dumps(sample.with_responses(responses).to_json()))


def test_pipeline_with_the_oracle_scores_the_ground_truth_in_full(tmp_path):
  bench = synthetic.write_synthetic(tmp_path / "bench", 8, seed=5)
  truth = synthetic.ground_truth_images(bench.data_dir)
  out = tmp_path / "outputs"
  _write_run(bench, out / "perfect", lambda s, t: truth[(s.key, t)].read_bytes())
  blank = itok.png_bytes(synthetic.TOKENIZER.decode(synthetic.draw_canvas("white")))
  _write_run(bench, out / "blank", lambda s, t: blank)
  oracle = OracleJudge(bench.data_dir)
  options = pipeline.ScoringOptions(mcq_parser="corrected")
  perfect = pipeline.score_model(out / "perfect", bench, oracle, options=options)
  assert perfect.counts["failures"] == 0 and perfect.counts["judge_calls"] == 0
  images = [r for r in perfect.rows if r.modality == "image"]
  assert images and all(r.score == pytest.approx(100.0) for r in images)
  # Dynamic answers measured on the model's (here: the true) images: the gold replies score 100.
  texts = [r for r in perfect.rows if r.modality == "text"]
  assert texts and all(r.score == pytest.approx(100.0) for r in texts)
  empty = pipeline.score_model(out / "blank", bench, oracle, options=options)
  assert all(r.score == 0.0 for r in empty.rows if r.modality == "image")
  records = [r for r in empty.records if r["method"] == "oracle" and r["modality"] == "image"]
  assert records and all(r["judge"] == "oracle" for r in records)
