"""Task "imug.eval": benchmark -> rollouts in the official layout (-> scoring, report).

Config (see configs/imug/demo.py):
  data.source         "synthetic" (generated into <workdir>/benchmark if absent) or "release"
  data.release_dir     the release folder (benchmark.jsonl, images/, ...) for "release"
  data.num_samples, data.seed, data.max_samples (0: all)
  data.train_samples, data.train_seed   the synthetic train split (the same generator with
                       another seed, under <workdir>/train_benchmark) that model.train fits
  model.kind           "tiny" (in-process JAX model) or "http" (official /infer servers)
  model.checkpoint     a transformers Janus / Janus-Pro directory: the in-process Janus instead
                       (imug_jax.models.janus; model.janus: JanusRolloutConfig fields)
  model.name           output folder name; model.urls / timeout / retries for "http";
                       model.tiny (TinyConfig fields), model.seed, model.text_vocab_size for "tiny";
                       model.train (TrainConfig fields; steps 0: untrained) first fits the tiny
                       model to the train split's ground truth (imug_jax.models.tiny_train)
  rollout.temperature, seed, concurrency, force, progress
  rollout.reference_control  also roll out with reference history (synthetic ground truth, or
                       rollout.reference_dir: another run's model folder) into <name>__refhist
  scoring             (optional) judge and options of `imug_jax.report.run_from_config`;
                       scoring.enabled False skips it; tts (optional) test-time scaling
Outputs: <workdir>/outputs/model_outputs/<name>[__refhist]/<domain>/<subdomain>/question_<id>/,
<workdir>/outputs/rollout_summary.json and, with scoring, <workdir>/report/.

What a first start makes (the synthetic benchmark folder, the tokenizer file) is built in a
temporary sibling and renamed into place, the folder with a completion marker
(`drivekd_jax.paths.build_folder`), so an interrupted first start is simply redone by the next.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from absl import logging

from drivekd_jax import paths
from imug_jax.data import release as release_lib
from imug_jax.data import synthetic
from imug_jax.models.protocol import UnifiedModel
from imug_jax.rollout import history, runner

REFERENCE_SUFFIX = "__refhist"


def load_benchmark(config, workdir: str | Path) -> release_lib.Release:
  """The configured release, or the synthetic benchmark under <workdir>/benchmark."""
  source = config.data.get("source", "synthetic")
  if source == "release":
    if not config.data.get("release_dir"):
      raise ValueError("data.source is 'release': set --config.data.release_dir=<folder>")
    return release_lib.load_release(config.data.release_dir)
  if source != "synthetic":
    raise ValueError(f"data.source must be 'synthetic' or 'release', got {source!r}")
  return _synthetic(
    Path(workdir) / "benchmark", config.data.num_samples, config.data.seed, "data.num_samples"
  )


def load_train_split(config, workdir: str | Path) -> release_lib.Release:
  """The synthetic train split under <workdir>/train_benchmark: `data.train_samples` samples of
  the generator seeded `data.train_seed`, which must differ from the evaluated `data.seed`."""
  if config.data.get("source", "synthetic") != "synthetic":
    raise ValueError("model.train needs the synthetic benchmark's ground truth (data.source)")
  train_seed = config.data.get("train_seed", None)
  if train_seed is None or train_seed == config.data.seed:
    raise ValueError(
      f"data.train_seed must be set and differ from data.seed ({config.data.seed}): the train "
      f"split may not be the evaluated benchmark, got {train_seed!r}"
    )
  return _synthetic(
    Path(workdir) / "train_benchmark",
    config.data.get("train_samples", 0),
    train_seed,
    "data.train_samples",
  )


def _synthetic(root: Path, num_samples, seed: int, field: str) -> release_lib.Release:
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"{field} must be an integer >= 1, got {num_samples!r}")
  if not paths.is_complete(root):
    logging.info("writing the synthetic benchmark to %s", root)
  paths.build_folder(root, lambda temp: synthetic.write_synthetic(temp, num_samples, seed))
  return release_lib.load_release(root)


def text_corpus(bench: release_lib.Release) -> list[str]:
  """Every text of the benchmark (instructions, questions, system prompts) for the tokenizer,
  with the test-time-scaling prompts and answers, and on a synthetic benchmark the plans of its
  image turns (what `imug_jax.models.tiny_train` teaches besides the dialogues)."""
  from imug_jax.models import tiny_train

  texts = tiny_train.strategy_texts()
  if (bench.data_dir / synthetic.META).is_file():
    texts += tiny_train.plan_texts(bench)
  for sample in bench.samples or ():
    if sample.system_prompt:
      texts.append(sample.system_prompt)
    for task in sample.tasks:
      texts += [item.text for item in task.inputs if item.text is not None]
      texts.append(task.answer or "")
  return texts + ["ABCDEFG", "Error"]


def build_model(
  config, workdir: str | Path, bench: release_lib.Release | None = None
) -> UnifiedModel:
  """The configured model: a tiny in-process JAX model or an `/infer` HTTP client."""
  cfg = config.model
  paths.check_path_component(cfg.name, "model.name")
  if cfg.get("checkpoint"):  # A Janus checkpoint directory: the in-process Janus-Pro.
    from imug_jax.models.janus.unified import JanusRolloutConfig, JanusUnifiedModel

    fields = {f.name for f in dataclasses.fields(JanusRolloutConfig)}
    options = (cfg.get("janus") or {}).items()
    janus = {k: (tuple(v) if isinstance(v, list) else v) for k, v in options if k in fields}
    return JanusUnifiedModel.from_pretrained(
      cfg.checkpoint, JanusRolloutConfig(**janus), name=cfg.name
    )
  if cfg.kind == "http":
    from imug_jax.models.http import HttpModel

    return HttpModel(cfg.name, list(cfg.urls), timeout=cfg.timeout, retries=cfg.retries)
  if cfg.kind == "tiny":
    from drivekd_jax.data import tokenizer as text_tokenizer
    from imug_jax.models.tiny import TinyConfig, TinyUnifiedModel

    train = cfg.get("train")
    training = train is not None and train.steps > 0
    path = Path(workdir) / "tokenizer.json"
    if path.exists():
      tok = text_tokenizer.Tokenizer.from_path(path)
    else:  # From the texts the model learns from: the train split, else the evaluated ones.
      if training:
        texts = text_corpus(load_train_split(config, workdir))
      else:
        texts = text_corpus(bench or load_benchmark(config, workdir))
      path.parent.mkdir(parents=True, exist_ok=True)
      handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".tokenizer.", suffix=".json")
      os.close(handle)
      try:
        tok = text_tokenizer.train_bpe_tokenizer(texts, cfg.text_vocab_size, temp)
        os.replace(temp, path)  # Whole or absent: a killed first start trains it again.
      finally:
        Path(temp).unlink(missing_ok=True)
    fields = {f.name for f in dataclasses.fields(TinyConfig)}
    tiny = {k: (tuple(v) if isinstance(v, list) else v) for k, v in cfg.tiny.items() if k in fields}
    model = TinyUnifiedModel(tok, TinyConfig(**tiny), seed=cfg.seed, name=cfg.name)
    if training:
      from imug_jax.models import tiny_train

      split = load_train_split(config, workdir)
      losses = tiny_train.train(model, split, tiny_train.TrainConfig(**train.to_dict()))
      logging.info(
        "tiny model: %d training steps, loss %.3f -> %.3f", len(losses), losses[0], losses[-1]
      )
      model.train_losses = losses
    return model
  raise ValueError(f"model.kind must be 'tiny' or 'http', got {cfg.kind!r}")


def rollout(
  config,
  workdir: str | Path,
  model: UnifiedModel,
  bench: release_lib.Release,
) -> dict[str, Any]:
  """Runs the own-history rollout (and the reference-history control); returns the summary."""
  samples = list(bench.samples or ())
  max_samples = config.data.get("max_samples", 0)
  if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 0:
    raise ValueError(f"data.max_samples must be an integer >= 0 (0: all), got {max_samples!r}")
  if max_samples:
    samples = samples[:max_samples]
  out_dir = Path(workdir) / "outputs" / "model_outputs"
  r = config.rollout
  common = dict(
    images_dir=bench.images_dir,
    out_dir=out_dir,
    temperature=r.temperature,
    seed=r.seed,
    concurrency=r.concurrency,
    force=r.force,
    progress=r.progress,
  )
  runs = {
    model.name: runner.run_rollout(
      model, samples, model_name=model.name, history_source=history.OwnHistory(), **common
    )
  }
  if r.get("reference_control", False):
    if r.get("reference_dir"):
      images = history.outputs_of_run(r.reference_dir, samples)
    else:
      images = synthetic.ground_truth_images(bench.data_dir)
    source = history.ReferenceHistory(images)
    missing = source.missing(samples)
    if missing:
      raise ValueError(
        f"reference history: {len(missing)} image turns have no reference image, "
        f"e.g. {missing[0][0]} turn {missing[0][1]}"
      )
    name = model.name + REFERENCE_SUFFIX
    runs[name] = runner.run_rollout(
      model, samples, model_name=name, history_source=source, **common
    )
  summary = {
    "benchmark": str(bench.data_dir),
    "num_samples": len(samples),
    "outputs": str(out_dir),
    "train_losses": getattr(model, "train_losses", None),
    "runs": {name: dataclasses.asdict(s) for name, s in runs.items()},
  }
  paths.write_text_atomic(out_dir.parent / "rollout_summary.json", json.dumps(summary, indent=2))
  for name, s in runs.items():
    logging.info(
      "rollout %s: %d done, %d skipped, %d failed, %d error turns of %d",
      name,
      s.done,
      s.skipped,
      s.failed,
      s.error_turns,
      s.turns,
    )
  return summary


def run(config, workdir: str) -> dict[str, Any]:
  """Entry point of task "imug.eval" (launch.py): rollouts, then scoring and the report.

  Scoring (`imug_jax.report.run_from_config`: test-time-scaling rollouts if configured, the
  official scoring pipeline, summary, exposure bias, plots) runs when the config has a `scoring`
  section whose `enabled` is not False; its result is returned under "report".
  """
  bench = load_benchmark(config, workdir)
  model = build_model(config, workdir, bench)
  summary = rollout(config, workdir, model, bench)
  scoring = config.get("scoring")
  if scoring is not None and scoring.get("enabled", True):
    from imug_jax import report

    summary["report"] = report.run_from_config(config, workdir, model, bench)
  return summary
