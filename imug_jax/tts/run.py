"""Rollouts of test-time-scaling variants of a model, next to its baseline rollout.

Each strategy's run is a model folder `<baseline>+<suffix>` in the same outputs root (e.g.
`tiny_umm+cot`, `tiny_umm+verify`, `tiny_umm+bon4-self`), so `imug_jax.report` pairs it with the
baseline run `<baseline>` and reports the gain per turn and overall.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from imug_jax.data.schema import Sample
from imug_jax.judges.base import Judge
from imug_jax.models.protocol import UnifiedModel
from imug_jax.rollout import runner
from imug_jax.tts import verifiers, wrappers


def build_wrappers(
  model: UnifiedModel,
  strategies: Sequence[str],
  *,
  rounds: int = 2,
  n: int = 4,
  verifier: str = "self",
  judge: Judge | None = None,
  batch_model: UnifiedModel | None = None,
) -> list[UnifiedModel]:
  """The wrapped models for `strategies` ("cot", "verify", "bon").

  Args:
    rounds: self-verification regenerations at most.
    n, verifier: best-of-N candidates and their verifier, "self" (the model) or "judge".
    judge: the judge for `verifier="judge"`.
    batch_model: the same model built to sample N answers per call (e.g. the tiny model with
      `num_samples=n`) for best-of-N; default `model`.
  """
  built = []
  for strategy in strategies:
    if strategy == "cot":
      built.append(wrappers.ChainOfThought(model))
    elif strategy == "verify":
      built.append(wrappers.SelfVerification(model, rounds=rounds))
    elif strategy == "bon":
      sampler = batch_model or model
      if verifier == "self":
        chosen = verifiers.SelfVerifier(sampler)
      elif verifier == "judge":
        if not isinstance(judge, Judge):
          raise ValueError(
            "best-of-N with verifier='judge' needs a chat judge (openai or local); the oracle "
            "judge knows the ground truth, so a model may not consult it"
          )
        chosen = verifiers.JudgeVerifier(judge)
      else:
        raise ValueError(f"best-of-N verifier must be 'self' or 'judge', got {verifier!r}")
      wrapped = wrappers.BestOfN(sampler, n=n, verifier=chosen)
      wrapped.name = f"{model.name}+{wrapped.suffix}"
      built.append(wrapped)
    else:
      raise ValueError(f"unknown test-time scaling strategy {strategy!r}; use cot, verify, bon")
  return built


def rollout_strategies(
  models: Sequence[UnifiedModel],
  samples: Sequence[Sample],
  *,
  images_dir: str | Path,
  out_dir: str | Path,
  **rollout_kwargs: Any,
) -> dict[str, runner.RolloutSummary]:
  """Rolls out each wrapped model into `<out_dir>/<wrapped.name>` (resumable, like the baseline)."""
  return {
    m.name: runner.run_rollout(
      m, samples, images_dir=images_dir, out_dir=out_dir, model_name=m.name, **rollout_kwargs
    )
    for m in models
  }
