"""Task "drivekd.eval": DriveBench answers, judged scores, efficiency and the Table-1 report.

    python launch.py --config=configs/drivekd/eval_drivebench.py --workdir=DIR

For the model of `model.checkpoint` (a local HF-format InternVL directory, or a training workdir
whose latest student checkpoint is used; empty: a random-init `model.preset`, to try the
pipeline): every setting of `settings` (clean, no_image, the 15 corruptions) is answered
(`eval.drivebench_answers`, resumable), scored (`eval.drivebench`: both accuracy parsers, the
judged rubric scores, language metrics, perception / reasoning / planning), measured
(`eval.efficiency`) and reported (`eval.report`: `<workdir>/drivebench/report.md`, PNG). The
judge is any OpenAI-compatible server (`judge.base_url`, key from the environment variable
`judge.api_key_env`) or, with `judge.base_url="local"`, a deterministic word-overlap judge served
on loopback. DriveBench files come from `data.drivebench_dir`; empty: synthetic DriveBench-format
files written into the workdir.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import ExitStack
from typing import Any

import jax
import numpy as np
from absl import logging

from drivekd_jax.data import sources
from drivekd_jax.data.processor import Processor
from drivekd_jax.data.tokenizer import Tokenizer
from drivekd_jax.eval import answers as answers_lib
from drivekd_jax.eval import drivebench, efficiency, local_judge, report
from drivekd_jax.eval import drivebench_answers as inference
from drivekd_jax.eval.judge_client import OpenAIChatJudge
from drivekd_jax.models import from_pretrained, sampling
from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import experiment as experiment_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.settings import ModelEntry, RunSettings


@dataclasses.dataclass
class LoadedModel:
  name: str
  model: Any
  tokenizer: Tokenizer
  note: str


def _is_training_workdir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(
    os.path.join(path, "checkpoints")
  )


def load_model(config: Any, workdir: str, tokenizer: Tokenizer | None, mesh, rules) -> LoadedModel:
  """The evaluated model: an HF-format directory, a training workdir's student, or a preset."""
  entry = config.model
  path = os.path.abspath(entry.checkpoint) if entry.checkpoint else ""
  sharding = sharding_lib.pretrained_sharding(mesh, rules)
  if path and _is_training_workdir(path):
    with open(os.path.join(path, "config.json")) as f:
      settings = RunSettings.from_config(json.load(f))
    tokenizer_path = settings.data.tokenizer or os.path.join(path, "data", "tokenizer")
    tokenizer = Tokenizer.from_path(tokenizer_path)
    student, _ = experiment_lib.build_model(settings.student, tokenizer, mesh, rules, 0)
    model, step = experiment_lib.restore_student(
      settings, student, os.path.join(path, "checkpoints")
    )
    name = entry.name or f"student of {os.path.basename(path)} (step {step})"
    return LoadedModel(name, model, tokenizer, f"training workdir {path}, checkpoint step {step}")
  if path:
    tokenizer = Tokenizer.from_path(entry.tokenizer or path)
    # An InternVL checkpoint in the original layout leaves `<IMG_CONTEXT>` to the tokenizer;
    # Qwen2.5-VL checkpoints carry their `<|image_pad|>` id.
    internvl = "internvl" in _architecture(path).lower()
    model = from_pretrained(
      path,
      dtype=entry.dtype,
      sharding=sharding,
      image_token_id=tokenizer.img_context_id if internvl else None,
    )
    return LoadedModel(entry.name or os.path.basename(path), model, tokenizer, f"checkpoint {path}")
  if tokenizer is None:
    raise ValueError("model.checkpoint is empty: a random model needs the synthetic data's BPE")
  preset = ModelEntry(preset=entry.preset, dtype=entry.dtype)
  model, _ = experiment_lib.build_model(preset, tokenizer, mesh, rules, int(config.seed))
  note = f"random init of preset {entry.preset!r}: scores show the pipeline, not a skill"
  return LoadedModel(entry.name or f"random {entry.preset}", model, tokenizer, note)


def _architecture(path: str) -> str:
  """The first `architectures` entry (or `model_type`) of a checkpoint's config.json."""
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  return (cfg.get("architectures") or [cfg.get("model_type", "")])[0]


def _judge(config: Any, workdir: str, stack: ExitStack):
  """(judge client, its name) as configured; "local" starts the overlap judge on loopback."""
  cfg = config.judge
  cache = os.path.join(workdir, "drivebench", "judge")
  base_url, model = cfg.base_url, cfg.model
  if base_url == "local":
    server = stack.enter_context(local_judge.LoopbackJudgeServer(local_judge.OverlapJudge()))
    base_url, model = server.url, "overlap"
  elif not base_url:
    return None, "none"
  client = OpenAIChatJudge(
    base_url,
    model,
    api_key_env=cfg.api_key_env,
    concurrency=int(cfg.concurrency),
    cache_dir=cache,
    replay_only=bool(cfg.replay_only),
  )
  return client, model


def _records(drivebench_dir: str, tfds_dir: str, setting: str):
  builder = sources.build_dataset("drivebench", drivebench_dir, tfds_dir, config=setting)
  return builder.as_data_source("test")


def run(config: Any, workdir: str) -> dict:
  """Answers, scores and reports every configured setting; returns the summary."""
  workdir = os.path.abspath(workdir)
  settings = [s.strip() for s in config.settings.split(",") if s.strip()]
  if not settings:
    raise ValueError("config.settings is empty: name at least one DriveBench setting")
  ckpt_lib.quiet_orbax_info_logs()
  mesh = sharding_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_from_config(config.sharding_rules)
  drivebench_dir, tokenizer = config.data.drivebench_dir, None
  if not drivebench_dir:
    data_settings = sources.DataSettings(
      synthetic=sources.SyntheticData(
        num_train_frames=int(config.data.synthetic.num_train_frames),
        num_test_frames=int(config.data.synthetic.num_test_frames),
        image_size=int(config.data.synthetic.image_size),
        corruptions=tuple(s for s in settings if s not in ("clean", "no_image")),
      )
    )
    drivebench_dir = sources.prepare_synthetic(data_settings, workdir)
    tokenizer = sources.load_tokenizer(data_settings, workdir, drivebench_dir)
  loaded = load_model(config, workdir, tokenizer, mesh, rules)
  processor = Processor.for_model(loaded.tokenizer, loaded.model.config, max_tiles=1)
  official = config.sampling == "official"
  if config.sampling not in ("greedy", "official"):
    raise ValueError(f"config.sampling={config.sampling!r}: expected 'greedy' or 'official'")
  method = inference.OFFICIAL_SAMPLING if official else sampling.GREEDY
  max_new_tokens = inference.OFFICIAL_MAX_NEW_TOKENS if official else int(config.max_new_tokens)
  tfds_dir = os.path.join(workdir, "data", "tfds")
  templates, rubric_name = drivebench.rubric_templates(config.judge.official_templates_dir or None)
  descriptions_path = os.path.join(drivebench_dir, "visual_description.json")
  descriptions = (
    drivebench.load_descriptions(descriptions_path) if os.path.isfile(descriptions_path) else None
  )
  scores, first_records = {}, None
  with ExitStack() as stack:
    judge, judge_name = _judge(config, workdir, stack)
    for setting in settings:
      records = _records(drivebench_dir, tfds_dir, setting)
      first_records = first_records or records
      inference.answer_setting(
        loaded.model,
        processor,
        loaded.tokenizer,
        records,
        inference.release_json(drivebench_dir, setting),
        answers_lib.answers_path(workdir, setting),
        batch_size=int(config.batch_size),
        buckets=tuple(config.buckets),
        max_images=int(config.max_images),
        max_new_tokens=max_new_tokens,
        method=method,
        seed=int(config.seed),
        max_items=int(config.max_items),
      )
      scores[setting], path = drivebench.score_setting(
        workdir,
        setting,
        judge=judge,
        templates=templates,
        rubric_name=rubric_name,
        descriptions=descriptions,
        attempts=int(config.judge.attempts),
      )
      logging.info("%s: scores in %s", setting, path)
  drivebench.write_summary(workdir, settings)
  measured = None
  if config.efficiency.enabled:
    prompt = inference.first_prompt(processor, first_records)
    measured = efficiency.measure_generation(
      loaded.model,
      prompt["input_ids"][None],
      prompt["pixel_values"][None],
      new_tokens=int(config.efficiency.new_tokens),
    )
    with open(os.path.join(workdir, "drivebench", "efficiency.json"), "w") as f:
      json.dump({"model": loaded.name, **measured.as_dict()}, f, indent=2)
  rows = [report.ModelResult(loaded.name, scores, measured)]
  rows += [_compared(other, settings) for other in _split(config.report.compare_workdirs)]
  if first_records is not None:
    prompt = inference.first_prompt(processor, first_records)
    for preset in _split(config.efficiency.presets):
      rows.append(_preset_efficiency(config, preset, prompt["input_ids"].shape[0], mesh, rules))
  path = report.write_report(
    os.path.join(workdir, "drivebench"), rows, judge_name=judge_name, notes=[loaded.note]
  )
  logging.info("DriveBench report: %s", path)
  table = report.table1_markdown(rows)
  if jax.process_index() == 0:
    print(table, flush=True)
  return {"model": loaded.name, "scores": scores, "report": str(path)}


def _preset_efficiency(config: Any, preset: str, prompt_tokens: int, mesh, rules):
  """An efficiency-only row: a random-init preset, born sharded on the mesh (so a model larger
  than one device is spread over all of them), on a text prompt of the evaluated prompt's length.
  """
  entry = ModelEntry(preset=preset, dtype=config.efficiency.dtype)
  cfg = experiment_lib.model_config(entry)
  model, _ = experiment_lib.build_model(entry, None, mesh, rules, int(config.seed))
  ids = np.full((1, prompt_tokens), min(100, cfg.text.vocab_size - 1), np.int32)
  measured = efficiency.measure_generation(
    model.language_model, ids, new_tokens=int(config.efficiency.new_tokens)
  )
  del model
  return report.ModelResult(f"{preset} (random init, text prompt)", {}, measured)


def _split(text: str) -> list[str]:
  return [p.strip() for p in text.split(",") if p.strip()]


def _compared(other_workdir: str, settings: list[str]) -> report.ModelResult:
  """A row of another evaluation's workdir (its scores.json and efficiency.json)."""
  scores = {}
  for setting in settings:
    path = drivebench.scores_path(other_workdir, setting)
    if path.is_file():
      scores[setting] = json.loads(path.read_text())
  if not scores:
    raise FileNotFoundError(f"{other_workdir}: no DriveBench scores for {settings}")
  measured, name = None, os.path.basename(os.path.abspath(other_workdir))
  eff_path = os.path.join(other_workdir, "drivebench", "efficiency.json")
  if os.path.isfile(eff_path):
    with open(eff_path) as f:
      stored = json.load(f)
    name = stored.pop("model", name)
    measured = efficiency.Efficiency(**stored)
  return report.ModelResult(name, scores, measured)
