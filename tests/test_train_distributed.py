"""Two local processes with `jax.distributed` on CPU train a sharded step through the loop.

Each process owns 4 CPU devices; the mesh spans all 8 (data 2 x fsdp 2 x tensor 2), each process
feeds its half of the global batch, and the checkpoint is written by both. The final parameters
must equal a single-process run over 8 local devices on the same global batches.
"""

from __future__ import annotations

import socket
import subprocess
import sys

import numpy as np
import pytest
from _checkout import REPO, checkout_env

WORKER = r"""
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")
from ml_collections import ConfigDict
from drivekd_jax.train import distributed
port, pid, workdir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(ConfigDict(dict(coordinator_address=f"127.0.0.1:{port}",
                                       num_processes=2, process_id=pid)))
assert jax.process_count() == 2 and jax.device_count() == 8, (jax.process_count(),
                                                               jax.device_count())
sys.path.insert(0, os.path.join(os.getcwd(), "tests"))
import numpy as np
import test_train_loop as loop_test
from jax.experimental import multihost_utils
result = loop_test.run_two_process_half(workdir, pid)
leaves = [np.asarray(multihost_utils.process_allgather(x, tiled=True))
          for x in jax.tree.leaves(result.state["params"])]
if pid == 0:
  np.savez(os.path.join(workdir, "params.npz"), *leaves)
print("worker", pid, "done at step", result.step, flush=True)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
  port = _free_port()
  env = checkout_env()  # the workers import this checkout's code
  env.pop("XLA_FLAGS", None)
  workdir = tmp_path / "two"
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", WORKER, str(port), str(pid), str(workdir)],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for pid in (0, 1)
  ]
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outputs.append(out)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-5000:]
  assert (workdir / "checkpoints").is_dir()

  import test_train_loop as loop_test

  reference = loop_test.run_two_process_half(str(tmp_path / "one"), None)
  got = np.load(workdir / "params.npz")
  ref_leaves = [np.asarray(x) for x in __import__("jax").tree.leaves(reference.state["params"])]
  assert len(got.files) == len(ref_leaves)
  for i, leaf in enumerate(ref_leaves):
    np.testing.assert_allclose(got[f"arr_{i}"], leaf, rtol=1e-5, atol=1e-6)
