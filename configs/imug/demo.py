"""IMUG demo: the tiny JAX unified model trained on the synthetic train split, then evaluated on
held-out synthetic samples with own and reference history and the three test-time-scaling
strategies, every turn scored by the oracle judge against the exact ground truth.

`python launch.py --config=configs/imug/demo.py --workdir=/tmp/imug_demo` (minutes on CPU).
The report (report.md, summary.json, PNG plots) lands in <workdir>/report/.
Serve the same model: `python -m imug_jax.serve --config=configs/imug/demo.py --port 8000`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "imug.eval"

  config.data = ml_collections.ConfigDict()
  config.data.source = "synthetic"  # Written to <workdir>/benchmark.
  config.data.release_dir = ""
  config.data.num_samples = 24  # Held-out samples evaluated.
  config.data.seed = 0
  config.data.max_samples = 0
  # The train split: the same generator with another seed, written to <workdir>/train_benchmark.
  config.data.train_samples = 64
  config.data.train_seed = 1000

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
      max_text_tokens=32,  # A chain-of-thought plan takes up to 30 tokens.
      guidance=3.0,
      num_samples=1,
    )
  )

  # A teacher-forced fit on the train split's ground truth (imug_jax.models.tiny_train);
  # steps=0: the untrained model.
  config.model.train = ml_collections.ConfigDict()
  config.model.train.steps = 300
  config.model.train.batch_size = 6
  config.model.train.max_length = 1280
  config.model.train.learning_rate = 3e-3
  config.model.train.unconditional_fraction = 0.1
  config.model.train.seed = 0
  # Rows that teach what the test-time-scaling strategies ask (tiny_train's module docstring):
  # the chain-of-thought plan, the self-check's YES/NO and the best-of-N rating, on candidates
  # that are the target (target_candidate_fraction) or wrong ones of these kinds (weights).
  # The rest of the rows are whole ground-truth dialogues: 60% of 6 rows a step, as many as the
  # 90% of 4 rows of a fit on the dialogues alone (batch_size 4): the strategies' rows are added.
  config.model.train.plan_fraction = 0.1
  config.model.train.check_fraction = 0.1
  config.model.train.rate_fraction = 0.1
  config.model.train.target_candidate_fraction = 0.5
  config.model.train.wrong_candidates = ml_collections.ConfigDict(
    dict(recolour=1.0, shift=1.0, erase=1.0, other_turn=1.0, noise=1.0)
  )

  config.rollout = ml_collections.ConfigDict()
  config.rollout.temperature = 0.7
  config.rollout.seed = 0
  config.rollout.concurrency = 1
  config.rollout.force = False
  config.rollout.progress = True
  config.rollout.reference_control = True
  config.rollout.reference_dir = ""  # Empty: the synthetic ground truth.
  # Scoring and report (imug_jax.report): the oracle judge scores every image turn against the
  # synthetic ground truth and resolves dynamic answers from the model's images (no network).
  config.scoring = ml_collections.ConfigDict()
  config.scoring.judge = "oracle"  # Or "openai" (base_url, judge_model) / "local".
  config.scoring.judge_seed = 0  # "local" only.
  config.scoring.base_url = ""
  config.scoring.judge_model = ""
  config.scoring.api_key_env = "IMUG_JUDGE_API_KEY"
  config.scoring.official_prompts_dir = ""  # A local IMUG-Bench checkout: its judge prompts.
  config.scoring.mcq_parser = "official"
  config.scoring.num_boot = 200

  # Test-time scaling (imug_jax.tts): each strategy is a rollout <name>+<strategy> next to the
  # baseline; the report gives its gain per turn. strategies=() skips them.
  config.tts = ml_collections.ConfigDict()
  config.tts.strategies = ("cot", "verify", "bon")
  config.tts.rounds = 2  # Self-verification: regenerations at most.
  config.tts.n = 4  # Best-of-N candidates.
  config.tts.verifier = "self"  # Best-of-N verifier: "self" (the model) or "judge" (a chat judge).
  # With the oracle judge: the model's plans, checks and ratings on held-out turns against the
  # ground truth (imug_jax.tts.diagnostics), in the report.
  config.tts.diagnostics = True
  return config
