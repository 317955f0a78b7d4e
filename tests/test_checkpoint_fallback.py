"""A corrupt newest checkpoint: restore falls back to the newest step that restores."""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drivekd_jax.train import checkpoint as ckpt_lib

RNG = jax.random.key(0)


def _state(step: int) -> dict:
  return {"w": jnp.arange(4.0) * step, "step": jnp.asarray(step)}


def _abstract():
  return jax.eval_shape(lambda: _state(0)), jax.eval_shape(lambda: RNG)


def _saved(directory, steps=(1, 2, 3)):
  with ckpt_lib.Checkpointer(str(directory), save_interval_steps=1, async_save=False) as c:
    for step in steps:
      c.save(step, _state(step), rng=RNG)
  return directory


def _remove_metadata(directory, step):
  os.remove(os.path.join(directory, str(step), "state", "_METADATA"))


def _truncate_data(directory, step):
  state_dir = os.path.join(directory, str(step), "state")
  for root, _, files in os.walk(state_dir):
    for name in files:
      if os.path.basename(root) == "d":  # The array data files.
        with open(os.path.join(root, name), "r+b") as file:
          file.truncate(3)


@pytest.mark.parametrize("corrupt", [_remove_metadata, _truncate_data])
def test_restore_falls_back_and_keeps_the_bad_step(tmp_path, caplog, corrupt):
  directory = _saved(tmp_path / "ckpt")
  corrupt(directory, 3)
  with (
    caplog.at_level(logging.WARNING),
    ckpt_lib.Checkpointer(str(directory), save_interval_steps=1, async_save=False) as c,
  ):
    restored = c.restore_latest(*_abstract())
    assert restored.step == 2
    np.testing.assert_array_equal(restored.state["w"], np.arange(4.0) * 2)
    assert c.latest_step() == 2
    # The run can save step 3 again (the bad copy no longer blocks it).
    assert c.save(3, _state(3), rng=RNG, force=True)
  warned = " ".join(record.getMessage() for record in caplog.records)
  assert "checkpoint step 3" in warned and "does not restore" in warned
  aside = directory / ckpt_lib.UNRESTORABLE / "3"
  assert restored.skipped == (str(aside),) and aside.is_dir()  # Moved aside, never deleted.
  with ckpt_lib.Checkpointer(str(directory), async_save=False) as c:
    assert c.restore_latest(*_abstract()).step == 3


def test_no_restorable_step_names_every_step(tmp_path):
  directory = _saved(tmp_path / "ckpt", steps=(1, 2))
  for step in (1, 2):
    _remove_metadata(directory, step)
  with (
    ckpt_lib.Checkpointer(str(directory), async_save=False) as c,
    pytest.raises(ckpt_lib.NoRestorableCheckpointError, match="step 2: .*step 1: "),
  ):
    c.restore_latest(*_abstract())
  assert sorted(os.listdir(directory)) == ["1", "2"]  # Nothing moved when nothing restores.
  with ckpt_lib.Checkpointer(str(tmp_path / "empty"), async_save=False) as c:
    assert c.restore_latest(*_abstract()) is None


def test_partial_restore_of_the_newest_good_step(tmp_path):
  directory = _saved(tmp_path / "ckpt")
  _truncate_data(directory, 3)
  step, tree = ckpt_lib.restore_partial_latest(str(directory), {"w": _abstract()[0]["w"]})
  assert step == 2 and np.asarray(tree["w"]).tolist() == [0.0, 2.0, 4.0, 6.0]
  assert (directory / "3").is_dir()  # Read-only: nothing moved.
  assert ckpt_lib.restore_partial_latest(str(tmp_path / "none"), {}) is None
  assert ckpt_lib.PREEMPTED_EXIT_CODE == 143
