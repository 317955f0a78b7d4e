"""The scoring pipeline over one model's rollout, in the official order.

resolve dynamic answers -> judge image turns -> grid override (Geometric_Coloring) -> MCQ -> rows.

With an `OracleJudge` (the synthetic benchmark's exact ground truth, `imug_jax.judges.oracle`)
dynamic answers are resolved and every image turn is scored by the oracle (method "oracle"), in
place of both the chat judge and the grid override; nothing is cached since nothing is paid for.

Each turn's outcome is written to `question_<id>/scores/turn_<t>.json` (and the resolved dynamic
answer to `turn_<t>.dynamic.json`) next to result.json. A rerun keeps every judge result that
succeeded with the same judge and prompts for the same image, and calls the judge only for what is
missing or failed; the deterministic stages (grid, MCQ) are recomputed. Failed judge calls are
recorded with their error and counted, never turned into scores.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from imug_jax.data import release, schema
from imug_jax.judges.base import Judge
from imug_jax.judges.oracle import OracleJudge
from imug_jax.judges.prompts import PromptSet
from imug_jax.scoring import dynamic, grid, image_points, layout, mcq
from imug_jax.scoring.summary import TurnRow, class_name, image_percent


@dataclasses.dataclass(frozen=True)
class ScoringOptions:
  """How to score.

  Attributes:
    mcq_parser: "official" (parity, adjacent-capitals quirk) or "corrected".
    judge_retries: re-asks after an unparseable judge reply before recording a failure.
    missing_output: "zero" or "judge" for an image turn without an image (image_points).
    workers: parallel judge calls (threads); keep 1 for an in-process JAX judge.
    rescore: ignore stored judge results and ask again.
    grid_subdomains: Geometric_Coloring subdomains whose image turns the grid scorer replaces
      (where grid_gt has the turn); the official three by default.
  """

  mcq_parser: str = "official"
  judge_retries: int = 2
  missing_output: str = "zero"
  workers: int = 1
  rescore: bool = False
  grid_subdomains: tuple[str, ...] = grid.GRID_SUBDOMAINS


@dataclasses.dataclass
class ScoreResult:
  rows: list[TurnRow]
  records: list[dict]
  failures: list[dict]
  counts: dict


def score_model(
  model_dir: str | Path,
  files: release.Release,
  judge: Judge | OracleJudge,
  *,
  prompts: PromptSet | None = None,
  options: ScoringOptions = ScoringOptions(),
  model_name: str | None = None,
) -> ScoreResult:
  """Scores every sample of the release `files` that has a result.json under `model_dir`.

  Args:
    model_dir: `<out>/<model>`, the rollout in the official layout.
    files: the benchmark release (`imug_jax.data.release.load_release`).
    judge: any `Judge` (OpenAI-compatible client, smoke-test random judge, local model judge),
      or an `OracleJudge` for the synthetic benchmark.
    prompts: judge system prompts (ours by default, or the official files).
    options: see `ScoringOptions`.
    model_name: name in the rows (default: the folder name).

  Returns:
    ScoreResult: `rows` for the summary (successful turns only), every per-turn `record` as
    written to disk, the `failures`, and `counts` (samples, judge calls, reuses, overrides...).
  """
  model_dir = Path(model_dir)
  model_name = model_name or model_dir.name
  prompts = prompts or PromptSet.ours()
  mcq._check_parser(options.mcq_parser)
  counts = {"missing_samples": 0, "judge_calls_reused": 0, "grid_overrides": 0}
  work, invalid = [], []
  for sample in files.samples or ():
    try:
      result = layout.load_result(model_dir, sample.key)
    except ValueError as error:  # A broken result.json: report it, score the other samples.
      counts["invalid_results"] = counts.get("invalid_results", 0) + 1
      invalid.append(
        {
          **_sample_fields(model_name, sample),
          "method": "result",
          "error": str(error),
          "status": "failed",
          "turn": None,
        }
      )
      continue
    if result is None:
      counts["missing_samples"] += 1
      continue
    work.append((sample, result))

  fingerprint = {"judge": judge.name, "prompts": prompts.source}
  oracle = judge if isinstance(judge, OracleJudge) else None

  # 1. Dynamic answers.
  dynamic_jobs = []
  resolved: dict[tuple, dict] = {}
  for sample, _ in work:
    for task in sample.tasks:
      if task.modality != "text" or not task.is_dynamic:
        continue
      refs = files.dynamic_references.get((sample.key, task.turn))
      if refs is None:
        continue
      path = layout.score_path(model_dir, sample.key, task.turn, "dynamic")
      if oracle is not None:
        entry = oracle.dynamic_entry(sample.key, task.turn)
        image = layout.find_output_image(model_dir, sample.key, entry["image_turn"])
        record = {
          "raw_answer": task.answer,
          "reference_turns": sorted(refs),
          "status": "ok",
          "method": "oracle",
          "image_turn": entry["image_turn"],
          "answer": oracle.dynamic_answer(entry, image),
          **fingerprint,
        }
        layout.write_record(path, record)
        resolved[(sample.key, task.turn)] = record
        continue
      old = layout.read_record(path)
      if not options.rescore and old and old.get("status") == "ok" and _same(old, fingerprint):
        resolved[(sample.key, task.turn)] = old
        counts["judge_calls_reused"] += 1
        continue
      dynamic_jobs.append((sample, task, refs, path))

  def run_dynamic(job):
    sample, task, refs, path = job
    record = dynamic.resolve_turn(
      judge, prompts.dynamic, sample, task, refs, model_dir=model_dir, retries=options.judge_retries
    )
    record.update(fingerprint)
    layout.write_record(path, record)
    return (sample.key, task.turn), record

  for key, record in _map(run_dynamic, dynamic_jobs, options.workers):
    resolved[key] = record

  # 2. Image turns (judge), 3. grid override.
  image_jobs = []
  records: dict[tuple, dict] = {}
  for sample, result in work:
    gridded = sample.domain == grid.GRID_DOMAIN and sample.subdomain in options.grid_subdomains
    gt = files.grid_gt.get(sample.key, {}) if gridded else {}
    for task in sample.tasks:
      if task.modality != "image":
        continue
      base = _base_record(model_name, sample, task)
      target = layout.find_output_image(model_dir, sample.key, task.turn, result)
      if oracle is not None:
        records[(sample.key, task.turn)] = {
          **base,
          "method": "oracle",
          "status": "ok",
          "missing_output": target is None,
          **oracle.score_image(sample.key, task, target),
          **fingerprint,
        }
        continue
      if task.turn in gt and target is not None:
        scores, detection = grid.score_image(target, gt[task.turn], len(task.evaluation_points))
        records[(sample.key, task.turn)] = {
          **base,
          "method": "grid",
          "status": "ok",
          "detected": detection.matrix,
          "detection": detection.status,
          "truth": [list(r) for r in gt[task.turn]],
          "points": [{"point_id": p, "score": s} for p, s in scores],
        }
        counts["grid_overrides"] += 1
        continue
      digest = _digest(target)
      path = layout.score_path(model_dir, sample.key, task.turn)
      old = layout.read_record(path)
      if (
        not options.rescore
        and old
        and old.get("status") == "ok"
        and old.get("method") == "judge"
        and _same(old, fingerprint)
        and old.get("target_sha1") == digest
      ):
        records[(sample.key, task.turn)] = old
        counts["judge_calls_reused"] += 1
        continue
      refs = files.image_references.get(sample.key, {}).get(task.turn, ())
      image_jobs.append((sample, result, task, refs, base, digest))

  def run_image(job):
    sample, result, task, refs, base, digest = job
    outcome = image_points.score_turn(
      judge,
      prompts.image,
      sample,
      task,
      refs,
      model_dir=model_dir,
      images_dir=files.images_dir,
      result=result,
      retries=options.judge_retries,
      missing_output=options.missing_output,
    )
    return (sample.key, task.turn), {**base, **outcome, **fingerprint, "target_sha1": digest}

  for key, record in _map(run_image, image_jobs, options.workers):
    records[key] = record

  # 4. MCQ.
  counts["missing_dynamic"] = 0
  for sample, result in work:
    responses = {t.turn: t.model_response for t in result.tasks}
    for task in sample.tasks:
      if task.modality != "text":
        continue
      base = _base_record(model_name, sample, task)
      answer = task.answer
      if task.is_dynamic:
        entry = resolved.get((sample.key, task.turn))
        if entry is None or entry.get("status") != "ok":
          counts["missing_dynamic"] += 1
          error = entry.get("error") if entry else "no dynamic_references entry for this turn"
          records[(sample.key, task.turn)] = {
            **base,
            "method": "mcq",
            "status": "failed",
            "error": f"dynamic answer: {error}",
          }
          continue
        answer = entry["answer"]
      response = responses.get(task.turn) or ""
      value = mcq.score(answer, response, parser=options.mcq_parser)
      records[(sample.key, task.turn)] = {
        **base,
        "method": "mcq",
        "status": "ok",
        "parser": options.mcq_parser,
        "answer": answer,
        "raw_answer": task.answer,
        "response": response,
        "mcq": value,
      }

  rows, failures, ordered = [], list(invalid), []
  for sample, _ in work:
    for task in sample.tasks:
      record = records.get((sample.key, task.turn))
      if record is None:
        continue
      if record["status"] == "ok":
        if record["method"] == "mcq":
          record["score"] = record["mcq"] * 100
        elif record["points"]:
          record["score"] = image_percent([p["score"] for p in record["points"]])
        else:
          record["status"], record["error"] = "failed", "no point scores"
      if record["status"] == "ok":
        rows.append(
          TurnRow(
            model=model_name,
            domain=sample.domain,
            subdomain=sample.subdomain,
            sample_id=sample.sample_id,
            turn=task.turn,
            modality=task.modality,
            score=record["score"],
            klass=record["class"],
          )
        )
      else:
        failures.append(record)
      layout.write_record(layout.score_path(model_dir, sample.key, task.turn), record)
      ordered.append(record)
  counts.update(
    samples=len(work),
    turns_scored=len(rows),
    failures=len(failures),
    judge_calls=len(dynamic_jobs) + len(image_jobs),
  )
  if failures:
    logging.warning("%s: %d turn(s) could not be scored", model_name, len(failures))
  return ScoreResult(rows=rows, records=ordered, failures=failures, counts=counts)


def _sample_fields(model: str, sample: schema.Sample) -> dict:
  return {
    "model": model,
    "domain": sample.domain,
    "subdomain": sample.subdomain,
    "sample_id": sample.sample_id,
    "class": class_name(sample.domain),
  }


def _base_record(model: str, sample: schema.Sample, task: schema.Turn) -> dict:
  return {**_sample_fields(model, sample), "turn": task.turn, "modality": task.modality}


def _same(record: dict, fingerprint: dict) -> bool:
  return all(record.get(k) == v for k, v in fingerprint.items())


def _digest(path: Path | None) -> str | None:
  return None if path is None else hashlib.sha1(path.read_bytes()).hexdigest()


def _map(function: Callable, jobs: list, workers: int):
  if workers <= 1 or len(jobs) <= 1:
    yield from map(function, jobs)
    return
  with ThreadPoolExecutor(max_workers=workers) as pool:
    yield from pool.map(function, jobs)
