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


def demo_config(steps: int):
  """configs/imug/demo.py at a tiny setting: 4 held-out samples, 8 train samples, no TTS."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("imug_demo", REPO / "configs/imug/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.num_samples = 4
  config.data.train_samples = 8
  config.model.train.steps = steps
  config.model.train.learning_rate = 1e-2
  config.rollout.reference_control = False
  config.rollout.progress = False
  config.rollout.temperature = 0.3
  config.tts.strategies = ()
  config.scoring.num_boot = 20
  return config


@pytest.mark.slow
def test_training_lifts_the_oracle_image_score_above_the_untrained_model(tmp_path):
  from imug_jax import run as run_lib

  scores = {}
  for steps in (0, 60):
    summary = run_lib.run(demo_config(steps), str(tmp_path / f"steps_{steps}"))
    result = summary["report"]
    assert result["scoring"]["judge"] == "oracle"
    scores[steps] = result["models"]["tiny_umm"]["overall"]["image"]["mean"]
  assert (tmp_path / "steps_60" / "train_benchmark" / "benchmark.jsonl").is_file()
  assert scores[0] < 5.0  # Random image tokens match almost no foreground patch.
  assert scores[60] > scores[0] + 15.0, scores
