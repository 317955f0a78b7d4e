"""The IMUG configs on the command line, and the demo's training against the untrained model."""

import sys
from pathlib import Path

import pytest
from absl import flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def parse(monkeypatch):
  """launch.py's flag parsing in process (config_flags finds the overrides in sys.argv);
  the flags are left unparsed afterwards."""
  import launch

  def forget():  # The override flags are defined per parse; a second parse must not see them.
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
      delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()

  def run(argv):
    monkeypatch.setattr(sys, "argv", argv)
    forget()
    launch.parse_flags(argv)
    return launch._CONFIG.value

  yield run
  forget()


@pytest.mark.parametrize("name", ["demo", "eval"])
def test_tts_and_prompt_keys_are_settable_from_the_command_line(tmp_path, parse, name):
  config = parse(
    [
      "launch.py",
      f"--config={REPO / f'configs/imug/{name}.py'}",
      f"--workdir={tmp_path}",
      "--config.tts.strategies=('cot','bon')",
      "--config.tts.n=2",
      "--config.tts.rounds=1",
      "--config.tts.verifier=judge",
      f"--config.scoring.official_prompts_dir={tmp_path / 'IMUG-Bench'}",
    ],
  )
  assert tuple(config.tts.strategies) == ("cot", "bon")
  assert (config.tts.n, config.tts.rounds, config.tts.verifier) == (2, 1, "judge")
  assert config.scoring.official_prompts_dir == str(tmp_path / "IMUG-Bench")


def test_a_misspelt_tts_key_is_one_line(tmp_path, parse, capsys):
  with pytest.raises(SystemExit) as stopped:
    parse(
      [
        "launch.py",
        f"--config={REPO / 'configs/imug/demo.py'}",
        f"--workdir={tmp_path}",
        "--config.tts.nn=2",
      ],
    )
  assert stopped.value.code == 2
  assert "bad configuration: no config key" in capsys.readouterr().err


def first_turn_scores(model, bench, oracle) -> list[float]:
  """Oracle patch match of the model's greedy image at each sample's turn 1 (an image turn in
  every synthetic script)."""
  import jax

  from imug_jax.models import protocol
  from imug_jax.rollout.runner import user_message

  scores = []
  for index, sample in enumerate(bench.samples):
    task = sample.tasks[0]
    assert task.modality == "image"
    history = [
      protocol.message("system", [protocol.text_item(sample.system_prompt)]),
      user_message(task, bench.images_dir),
    ]
    path = bench.data_dir / f"candidate_{index}.png"
    path.write_bytes(model.respond(history, "image_only", 0.0, jax.random.key(0)).image)
    scores.append(oracle.match(sample.key, task.turn, path))
  return scores


@pytest.mark.slow
def test_training_lifts_the_oracle_image_score_above_the_untrained_model(tmp_path):
  """A tiny setting: 2 samples (a grid and a paint canvas), fitted, then drawn greedily."""
  import numpy as np

  from drivekd_jax.data.tokenizer import train_bpe_tokenizer
  from imug_jax import run as run_lib
  from imug_jax.data import synthetic
  from imug_jax.judges.oracle import OracleJudge
  from imug_jax.models import tiny_train
  from imug_jax.models.tiny import TinyConfig, TinyUnifiedModel

  bench = synthetic.write_synthetic(tmp_path / "bench", 2, seed=1000)
  tokenizer = train_bpe_tokenizer(run_lib.text_corpus(bench), 300, tmp_path / "tokenizer.json")
  config = TinyConfig(cache_length=1024, chunk_buckets=(64, 256), max_text_tokens=4, guidance=1.0)
  model = TinyUnifiedModel(tokenizer, config)
  oracle = OracleJudge(bench.data_dir)
  untrained = first_turn_scores(model, bench, oracle)
  losses = tiny_train.train(
    model,
    bench,
    tiny_train.TrainConfig(
      steps=60, batch_size=2, max_length=1280, learning_rate=3e-3, unconditional_fraction=0.0
    ),
  )
  trained = first_turn_scores(model, bench, oracle)
  assert np.mean(untrained) < 0.05, untrained  # Random tokens match almost no foreground.
  assert np.mean(trained) > np.mean(untrained) + 0.3, (trained, untrained, losses[-5:])
