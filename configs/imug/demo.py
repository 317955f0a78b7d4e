"""IMUG demo: the synthetic benchmark, the tiny JAX unified model, own + reference history.

`python launch.py --config=configs/imug/demo.py --workdir=/tmp/imug_demo` (a few minutes on CPU).
Serve the same model: `python -m imug_jax.serve --config=configs/imug/demo.py --port 8000`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "imug.eval"

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # Written to <workdir>/benchmark.
  config.data.release_dir = ""
  config.data.num_samples = 8
  config.data.seed = 0
  config.data.max_samples = 0

  config.model = ml_collections.ConfigDict()
  config.model.kind = "tiny"
  config.model.name = "tiny_umm"
  config.model.seed = 0
  config.model.text_vocab_size = 400
  config.model.urls = ["http://127.0.0.1:8000"]  # For kind "http".
  config.model.timeout = 600.0
  config.model.retries = 3
  # An in-process Janus-Pro instead: --config.model.name=janus --config.model.checkpoint=DIR
  # (a transformers JanusForConditionalGeneration folder with tokenizer.json).
  config.model.checkpoint = ""
  config.model.janus = ml_collections.ConfigDict(
    dict(cache_length=8192, chunk_buckets=(256, 1024, 4096), max_text_tokens=256, guidance=5.0)
  )
  config.model.tiny = ml_collections.ConfigDict(
    dict(
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      intermediate_size=128,
      cache_length=2048,
      chunk_buckets=(64, 256),
      max_text_tokens=8,
      guidance=3.0,
      num_samples=1,
    )
  )

  # A short teacher-forced fit on the synthetic ground truth (imug_jax.models.tiny_train).
  config.model.train = ml_collections.ConfigDict()
  config.model.train.steps = 30
  config.model.train.batch_size = 2
  config.model.train.max_length = 1024
  config.model.train.learning_rate = 3e-3
  config.model.train.unconditional_fraction = 0.1
  config.model.train.seed = 0

  config.rollout = ml_collections.ConfigDict()
  config.rollout.temperature = 0.7
  config.rollout.seed = 0
  config.rollout.concurrency = 1
  config.rollout.force = False
  config.rollout.progress = True
  config.rollout.reference_control = True
  config.rollout.reference_dir = ""  # Empty: the synthetic ground truth.
  # Scoring and report (imug_jax.report): the smoke-test random judge, since nothing may be
  # downloaded or called remotely; the grid and MCQ scores are exact.
  config.scoring = ml_collections.ConfigDict()
  config.scoring.judge = "random"
  config.scoring.judge_seed = 2026
  config.scoring.mcq_parser = "official"
  config.scoring.num_boot = 200
  return config
