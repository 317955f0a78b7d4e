"""IMUG-Bench, the real release, against `/infer` model servers (the official protocol).

  python launch.py --config=configs/imug/eval.py --workdir=DIR \
      --config.data.release_dir=/path/to/IMUG-Bench/data \
      --config.model.name=bagel --config.model.urls='("http://127.0.0.1:8000",)'

Rollouts go to DIR/outputs/model_outputs/<name>/...; a rerun resumes. The reference-history
control needs another run's outputs: --config.rollout.reference_control=True
--config.rollout.reference_dir=DIR/outputs/model_outputs/<other model>.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "imug.eval"

  config.data = ml_collections.ConfigDict()
  config.data.source = "release"
  config.data.release_dir = ""  # Required.
  config.data.num_samples = 0  # Synthetic only.
  config.data.seed = 0
  config.data.max_samples = 0  # 0: every sample.

  config.model = ml_collections.ConfigDict()
  config.model.kind = "http"
  config.model.name = "model"
  config.model.urls = ("http://127.0.0.1:8000",)
  config.model.timeout = 600.0  # Official client settings.
  config.model.retries = 3
  # An in-process Janus-Pro instead: --config.model.name=janus --config.model.checkpoint=DIR
  # (a transformers JanusForConditionalGeneration folder with tokenizer.json).
  config.model.checkpoint = ""
  config.model.janus = ml_collections.ConfigDict(
    dict(cache_length=8192, chunk_buckets=(256, 1024, 4096), max_text_tokens=256, guidance=5.0)
  )

  config.rollout = ml_collections.ConfigDict()
  config.rollout.temperature = 0.7  # Official client default.
  config.rollout.seed = 0
  config.rollout.concurrency = 8  # Samples in flight; turns of one sample stay sequential.
  config.rollout.force = False
  config.rollout.progress = True
  config.rollout.reference_control = False
  config.rollout.reference_dir = ""
  # Scoring with an OpenAI-compatible judge (imug_jax.report); enable it and name the judge:
  #   --config.scoring.enabled=True --config.scoring.base_url=... --config.scoring.judge_model=...
  config.scoring = ml_collections.ConfigDict()
  config.scoring.enabled = False
  config.scoring.judge = "openai"
  config.scoring.base_url = ""
  config.scoring.judge_model = ""
  config.scoring.api_key_env = "IMUG_JUDGE_API_KEY"
  config.scoring.official_prompts_dir = ""  # A local IMUG-Bench checkout: its judge prompts.
  config.scoring.mcq_parser = "official"

  # Test-time scaling (imug_jax.tts), e.g. --config.tts.strategies='("cot","verify","bon")':
  # each strategy is a rollout <name>+<strategy>; the report gives its gain per turn.
  config.tts = ml_collections.ConfigDict()
  config.tts.strategies = ()
  config.tts.rounds = 2  # Self-verification: regenerations at most.
  config.tts.n = 4  # Best-of-N candidates.
  config.tts.verifier = "self"  # Best-of-N verifier: "self" (the model) or "judge".
  return config
