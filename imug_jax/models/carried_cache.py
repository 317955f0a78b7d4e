"""What every in-process unified model that carries one KV cache across turns shares.

A model of this kind keeps, for its conditional rows, the prompt items already in the cache
(`_committed()`, one per cache slot in `self.slots`) and, on a new turn, keeps the longest shared
prefix and rolls the rest back (`_rollback`); prompts are fed in chunks padded to a few buckets
(`_bucket`), so no turn retraces. Subclasses provide `config` (`num_samples`, `cache_length`,
`chunk_buckets`), `rows`, `cache`, `slots`, `_lock`, `_committed()` and
`_respond(history, output_mode, temperature, rng)`, and may set a `token_budget`
(`protocol.TokenBudget`) that `respond_batch` checks before any tokenizing.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from imug_jax.models import protocol
from imug_jax.models.protocol import Message, ModelError, Response


class CarriedCacheModel(abc.ABC):
  """Mixin: rollback, chunk buckets and the `UnifiedModel` entry points (module docstring)."""

  token_budget: protocol.TokenBudget | None = None

  @abc.abstractmethod
  def _committed(self) -> list:
    """The prompt items the conditional rows hold, in order (one per slot of `self.slots`)."""

  def _rollback(self, keep: int) -> None:
    """Keeps the first `keep` committed items; later slots become free; unconditional rows empty.

    Runs eagerly on a few small arrays; shapes never change, so no jitted turn retraces.
    """
    length = self.slots[keep - 1] + 1 if keep else 0
    n = self.config.num_samples
    slot = jnp.arange(self.config.cache_length)
    row = jnp.arange(self.rows)[:, None]
    key_mask = self.cache.key_mask & (slot[None] < length) & (row < n)
    next_position = jnp.where(jnp.arange(self.rows) < n, keep, 0).astype(jnp.int32)
    self.cache = self.cache.replace(
      key_mask=key_mask, length=jnp.asarray(length, jnp.int32), next_position=next_position
    )
    del self._committed()[keep:], self.slots[keep:]

  def _bucket(self, length: int) -> int:
    for bucket in self.config.chunk_buckets:
      if length <= bucket:
        return bucket
    raise ModelError(
      f"a chunk of {length} tokens exceeds the largest bucket {self.config.chunk_buckets[-1]}"
    )

  def respond(
    self, history: Sequence[Message], output_mode: str, temperature: float = 0.7, rng: Any = None
  ) -> Response:
    return self.respond_batch(history, output_mode, temperature, rng)[0]

  def respond_batch(
    self, history: Sequence[Message], output_mode: str, temperature: float = 0.7, rng: Any = None
  ) -> list[Response]:
    """`num_samples` answers to the same history, decoded as one batch."""
    if output_mode not in protocol.OUTPUT_MODES:
      raise ValueError(f"output_mode must be one of {protocol.OUTPUT_MODES}, got {output_mode!r}")
    rng = jax.random.key(0) if rng is None else rng
    if self.token_budget is not None:
      self.token_budget.check(history)  # Before any tokenizing: what cannot fit costs nothing.
    with self._lock:
      return self._respond(list(history), output_mode, float(temperature), rng)
