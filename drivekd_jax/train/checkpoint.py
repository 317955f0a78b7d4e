"""Orbax checkpoints of the train state, the data-iterator state, the RNG and run metadata.

One step folder holds four items:
  state: the train state pytree (`ocp.args.StandardSave`; typed PRNG keys stored as key data),
  rng:   the run's base key data,
  data:  the input iterator's state (JSON),
  meta:  run metadata (JSON: step, config summary, counters).
Teachers are never part of the state handed to `save`, so they never reach the disk.

`PreemptionGuard` turns SIGTERM into a flag the training loop polls; the loop then saves and
returns, so a new launch in the same workdir resumes from that step; `PREEMPTED_EXIT_CODE` (143,
128 + SIGTERM) is the exit status that tells a scheduler the run was preempted, not finished.

`Checkpointer.restore_latest` restores the newest step that restores: a step that fails (a
truncated file, a missing `_METADATA`, a half-written save) is named in a warning and moved aside
to `<directory>/unrestorable/<step>` (never deleted), so that the run can save that step again,
and the next older step is tried.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging as std_logging
import os
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


def _is_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def keys_to_data(tree: Any) -> Any:
  """Replaces typed PRNG key leaves (arrays or ShapeDtypeStructs) by their uint32 key data."""

  def one(x):
    if not _is_key(x):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):
      return jax.eval_shape(jax.random.key_data, x)
    return jax.random.key_data(x)

  return jax.tree.map(one, tree)


def _key_impl(x: Any) -> Any:
  # ShapeDtypeStructs carry the implementation only on their key dtype.
  return x.dtype._impl if isinstance(x, jax.ShapeDtypeStruct) else jax.random.key_impl(x)


def data_to_keys(tree: Any, like: Any) -> Any:
  """Inverse of `keys_to_data`: rewraps key data where `like` holds typed keys."""

  def one(x, ref):
    if _is_key(ref):
      return jax.random.wrap_key_data(x, impl=_key_impl(ref))
    return x

  return jax.tree.map(one, tree, like)


def _is_empty(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype") and 0 in tuple(x.shape)


def _without_empty(tree: Any) -> Any:
  """`tree` with zero-size arrays as None: Orbax refuses to write them (an AGP state with no
  capability holds an empty order); they carry no data and come back from their abstract form."""
  return jax.tree.map(lambda x: None if _is_empty(x) else x, tree)


def _with_empty(restored: Any, target: Any) -> Any:
  """Puts the zero-size arrays of `target` (ShapeDtypeStructs) back into `restored`."""

  def one(value, abstract):
    if value is None and _is_empty(abstract):
      return jax.device_put(np.zeros(abstract.shape, abstract.dtype), abstract.sharding)
    return value

  return jax.tree.map(one, restored, target, is_leaf=lambda x: x is None)


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs with shardings for a concrete or abstract tree."""

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return ocp.utils.to_shape_dtype_struct(x)

  return jax.tree.map(one, tree)


def _json_safe_data_state(data_state: Any) -> Any:
  """Grain iterators return bytes (DataLoader) or dicts (dataset iterators); store either."""
  if data_state is None:
    return {"kind": "none"}
  if isinstance(data_state, bytes):
    return {"kind": "bytes", "value": base64.b64encode(data_state).decode("ascii")}
  return {"kind": "json", "value": json.loads(json.dumps(data_state))}


def _from_json_data_state(stored: Any) -> Any:
  kind = stored.get("kind")
  if kind == "none":
    return None
  if kind == "bytes":
    return base64.b64decode(stored["value"])
  return stored["value"]


PREEMPTED_EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a SIGTERM death.
UNRESTORABLE = "unrestorable"


class NoRestorableCheckpointError(RuntimeError):
  """Checkpoints exist, but none of them restores; the message names each step and its error."""


@dataclasses.dataclass
class Restored:
  """A restored step; `skipped` names the newer steps that failed and were moved aside."""

  step: int
  state: Any
  rng: jax.Array
  data_state: Any
  metadata: dict
  skipped: tuple[str, ...] = ()


class Checkpointer:
  """A CheckpointManager with the train state, RNG, iterator state and metadata items.

  Args:
    directory: absolute (or made absolute) folder for step subfolders.
    save_interval_steps: periodic saves every this many steps (`save(..., force=True)` ignores it).
    max_to_keep: keep the newest N checkpoints.
    async_save: write in a background thread; the loop continues meanwhile.
  """

  def __init__(
    self,
    directory: str,
    *,
    save_interval_steps: int = 100,
    max_to_keep: int = 3,
    async_save: bool = True,
  ):
    self.directory = os.path.abspath(directory)
    self._interval = max(1, int(save_interval_steps))
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=max(1, int(save_interval_steps)),
      max_to_keep=max_to_keep,
      create=True,
      enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "rng", "data", "meta")
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(
    self,
    step: int,
    state: Any,
    *,
    rng: jax.Array,
    data_state: Any = None,
    metadata: dict | None = None,
    force: bool = False,
  ) -> bool:
    """Starts saving `step` if due (or forced); returns whether a save was started."""
    if self._manager.latest_step() is not None and step <= self._manager.latest_step():
      return False
    if not force and step % self._interval:
      return False
    meta = {"step": int(step), **(metadata or {})}
    rng_data = jax.random.key_data(rng) if _is_key(rng) else rng
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(_without_empty(keys_to_data(state))),
      rng=ocp.args.StandardSave({"key_data": rng_data}),
      data=ocp.args.JsonSave(_json_safe_data_state(data_state)),
      meta=ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))),
    )
    saved = self._manager.save(step, args=args, force=force)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, step: int, abstract_state: Any, abstract_rng: Any) -> Restored:
    """Restores `step` with the shardings carried by the abstract state and rng."""
    target = _abstract(keys_to_data(abstract_state))
    rng_target = _abstract({"key_data": keys_to_data(abstract_rng)})
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_without_empty(target)),
        rng=ocp.args.StandardRestore(rng_target),
        data=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore(),
      ),
    )
    state = data_to_keys(_with_empty(restored.state, target), abstract_state)
    rng = restored.rng["key_data"]
    if _is_key(abstract_rng):
      rng = jax.random.wrap_key_data(rng, impl=_key_impl(abstract_rng))
    return Restored(
      step=int(step),
      state=state,
      rng=rng,
      data_state=_from_json_data_state(restored.data),
      metadata=dict(restored.meta),
    )

  def restore_latest(self, abstract_state: Any, abstract_rng: Any) -> Restored | None:
    """Restores the newest step that restores; None when there is no checkpoint at all.

    Each newer step that fails is named in a warning and moved to `<directory>/unrestorable/`
    (see `set_aside`), never deleted.

    Raises:
      NoRestorableCheckpointError: steps exist but none restores (each step's error is named).
    """
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        restored = self.restore(step, abstract_state, abstract_rng)
      except Exception as error:  # Orbax and tensorstore raise many kinds for a broken step.
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        logging.warning(
          "checkpoint step %d in %s does not restore (%s); trying an older step",
          step,
          self.directory,
          reason,
        )
        failures.append((step, reason))
        continue
      moved = tuple(self.set_aside(bad) for bad, _ in failures)
      for bad, where in zip((b for b, _ in failures), moved):
        logging.warning("checkpoint step %d moved aside to %s (kept, not deleted)", bad, where)
      restored.skipped = moved
      return restored
    if not failures:
      return None
    listed = "; ".join(f"step {step}: {reason}" for step, reason in failures)
    raise NoRestorableCheckpointError(
      f"no checkpoint in {self.directory} restores ({listed}); the steps are left in place"
    )

  def set_aside(self, step: int) -> str:
    """Moves step folder `step` to `<directory>/unrestorable/<step>[.<time>]`; returns the path.

    Only process 0 moves it (the others wait for it), then every process forgets the step.
    """
    aside_dir = os.path.join(self.directory, UNRESTORABLE)
    target = os.path.join(aside_dir, str(step))
    if os.path.exists(target):
      target += time.strftime(".%Y%m%d-%H%M%S")
    if jax.process_index() == 0:
      os.makedirs(aside_dir, exist_ok=True)
      os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class PreemptionGuard:
  """Records SIGTERM (and optionally SIGINT) as a stop request instead of dying mid-step.

  Use as a context manager around the training loop; the previous handlers come back on exit.
  In multi-process runs `should_stop` agrees across processes (any process asked to stop).
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
    self._signals = signals
    self._previous: dict[int, Any] = {}
    self._event = threading.Event()
    self.signal_name: str | None = None

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name
    self._event.set()

  def request_stop(self) -> None:
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def should_stop(self) -> bool:
    local = self._event.is_set()
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils

    flags = multihost_utils.process_allgather(np.array([local], np.int32))
    return bool(np.asarray(flags).any())

  def __enter__(self) -> PreemptionGuard:
    if threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


def restore_partial(directory: str, step: int, target: Any, item: str = "state") -> Any:
  """Restores only the subtrees present in `target` from one item of a step.

  Args:
    directory: the checkpoint folder (as given to `Checkpointer`).
    step: the step to read.
    target: a nested dict of abstract arrays (ShapeDtypeStructs with shardings) mirroring part of
      the saved tree, e.g. `{"params": {"student": abstract_nnx_state}}`.
    item: the item name ("state").

  Returns:
    `target` with arrays in place of the abstract leaves.
  """
  path = os.path.join(os.path.abspath(directory), str(step), item)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint item {item!r} for step {step} at {path}")
  target = _abstract(target)
  restore_args = ocp.checkpoint_utils.construct_restore_args(target)
  with ocp.PyTreeCheckpointer() as checkpointer:
    return checkpointer.restore(
      path,
      args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True),
    )


def restore_partial_latest(
  directory: str, target: Any, item: str = "state"
) -> tuple[int, Any] | None:
  """`restore_partial` of the newest step that restores; (step, tree), or None without steps.

  Read-only (for evaluation): a step that fails is named in a warning and left where it is.

  Raises:
    NoRestorableCheckpointError: steps exist but none restores.
  """
  directory = os.path.abspath(directory)
  steps = (
    sorted((int(name) for name in os.listdir(directory) if name.isdigit()), reverse=True)
    if os.path.isdir(directory)
    else []
  )
  failures = []
  for step in steps:
    try:
      return step, restore_partial(directory, step, target, item)
    except Exception as error:  # Orbax and tensorstore raise many kinds for a broken step.
      reason = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
      logging.warning("checkpoint step %d in %s does not restore (%s)", step, directory, reason)
      failures.append(f"step {step}: {reason}")
  if not failures:
    return None
  raise NoRestorableCheckpointError(
    f"no checkpoint in {directory} restores ({'; '.join(failures)})"
  )


class _DropOrbaxInfo(std_logging.Filter):
  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def quiet_orbax_info_logs() -> None:
  """Drops Orbax's INFO lines (several per save) from the absl log; warnings still show."""
  from absl import logging as absl_logging

  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DropOrbaxInfo) for f in handler.filters):
    handler.addFilter(_DropOrbaxInfo())
