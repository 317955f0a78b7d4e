"""Why a test-time-scaling strategy helps or not: the model's plans, checks and ratings measured
against the synthetic benchmark's exact ground truth.

On every image turn of the evaluated samples, after the ground-truth history (so that each turn
is asked in the context the model was trained on), the model is asked what the strategies ask it,
through the wrappers' own methods, and each answer is compared with the oracle's:

  plan    `ChainOfThought.plan` against `synthetic.plan_text` of the target (exact match);
  check   `SelfVerification.accepts` on the target (should say YES), on one wrong candidate of
          each kind of `tiny_train.wrong_candidate` (should say NO) and on the model's own first
          candidate (YES only for an exact image);
  rate    `SelfVerifier.score` on the same candidates against `tiny_train.rate_label`;
  best-of-N  `BestOfN.choose` on N own candidates: the oracle match of the candidate picked,
          of a random one (their mean) and of the best one (what a perfect verifier would pick).

A strategy's gain can only come from these: a plan that is wrong, a check that says YES to
everything, or ratings that do not follow the oracle's explain a gain of zero or less.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from imug_jax.data import release as release_lib
from imug_jax.data import synthetic
from imug_jax.judges import oracle as oracle_lib
from imug_jax.models import image_tokenizer as itok
from imug_jax.models import tiny_train
from imug_jax.models.protocol import ModelError, UnifiedModel
from imug_jax.tts import verifiers, wrappers


def _lattice(image: bytes | None) -> np.ndarray | None:
  return None if image is None else oracle_lib.lattice_tokens(itok.read_image(image))


def _rate(values: Sequence[bool]) -> dict[str, Any]:
  return {"rate": round(float(np.mean(values)), 4) if values else None, "count": len(values)}


def _spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
  """Rank correlation (average ranks for ties); None when either side is constant."""
  if len(a) < 2:
    return None

  def ranks(values):
    values = np.asarray(values, float)
    order = np.argsort(values, kind="stable")
    result = np.empty(len(values))
    result[order] = np.arange(len(values))
    for value in np.unique(values):
      result[values == value] = result[values == value].mean()
    return result

  ra, rb = ranks(a), ranks(b)
  if ra.std() == 0 or rb.std() == 0:
    return None
  return round(float(np.corrcoef(ra, rb)[0, 1]), 4)


def diagnose(
  model: UnifiedModel,
  bench: release_lib.Release,
  *,
  samples: Sequence | None = None,
  temperature: float = 0.7,
  n: int = 4,
  batch_model: UnifiedModel | None = None,
  seed: int = 0,
) -> dict[str, Any]:
  """The diagnostics of the module docstring on `samples` (default: all) of a synthetic `bench`.

  Args:
    model: the unified model (answers the plan, check and rate questions).
    bench: the synthetic benchmark (its ground truth is read).
    temperature: sampling temperature of plans and own candidates (the rollouts').
    n, batch_model: best-of-N's candidates, and the model that samples them as one batch.
    seed: the key of all sampling; wrong candidates use `numpy.random.default_rng(seed)`.

  Returns:
    {"plan": {"exact": {rate, count}}, "check": {"target": YES rate, "wrong/<kind>": NO rate,
    "own": accuracy, "own_accepted_match", "own_rejected_match"}, "rate": {"<candidate>":
    {"mean_rating", "mean_label", "exact"}, "own_spearman"}, "best_of_n": {"picked", "random",
    "best"} (mean oracle match x 100), "turns": image turns asked}.
  """
  judge = oracle_lib.OracleJudge(bench.data_dir)
  sampler = batch_model or model
  cot = wrappers.ChainOfThought(model)
  verify = wrappers.SelfVerification(model)
  rater = verifiers.SelfVerifier(model)
  best_of_n = wrappers.BestOfN(sampler, n=n, verifier=verifiers.SelfVerifier(sampler))
  rng = np.random.default_rng(seed)
  key = jax.random.key(seed)
  plans, checks, ratings = [], {}, {}
  own_spearman_pairs: list[tuple[list[float], list[float]]] = []
  own_matches = {"accepted": [], "rejected": []}
  picked, random_pick, best = [], [], []
  turns = 0
  for sample in samples if samples is not None else bench.samples or ():
    history, targets = [], {}
    for task in sample.tasks:
      if task.modality == "image":
        targets[task.turn] = judge.target(sample.key, task.turn)
    for message, turn in tiny_train.ground_truth_messages(bench, sample):
      if message["role"] == "assistant" and turn in targets:
        turns += 1
        target = targets[turn]
        others = [v for t, v in targets.items() if t != turn]
        asked = 2 * (1 + len(tiny_train.WRONG_KINDS)) + 1  # Check and rate each, then own.
        key, plan_key, own_key, *ask_keys = jax.random.split(key, 3 + asked)
        asks = iter(ask_keys)
        try:
          plan = cot.plan(history, temperature, plan_key)
          plans.append(plan.strip() == synthetic.plan_text(sample.key.subdomain, target))
          candidates = {"target": target}
          for kind in tiny_train.WRONG_KINDS:
            candidates[f"wrong/{kind}"] = tiny_train.wrong_candidate(kind, target, others, rng)
          for name, candidate in candidates.items():
            png = itok.png_bytes(synthetic.TOKENIZER.decode(candidate.reshape(-1)))
            said_yes = verify.accepts(history, png, next(asks))
            checks.setdefault(name, []).append(
              said_yes == (tiny_train.check_label(target, candidate) == tiny_train.YES)
            )
            rating = rater.score(history, png, next(asks))
            ratings.setdefault(name, []).append(
              (rating, float(tiny_train.rate_label(target, candidate)))
            )
          own, scores, index = best_of_n.choose(history, temperature, own_key)
          own_tokens = [_lattice(c.image) for c in own]
          matches = [0.0 if t is None else oracle_lib.patch_match(target, t) for t in own_tokens]
          picked.append(matches[index])
          random_pick.append(float(np.mean(matches)))
          best.append(max(matches))
          own_spearman_pairs.append((scores, matches))
          first = own[0].image
          accepted = verify.accepts(history, first, next(asks))
          checks.setdefault("own", []).append(accepted == (matches[0] == 1.0))
          own_matches["accepted" if accepted else "rejected"].append(matches[0])
          for score, match in zip(scores, matches):
            ratings.setdefault("own", []).append((score, float(tiny_train.rating_digit(match))))
        except ModelError as error:
          raise ModelError(f"diagnostics on sample {sample.key} turn {turn}: {error}") from error
      history.append(message)
  pairs = [p for s, m in own_spearman_pairs for p in zip(s, m)]
  return {
    "turns": turns,
    "plan": {"exact": _rate(plans)},
    "check": {
      **{name: _rate(values) for name, values in checks.items()},
      "own_accepted_match": _mean_percent(own_matches["accepted"]),
      "own_rejected_match": _mean_percent(own_matches["rejected"]),
    },
    "rate": {
      **{
        name: {
          "mean_rating": round(float(np.mean([r for r, _ in values])), 3),
          "mean_label": round(float(np.mean([label for _, label in values])), 3),
          "exact": round(float(np.mean([r == label for r, label in values])), 4),
          "count": len(values),
        }
        for name, values in ratings.items()
      },
      "own_spearman": _spearman([s for s, _ in pairs], [m for _, m in pairs]),
    },
    "best_of_n": {
      "n": n,
      "picked": _mean_percent(picked),
      "random": _mean_percent(random_pick),
      "best": _mean_percent(best),
    },
  }


def _mean_percent(values: Sequence[float]) -> dict[str, Any]:
  """Mean oracle match in percent (the image score's unit) and the count."""
  return {
    "mean": round(100 * float(np.mean(values)), 2) if values else None,
    "count": len(values),
  }


def markdown(result: dict[str, Any]) -> list[str]:
  """The diagnostics as report.md lines."""
  check, rate, bon = result["check"], result["rate"], result["best_of_n"]
  names = [k for k in check if not k.startswith("own_")]
  lines = [
    "",
    "## Test-time scaling diagnostics (held-out image turns, ground-truth history, oracle)",
    "",
    f"- Image turns asked: {result['turns']}. Plans equal to the target's exact description: "
    f"{_fmt_rate(result['plan']['exact'])}.",
    f"- Best-of-{bon['n']} on the model's own candidates (mean oracle image score, %): picked by "
    f"its self-rating {_fmt_mean(bon['picked'])}, a random candidate {_fmt_mean(bon['random'])}, "
    f"the oracle's best {_fmt_mean(bon['best'])}; rank correlation of self-ratings with the "
    "oracle "
    + (
      f"{rate['own_spearman']:.2f}."
      if rate["own_spearman"] is not None
      else "undefined (the self-ratings, or the oracle's scores, are all equal)."
    ),
    f"- Self-verification of its own first candidate: oracle score of those it accepted "
    f"{_fmt_mean(check['own_accepted_match'])} (n={check['own_accepted_match']['count']}), "
    f"rejected {_fmt_mean(check['own_rejected_match'])} "
    f"(n={check['own_rejected_match']['count']}).",
    "",
    "| Candidate | YES/NO correct | Mean self-rating | Mean oracle digit | Rating exact |",
    "| --- | ---: | ---: | ---: | ---: |",
  ]
  for name in names:
    r = rate.get(name)
    lines.append(
      f"| {name} | {_fmt_rate(check[name])} | "
      + (
        f"{r['mean_rating']:.2f} | {r['mean_label']:.2f} | {100 * r['exact']:.1f}% |"
        if r
        else "- | - | - |"
      )
    )
  return lines


def _fmt_rate(entry: dict[str, Any]) -> str:
  return "-" if entry["rate"] is None else f"{100 * entry['rate']:.1f}% (n={entry['count']})"


def _fmt_mean(entry: dict[str, Any]) -> str:
  return "-" if entry["mean"] is None else f"{entry['mean']:.1f}"
