"""The training loop: mesh equivalence, non-finite skips, SIGTERM + resume bit-identity.

The step here trains a tiny real `Decoder` with next-token CE (the Drive-KD step needs teachers
and images; these properties belong to the loop, the sharding and the checkpoints). Run as a
script (`python tests/test_train_loop.py WORKDIR NUM_STEPS`) it is the subprocess that the
SIGTERM test interrupts.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # the subprocess: same fake devices as the suite
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _checkout import REPO, checkout_env
from flax import nnx

from drivekd_jax.distill import losses
from drivekd_jax.models.config import DecoderConfig
from drivekd_jax.models.qwen2 import Decoder
from drivekd_jax.train import loop as loop_lib
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.optimizer import OptimizerSettings, build_optimizer

CONFIG = DecoderConfig(
  vocab_size=64, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=32
)
BATCH, LENGTH = 8, 8


def make_data(seed: int = 0, nan_at: int | None = None):
  """A grain iterator of token batches (dicts of numpy), checkpointable."""

  def example(i):
    rng = np.random.default_rng(i)
    ids = rng.integers(0, CONFIG.vocab_size, LENGTH).astype(np.int32)
    return {"input_ids": ids, "labels": ids, "attention_mask": np.ones(LENGTH, bool)}

  def scale(index, batch):
    value = np.nan if index == nan_at else 1.0
    return {**batch, "scale": np.full((BATCH,), value, np.float32)}

  ds = grain.MapDataset.range(10_000).shuffle(seed=seed).map(example).batch(BATCH)
  ds = ds.map_with_index(scale)
  return iter(ds.to_iter_dataset())


def make_experiment(mesh, opt_overrides=None):
  rules = sharding_lib.rules_from_config()
  model, _ = sharding_lib.create_sharded(lambda: Decoder(CONFIG, rngs=nnx.Rngs(0)), mesh, rules)
  graphdef, params = nnx.split(model)
  opt = dict(
    learning_rate=3e-2,
    warmup_steps=1,
    accumulation_steps=2,
    grad_clip_norm=1.0,
    **(opt_overrides or {}),
  )
  tx, _ = build_optimizer(OptimizerSettings(**opt), num_steps=20)
  param_shardings = jax.tree.map(lambda x: x.sharding, params)
  opt_state = jax.jit(
    tx.init,
    out_shardings=sharding_lib.optimizer_state_shardings(
      tx, jax.eval_shape(tx.init, params), param_shardings, mesh
    ),
  )(params)
  state = {"params": params, "opt_state": opt_state}
  shardings = jax.tree.map(lambda x: x.sharding, state)

  def step(state, batch, rng):
    del rng

    def loss_fn(params):
      out = nnx.merge(graphdef, params)(batch["input_ids"], attention_mask=batch["attention_mask"])
      return losses.cross_entropy(out.logits, batch["labels"]) * batch["scale"][0]

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    import optax

    return (
      {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state},
      {"loss": loss},
    )

  return rules, state, shardings, step


def train(
  workdir,
  mesh,
  num_steps,
  *,
  nan_at=None,
  max_nonfinite=10,
  progress=False,
  checkpoint_every=3,
  wrap_step=None,
  wrap_data=None,
):
  """`train_loop` on the toy experiment; `wrap_step` / `wrap_data` replace the step function and
  the data iterator by wrappers of them."""
  rules, state, shardings, step = make_experiment(mesh)
  data = make_data(nan_at=nan_at)
  settings = loop_lib.LoopSettings(
    num_steps=num_steps,
    log_every=1,
    checkpoint_every=checkpoint_every,
    max_consecutive_nonfinite=max_nonfinite,
    progress_bar=progress,
  )
  return loop_lib.train_loop(
    settings=settings,
    workdir=str(workdir),
    mesh=mesh,
    rules=rules,
    state=state,
    state_shardings=shardings,
    step_fn=step if wrap_step is None else wrap_step(step),
    data=data if wrap_data is None else wrap_data(data),
    rng=jax.random.key(0),
  )


def _flat_params(state):
  return [np.asarray(x) for x in jax.tree.leaves(state["params"])]


def _event_losses(workdir, tag="loss") -> list[float]:
  scalars = metrics_lib.read_scalars(str(Path(workdir) / "tensorboard"))
  return [value for _, value in scalars[tag]]


@pytest.mark.slow
def test_meshes_match_one_device(tmp_path):
  """Four steps (two updates) on 8-device meshes give the single-device losses and params."""
  one = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  ref = train(tmp_path / "one", one, 4)
  ref_losses = _event_losses(tmp_path / "one")
  assert len(ref_losses) == 4 and np.isfinite(ref_losses).all()
  for name, mesh_config in [
    ("data", {"data": 8}),
    ("fsdp", {"data": 2, "fsdp": 4}),
    ("tensor", {"data": 2, "tensor": 4}),
  ]:
    mesh = sharding_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1, **mesh_config})
    got = train(tmp_path / name, mesh, 4)
    np.testing.assert_allclose(_event_losses(tmp_path / name), ref_losses, rtol=1e-5)
    # Adam divides by sqrt(v): fp32 reduction-order noise in near-zero gradients shows up at
    # ~1e-4 of the learning rate (3e-2) in the parameters.
    for a, b in zip(_flat_params(ref.state), _flat_params(got.state)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    # Born sharded: kernels really are split across devices.
    kernel = got.state["params"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    axis = {"data": None, "fsdp": "fsdp", "tensor": "tensor"}[name]
    if axis:
      assert axis in str(kernel.sharding.spec), kernel.sharding


@pytest.mark.slow
def test_nonfinite_step_is_skipped_and_counted(tmp_path):
  """A NaN batch at step 2 leaves the state of step 1 and is counted; training goes on."""
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])
  one_step = train(tmp_path / "one", mesh, 1)
  nan_stop = train(tmp_path / "nan", mesh, 2, nan_at=1)
  assert nan_stop.nonfinite_total == 1
  for a, b in zip(jax.tree.leaves(nan_stop.state), jax.tree.leaves(one_step.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  skips = _event_losses(tmp_path / "nan", "nonfinite")
  assert skips == [0.0, 1.0]


def test_too_many_nonfinite_stops_with_last_good_checkpoint(tmp_path):
  mesh = sharding_lib.make_mesh({"data": 1}, devices=jax.devices()[:1])

  def nan_loss(step):
    def bad_step(state, batch, rng):
      new, metrics = step(state, batch, rng)
      return new, {"loss": metrics["loss"] * jnp.nan}

    return bad_step

  with pytest.raises(loop_lib.NonFiniteError, match="consecutive"):
    train(tmp_path, mesh, 10, max_nonfinite=3, checkpoint_every=1, wrap_step=nan_loss)
  assert (tmp_path / "checkpoints").is_dir()


@pytest.mark.slow
def test_sigterm_then_resume_is_bit_identical(tmp_path):
  num_steps = 12
  script = Path(__file__).resolve()
  env = checkout_env()  # the subprocess runs this checkout's code
  interrupted = tmp_path / "interrupted"
  proc = subprocess.Popen(
    [sys.executable, str(script), str(interrupted), str(num_steps), "0.4"],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 120
  ckpts = interrupted / "checkpoints"
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "stop requested (SIGTERM)" in out, out
  stopped_at = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
  assert 0 < stopped_at < num_steps, out
  resumed = subprocess.run(
    [sys.executable, str(script), str(interrupted), str(num_steps)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert f"resuming from checkpoint step {stopped_at}" in resumed.stdout + resumed.stderr

  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  straight = tmp_path / "straight"
  reference = train(straight, mesh, num_steps, wrap_data=lambda d: _Logged(d, straight))
  # The batches: the resumed run restarts the data exactly where the checkpoint left it.
  expected = _Logged.read(straight, 0)
  assert len(expected) == num_steps and len(set(expected)) == num_steps
  assert _Logged.read(interrupted, 0)[:stopped_at] == expected[:stopped_at]
  assert _Logged.read(interrupted, 1) == expected[stopped_at:]
  final = np.load(interrupted / "final_params.npz")
  ref_leaves = _flat_params(reference.state)
  assert len(final.files) == len(ref_leaves)
  for i, leaf in enumerate(ref_leaves):
    np.testing.assert_array_equal(final[f"p{i}"], leaf)


class _ProcessRows:
  """This process's rows of every global batch (the two-process test)."""

  def __init__(self, inner, process_index: int | None, process_count: int = 2):
    self.inner, self.index, self.count = inner, process_index, process_count

  def __next__(self):
    batch = next(self.inner)
    if self.index is None:
      return batch
    rows = BATCH // self.count
    return {k: v[self.index * rows : (self.index + 1) * rows] for k, v in batch.items()}

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def run_two_process_half(workdir: str, process_index: int | None, num_steps: int = 3):
  """Trains over all devices; with a process index, this process feeds half of each batch."""
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  return train(
    workdir,
    mesh,
    num_steps,
    checkpoint_every=2,
    wrap_data=lambda data: _ProcessRows(data, process_index),
  )


class _Slow:
  """Sleeps before every batch, so a signal lands mid-run (the SIGTERM test)."""

  def __init__(self, inner, delay: float):
    self.inner, self.delay = inner, delay

  def __next__(self):
    time.sleep(self.delay)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


class _Logged:
  """Appends a fingerprint of every batch taken to `WORKDIR/batches-<run>.txt`, one file per run
  (per `_Logged` made on that folder)."""

  def __init__(self, inner, workdir):
    self.inner = inner
    Path(workdir).mkdir(parents=True, exist_ok=True)
    run = len(list(Path(workdir).glob("batches-*.txt")))
    self.path = Path(workdir) / f"batches-{run}.txt"
    self.path.touch()

  def __next__(self):
    batch = next(self.inner)
    digest = hashlib.sha1(np.ascontiguousarray(batch["input_ids"]).tobytes()).hexdigest()
    with self.path.open("a") as f:
      f.write(digest[:16] + "\n")
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)

  @staticmethod
  def read(workdir, run: int) -> list[str]:
    return (Path(workdir) / f"batches-{run}.txt").read_text().split()


def _main(workdir: str, num_steps: int, step_delay: float = 0.0):
  mesh = sharding_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})

  def wrap(data):
    return _Logged(_Slow(data, step_delay) if step_delay else data, workdir)

  result = train(workdir, mesh, num_steps, checkpoint_every=2, wrap_data=wrap)
  if not result.preempted:
    leaves = _flat_params(result.state)
    np.savez(
      os.path.join(workdir, "final_params.npz"), **{f"p{i}": leaf for i, leaf in enumerate(leaves)}
    )


if __name__ == "__main__":
  from absl import logging as absl_logging

  absl_logging.set_verbosity(absl_logging.INFO)  # the loop's resume line is an info log
  _main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
