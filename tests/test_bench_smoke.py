"""The two benchmarks behind the README's figures run end to end on their smallest settings.

Each runs as its users run it (`python -m ...`), on this checkout's code: it exits 0 and prints
the JAX / PyTorch ratio it exists for.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from _checkout import REPO, checkout_env


def _run_module(module: str, *args: str, timeout: int) -> str:
  proc = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    env=checkout_env(),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_decode_benchmark_prints_its_ratio():
  out = _run_module(
    "drivekd_jax.bench.decode",
    "--shapes=tiny",
    "--batch_sizes=1",
    "--new_tokens=4",
    "--prompt_len=4",
    "--repeats=1",
    "--torch_threads=1",
    timeout=600,
  )
  # Greedy decoding of the same weights: the ratio compares identical work.
  assert re.search(r"ratio\s+\d+\.\d+x\s+identical tokens 100%", out), out


@pytest.mark.slow
def test_distill_step_benchmark_prints_its_ratio():
  """Its one shape (the README's), one timed step per side: minutes on two cores."""
  out = _run_module("drivekd_jax.bench.distill_step", "--steps=1", timeout=1800)
  for variant in ("official", "best"):
    assert re.search(rf"jax/torch-{variant}: throughput x\d+\.\d+", out), out
  found = re.search(r"jax step: (\S+) matmul FLOPs \(HLO\) at \d+ GFLOP/s, (\d+)% of", out)
  assert found, out
  # The bench shapes' step: about 1.1e11 products (teacher and student forwards, four rows).
  assert 5e10 < float(found.group(1)) < 3e11 and 0 < int(found.group(2)) <= 150
