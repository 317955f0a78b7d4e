"""The tiny model's rows for the test-time-scaling strategies: plans, YES/NO checks and ratings
exact against the synthetic ground truth and the oracle, in the wrappers' own messages."""

import json

import numpy as np
import pytest

from drivekd_jax.data.tokenizer import train_bpe_tokenizer
from imug_jax import run as run_lib
from imug_jax.data import synthetic
from imug_jax.judges.oracle import OracleJudge, lattice_tokens
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import protocol, tiny_train
from imug_jax.models.protocol import Response
from imug_jax.models.tiny import TinyConfig, TinyUnifiedModel
from imug_jax.tts import diagnostics, verifiers, wrappers

GRID = [["1", "0", "r"], ["0", "g", "0"], ["1", "1", "0"]]
SMALL = TinyConfig(
  hidden_size=32,
  num_layers=1,
  num_heads=2,
  num_kv_heads=1,
  intermediate_size=64,
  cache_length=1024,
  chunk_buckets=(64, 256),
  max_text_tokens=32,
)


@pytest.mark.parametrize(
  "subdomain, tokens, plan",
  [
    (
      "grid_coloring",
      synthetic.draw_grid(GRID),
      "Grid. grey: top-left, bottom-left, bottom-middle. red: top-right. green: centre.",
    ),
    ("grid_coloring", synthetic.draw_grid([["0"] * 3] * 3), "Empty grid."),
    ("paint_mixing", synthetic.draw_canvas("orange"), "orange canvas."),
    ("paint_mixing", synthetic.draw_canvas("orange", "red"), "orange canvas, red border."),
    ("block_stacking", synthetic.draw_stack(3, "blue"), "3 blue blocks."),
    ("litmus_test", synthetic.draw_strip("red"), "red strip."),
  ],
)
def test_plan_text_describes_the_target_exactly(subdomain, tokens, plan):
  assert synthetic.plan_text(subdomain, tokens) == plan


def test_plan_text_rejects_unknown_subdomains_and_shapes():
  with pytest.raises(ValueError, match="no plan for subdomain 'jigsaw'"):
    synthetic.plan_text("jigsaw", synthetic.draw_strip("red"))
  with pytest.raises(ValueError, match=r"must be \[12, 12\]"):
    synthetic.plan_text("litmus_test", np.zeros((4, 4), np.int32))


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  """A 4-sample synthetic train split (one per script), a tokenizer, a small model, its rows."""
  root = tmp_path_factory.mktemp("strategy")
  bench = synthetic.write_synthetic(root / "bench", num_samples=4, seed=1000)
  tok = train_bpe_tokenizer(run_lib.text_corpus(bench), 300, root / "tokenizer.json")
  model = TinyUnifiedModel(tok, SMALL)
  rows = tiny_train.StrategyRows(model, bench, tiny_train.TrainConfig(max_length=1280))
  return bench, model, rows


def _history(bench, sample, turn):
  """The ground-truth history up to and including the user message of `turn`."""
  history = []
  for message, at in tiny_train.ground_truth_messages(bench, sample):
    history.append(message)
    if at == turn and message["role"] == "user":
      return history
  raise AssertionError(f"no user message of turn {turn}")


def _turn_of(rows, bench, sample, turn):
  name = f"{bench.data_dir}: sample {sample.key} turn {turn}"
  return next(t for t in rows.turns if t.name == name)


def test_plan_row_is_the_chain_of_thought_exchange_with_the_exact_plan(setting):
  bench, model, rows = setting
  sample = bench.samples[0]  # Geometric_Coloring, turn 1: a grid drawn or redrawn.
  assert sample.key.subdomain == "grid_coloring"
  target_path = synthetic.ground_truth_images(bench.data_dir)[(sample.key, 1)]
  target = lattice_tokens(itok.read_image(target_path.read_bytes()))
  plan = synthetic.plan_text("grid_coloring", target)
  assert plan.startswith("Grid. grey: ") and plan.count(",") >= 1
  tokens, mask = rows.plan(_turn_of(rows, bench, sample, 1))
  cot = wrappers.ChainOfThought(model)
  exchange = [
    *cot.draw_request(_history(bench, sample, 1), plan),
    protocol.assistant_message(Response(image=target_path.read_bytes())),
  ]
  expected = model.encode_prompt(exchange, "text_only")[: -len(model.prompt_suffix("text_only"))]
  assert tokens.tolist() == expected  # The wrapper's prompts and the history, token for token.
  supervised = tokens[mask].tolist()
  plan_ids = [*map(int, model.tokenizer.encode(plan)), model.im_end]
  assert supervised[: len(plan_ids)] == plan_ids
  assert supervised[len(plan_ids) :] == model.image_tokens(target_path.read_bytes())[1:] + [
    model.im_end
  ]


@pytest.mark.parametrize("kind", ["check", "rate"])
def test_judged_rows_ask_the_wrappers_question_and_supervise_only_the_label(setting, kind):
  bench, model, rows = setting
  sample = bench.samples[1]  # Color_Reasoning, turn 1: a canvas.
  turn = _turn_of(rows, bench, sample, 1)
  candidate = tiny_train.wrong_candidate(
    "recolour", turn.target, turn.others, np.random.default_rng(0)
  )
  tokens, mask = rows.judged(turn, candidate, kind)
  png = itok.png_bytes(synthetic.TOKENIZER.decode(candidate.reshape(-1)))
  question = wrappers.CHECK_PROMPT if kind == "check" else verifiers.RATE_PROMPT
  label = "NO" if kind == "check" else "0"  # A canvas of another colour matches no patch.
  exchange = [
    *verifiers.with_candidate(_history(bench, sample, 1), png, question),
    protocol.assistant_message(Response(text=label)),
  ]
  expected = model.encode_prompt(exchange, "text_only")[: -len(model.prompt_suffix("text_only"))]
  assert tokens.tolist() == expected
  assert tokens[mask].tolist() == [*map(int, model.tokenizer.encode(label)), model.im_end]


def test_wrong_candidates_differ_from_the_target_and_labels_follow_the_oracle(setting, tmp_path):
  bench, _, rows = setting
  oracle = OracleJudge(bench.data_dir)
  rng = np.random.default_rng(0)
  seen = set()
  for turn in rows.turns:
    sample = next(s for s in bench.samples if turn.name.endswith(f"{s.key} turn {turn.name[-1]}"))
    task = next(t for t in sample.tasks if t.turn == int(turn.name[-1]))
    candidates = [
      (kind, tiny_train.wrong_candidate(kind, turn.target, turn.others, rng))
      for kind in tiny_train.WRONG_KINDS
      for _ in range(3)
    ]
    for kind, candidate in [("target", turn.target), *candidates]:
      assert candidate.shape == turn.target.shape
      is_target = kind == "target"
      assert np.array_equal(candidate, turn.target) == is_target, kind
      path = tmp_path / "candidate.png"
      path.write_bytes(itok.png_bytes(synthetic.TOKENIZER.decode(candidate.reshape(-1))))
      score = oracle.score_image(sample.key, task, path)["points"][0]["score"]
      assert tiny_train.check_label(turn.target, candidate) == ("YES" if is_target else "NO")
      digit = int(tiny_train.rate_label(turn.target, candidate))
      assert abs(digit - score) <= 0.5, (kind, digit, score)
      seen.add(digit)
  assert {0, 5} <= seen and len(seen) >= 4  # Wrong candidates span the rating scale.


def test_a_wrong_kind_changes_what_it_names():
  target = synthetic.draw_stack(3, "blue")
  rng = np.random.default_rng(1)
  recoloured = tiny_train.wrong_candidate("recolour", target, (), rng)
  assert np.array_equal(recoloured % itok.NUM_EDGE_CODES, target % itok.NUM_EDGE_CODES)
  assert synthetic.plan_text("block_stacking", recoloured).startswith("3 ")
  erased = tiny_train.wrong_candidate("erase", target, (), rng)
  assert synthetic.plan_text("block_stacking", erased) in ("1 blue blocks.", "2 blue blocks.")
  other = synthetic.draw_stack(5, "blue")
  assert np.array_equal(tiny_train.wrong_candidate("other_turn", target, (other,), rng), other)
  blank = synthetic.draw_canvas("white")  # Nothing to move, erase or recolour: still wrong.
  for kind in tiny_train.WRONG_KINDS:
    assert not np.array_equal(tiny_train.wrong_candidate(kind, blank, (blank,), rng), blank)
  with pytest.raises(ValueError, match="unknown wrong-candidate kind 'blur'"):
    tiny_train.wrong_candidate("blur", target, (), rng)


def test_the_mixture_is_checked():
  assert tiny_train.TrainConfig(plan_fraction=0.2).row_probabilities().tolist() == pytest.approx(
    [0.7, 0.1, 0.2, 0.0, 0.0]
  )
  with pytest.raises(ValueError, match="sum to more than 1"):
    tiny_train.TrainConfig(plan_fraction=0.6, check_fraction=0.5).row_probabilities()
  with pytest.raises(ValueError, match="rate_fraction must be in"):
    tiny_train.TrainConfig(rate_fraction=-0.1).row_probabilities()
  with pytest.raises(ValueError, match="wrong_candidates must weigh"):
    tiny_train.TrainConfig(wrong_candidates={"blur": 1.0}).wrong_probabilities()


class _GroundTruthModel:
  """Answers the strategies' questions as a perfect model would, from the ground truth it is
  given; draws every image as `drawn` ("target" or a blank canvas). `always_yes` breaks its
  check."""

  name = "ground_truth"

  def __init__(self, bench, drawn="target", always_yes=False):
    self.oracle, self.bench = OracleJudge(bench.data_dir), bench
    self.drawn, self.always_yes = drawn, always_yes
    self.key = self.turn = None

  def target(self):
    return self.oracle.target(self.key, self.turn)

  def respond(self, history, output_mode, temperature, rng=None):
    texts = [i.get("text", "") for i in history[-1]["content"]]
    if output_mode == "image_only":
      image = self.target() if self.drawn == "target" else synthetic.draw_canvas("white")
      return Response(image=itok.png_bytes(synthetic.TOKENIZER.decode(image.reshape(-1))))
    candidate = (
      lattice_tokens(itok.read_image(protocol.decode_image(history[-2]["content"][0]["image"])))
      if history[-2]["role"] == "assistant" and history[-2]["content"][0]["type"] == "image"
      else None
    )
    if wrappers.PLAN_PROMPT in texts:
      return Response(text=synthetic.plan_text(self.key.subdomain, self.target()))
    if wrappers.CHECK_PROMPT in texts:
      return Response(
        text="YES" if self.always_yes else tiny_train.check_label(self.target(), candidate)
      )
    if verifiers.RATE_PROMPT in texts:
      return Response(text=tiny_train.rate_label(self.target(), candidate))
    raise AssertionError(texts)


def test_diagnostics_score_a_perfect_model_in_full_and_catch_a_yes_sayer(tmp_path, monkeypatch):
  bench = synthetic.write_synthetic(tmp_path / "bench", num_samples=2, seed=0)
  perfect = _GroundTruthModel(bench)
  # The model learns which turn it is asked about from the ground-truth messages diagnose walks.
  walk = tiny_train.ground_truth_messages

  def tracking(b, sample):
    for message, turn in walk(b, sample):
      if message["role"] == "user":
        for model in models:
          model.key, model.turn = sample.key, turn
      yield message, turn

  models = [perfect, _GroundTruthModel(bench, drawn="blank", always_yes=True)]
  monkeypatch.setattr(tiny_train, "ground_truth_messages", tracking)
  result = diagnostics.diagnose(perfect, bench, n=2)
  assert result["turns"] == sum(t.modality == "image" for s in bench.samples for t in s.tasks)
  assert result["plan"]["exact"]["rate"] == 1.0
  assert all(
    result["check"][k]["rate"] == 1.0
    for k in ["target", "own"] + [f"wrong/{w}" for w in tiny_train.WRONG_KINDS]
  )
  assert result["best_of_n"]["picked"]["mean"] == 100.0
  assert result["rate"]["wrong/noise"]["exact"] == 1.0
  lazy = diagnostics.diagnose(models[1], bench, n=2)
  assert lazy["check"]["target"]["rate"] == 1.0
  assert all(lazy["check"][f"wrong/{w}"]["rate"] == 0.0 for w in tiny_train.WRONG_KINDS)
  assert lazy["best_of_n"]["best"]["mean"] == 0.0
  assert "YES/NO correct" in "\n".join(diagnostics.markdown(lazy))


def _summary(own, reference, gain):
  """A report summary.json of one seed: turns 1 and 3, one strategy run."""

  def groups(values):
    by_turn = {str(t): {"mean": {"value": v}, "count": 2} for t, v in zip((1, 3), values)}
    return {"overall": {"by_turn": by_turn}}

  return {
    "runs": {"baselines": ["m"]},
    "models": {"m": {"overall": {"image": {"mean": float(np.mean(own))}}}},
    "exposure": {"m": {"groups": groups(own), "reference_groups": groups(reference)}},
    "tts": {
      "m+cot": {
        "image": {"gain": gain, "scaled": float(np.mean(own)) + gain},
        "by_turn": {"1": {"gain": gain}, "3": {"gain": 2 * gain}},
      }
    },
    "tts_diagnostics": {
      "turns": 4,
      "plan": {"exact": {"rate": gain / 10, "count": 4}},
      "check": {
        "target": {"rate": 1.0, "count": 4},
        "own_accepted_match": {"mean": None, "count": 0},
        "own_rejected_match": {"mean": own[0], "count": 4},
      },
      "rate": {
        "target": {"mean_rating": gain, "mean_label": 5.0, "exact": 0.5, "count": 4},
        "own_spearman": None,
      },
      "best_of_n": {
        "n": 2,
        **{k: {"mean": own[1], "count": 4} for k in ("picked", "random", "best")},
      },
    },
  }


def test_seeds_average_each_turn_and_keep_the_spread(tmp_path):
  from imug_jax import seeds

  workdirs = []
  for index, (own, reference, gain) in enumerate(
    [((30.0, 10.0), (30.0, 20.0), 1.0), ((20.0, 4.0), (20.0, 8.0), 3.0)]
  ):
    (tmp_path / f"s{index}" / "report").mkdir(parents=True)
    (tmp_path / f"s{index}" / "report" / "summary.json").write_text(
      json.dumps(_summary(own, reference, gain))
    )
    workdirs.append(tmp_path / f"s{index}")
  result = seeds.combine(workdirs)
  assert result["history"][1]["own"] == {
    "mean": 25.0,
    "low": 20.0,
    "high": 30.0,
    "seeds": [30.0, 20.0],
  }
  assert result["history"][3]["gap"]["mean"] == -7.0  # (10 - 20 + 4 - 8) / 2
  assert result["tts"]["m+cot"]["by_turn"][3]["mean"] == 4.0
  diagnosed = result["diagnostics"]
  assert diagnosed["plan"]["exact"] == {"rate": 0.2, "count": 4}
  assert diagnosed["check"]["own_rejected_match"]["mean"] == 25.0
  assert diagnosed["best_of_n"]["n"] == 2 and diagnosed["rate"]["own_spearman"] is None
  plots = seeds.write(result, tmp_path / "out")
  assert [p.name for p in plots] == ["own_vs_reference.png", "tts_gains.png"]
  assert (
    "| 3 | 7.00 [4.00, 10.00] | 14.00 [8.00, 20.00] | -7.00 [-10.00, -4.00] | 2 |"
    in (tmp_path / "out" / "seeds.md").read_text()
  )
  with pytest.raises(FileNotFoundError, match="no report"):
    seeds.combine([tmp_path / "missing"])


@pytest.mark.slow
def test_training_draws_the_strategies_rows_by_their_fractions(setting, monkeypatch):
  bench, model, _ = setting
  drawn = []
  sample = tiny_train.StrategyRows.sample

  def recording(self, kind, rng):
    drawn.append(kind)
    return sample(self, kind, rng)

  monkeypatch.setattr(tiny_train.StrategyRows, "sample", recording)
  config = tiny_train.TrainConfig(
    steps=2,
    batch_size=8,
    max_length=1280,
    unconditional_fraction=0.0,
    plan_fraction=0.4,
    check_fraction=0.3,
    rate_fraction=0.3,
  )
  losses = tiny_train.train(model, bench, config)
  assert len(losses) == 2 and np.isfinite(losses).all()
  assert len(drawn) == 16 and set(drawn) == {"plan", "check", "rate"}
