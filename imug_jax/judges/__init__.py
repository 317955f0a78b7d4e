"""Judges for IMUG-Bench scoring (and the DriveBench evaluation): one `chat` protocol, three kinds.

`make_judge(kind, ...)`:
  * "random": the seeded smoke-test judge (`seed`, default 2026).
  * "openai": an OpenAI-compatible endpoint, the project's one client
    (`drivekd_jax.eval.judge_client.OpenAIChatJudge`: `base_url`, `model`, `api_key_env`,
    `timeout_s`, `max_retries`, `concurrency`, `cache_dir`, `replay_only`); the key is read from
    the environment at call time.
  * "local": an in-process `UnifiedModel` (`model`, `structured`, `seed`).
"""

from __future__ import annotations

from typing import Any

from imug_jax.judges.base import ImagePart, Judge, JudgeError, JudgeReplyError


def make_judge(kind: str, **kwargs: Any) -> Judge:
  if kind == "random":
    from imug_jax.judges.random_judge import RandomJudge

    return RandomJudge(**kwargs)
  if kind == "openai":
    from drivekd_jax.eval.judge_client import OpenAIChatJudge

    return OpenAIChatJudge(**kwargs)
  if kind == "local":
    from imug_jax.judges.local import LocalModelJudge

    return LocalModelJudge(**kwargs)
  raise ValueError(f"unknown judge kind {kind!r}; expected 'random', 'openai' or 'local'")


__all__ = ["ImagePart", "Judge", "JudgeError", "JudgeReplyError", "make_judge"]
