"""Deployment figures of Table 1: device memory, decode tokens/s and first-token latency.

`measure_generation(model, input_ids, pixel_values)` times the jitted sampler
(`models.sampling.Sampler`) on one fixed prompt:

* **first-token latency**: wall time from the prompt's ids (and images) to the first sampled
  token on the host: image encoding and embedding (`internvl.embed_inputs_jit`), prefill into a
  fresh KV cache, one sample; the median of `repeats` timed calls after a compiling call.
* **decode tokens/s**: from a prefilled cache (untimed), the sampler's next turn feeds the
  pending token and samples `new_tokens` tokens per row (no stop token, so exactly that many),
  one decoder step each: `batch * new_tokens / t_decode` (median).
* **memory**: the sum over the model's devices of their `peak_bytes_in_use` when the backend
  reports it (GPU, TPU; a process-wide peak since start, so measure in a fresh process to
  attribute it to one model); where it does not (CPU), the bytes of all live arrays right after
  generation on those devices (parameters, cache, outputs; each shard and replica counted),
  marked `memory_source="live_arrays"`.

The paper's hardware, batch size and serving stack are unknown, so these figures compare
models measured here with each other, not with the paper's.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from drivekd_jax.models.internvl import InternVL, embed_inputs_jit
from drivekd_jax.models.qwen2 import Decoder, KVCache
from drivekd_jax.models.sampling import GREEDY, Sampler, SamplingMethod

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Efficiency:
  """Table 1's deployment columns for one model, with how they were measured."""

  memory_gb: float
  memory_source: str  # "peak_bytes_in_use" or "live_arrays"
  tokens_per_s: float
  first_token_latency_s: float
  batch_size: int
  prompt_tokens: int
  new_tokens: int
  repeats: int
  devices: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)


def _median_time(
  fn: Callable[[Any], jax.Array],
  repeats: int,
  clock: Callable[[], float],
  setup: Callable[[], Any] = lambda: None,
) -> float:
  """Median wall time of `fn(setup())` over `repeats` calls (setup untimed), after one untimed
  call that compiles."""
  jax.block_until_ready(fn(setup()))
  times = []
  for _ in range(repeats):
    argument = jax.block_until_ready(setup())
    start = clock()
    jax.block_until_ready(fn(argument))
    times.append(clock() - start)
  return statistics.median(times)


def _model_devices(model) -> set:
  from flax import nnx

  devices = set()
  for leaf in jax.tree.leaves(nnx.state(model)):
    if isinstance(leaf, jax.Array):
      devices.update(leaf.devices())
  return devices


def device_memory_bytes(devices) -> tuple[int, str]:
  """(bytes, source): summed `peak_bytes_in_use` of `devices` if every one reports it, else the
  bytes of every live array shard held on them (replicas counted per device)."""
  peaks = []
  for device in devices:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if not stats or "peak_bytes_in_use" not in stats:
      peaks = None
      break
    peaks.append(int(stats["peak_bytes_in_use"]))
  if peaks:
    return sum(peaks), "peak_bytes_in_use"
  devices = set(devices)
  resident = sum(
    int(shard.data.nbytes)
    for x in jax.live_arrays()
    for shard in x.addressable_shards
    if shard.device in devices
  )
  return resident, "live_arrays"


def measure_generation(
  model: InternVL | Decoder,
  input_ids: np.ndarray | jax.Array,
  pixel_values: np.ndarray | jax.Array | None = None,
  *,
  new_tokens: int = 32,
  repeats: int = 3,
  method: SamplingMethod = GREEDY,
  attention_mask: np.ndarray | jax.Array | None = None,
  cache_sharding: KVCache | None = None,
  clock: Callable[[], float] = time.perf_counter,
) -> Efficiency:
  """Memory, decode tokens/s and first-token latency of `model` on one prompt (module docstring).

  Args:
    model: an `InternVL` (images through `pixel_values`) or a bare `Decoder`.
    input_ids: int `[B, L]` prompt, image-context ids expanded (InternVL).
    pixel_values: the prompt's images in either `InternVL.embed_inputs` layout, or None.
    new_tokens: tokens generated per row in the decode measurement.
    repeats: timed calls per measurement (the median is kept).
    method: greedy (default) or sampling settings.
    attention_mask: bool `[B, L]` (default all real).
    cache_sharding: shardings of the KV cache (as `sampling.Sampler` takes them) for a model
      sharded over several devices; None: the default device.
    clock: seconds (injectable for tests).

  Returns:
    An `Efficiency`.
  """
  if new_tokens < 1:
    raise ValueError(f"new_tokens must be >= 1, got {new_tokens}")
  input_ids = jnp.asarray(input_ids)
  batch, length = input_ids.shape
  if isinstance(model, InternVL):
    decoder = model.language_model
    pixels = None if pixel_values is None else jnp.asarray(pixel_values)

    def prompt() -> dict:
      return {"inputs_embeds": embed_inputs_jit(model, input_ids, pixels)}
  elif isinstance(model, Decoder):
    if pixel_values is not None:
      raise ValueError("a bare Decoder takes no pixel_values")
    decoder = model

    def prompt() -> dict:
      return {"input_ids": input_ids}
  else:
    raise TypeError(f"expected an InternVL or a Decoder, got {type(model).__name__}")

  cache_length = length + 2 + new_tokens
  first, decode = (
    Sampler(
      decoder,
      cache_length=cache_length,
      max_new_tokens=count,
      method=method,
      cache_sharding=cache_sharding,
    )
    for count in (1, new_tokens)
  )
  mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
  rng = jax.random.key(0)

  def prefill():
    return first.generate(**prompt(), attention_mask=mask, rng=rng)

  # Decoding alone: from a prefilled cache, feed the pending first token (and one dead slot),
  # then sample `new_tokens` tokens, one forward step each.
  dead_ids = jnp.zeros((batch, 1), jnp.int32)
  dead_mask = jnp.zeros((batch, 1), bool)

  def decode_from(state):
    return decode.continue_(state, dead_ids, attention_mask=dead_mask).tokens

  t_first = _median_time(lambda _: prefill().tokens, repeats, clock)
  t_decode = _median_time(decode_from, repeats, clock, setup=prefill)
  state = decode.continue_(prefill(), dead_ids, attention_mask=dead_mask)
  jax.block_until_ready(state.tokens)
  if int(jnp.min(state.num_tokens)) != new_tokens:
    raise AssertionError("a row stopped early: decode timing needs no stop tokens")
  devices = _model_devices(model)
  memory, source = device_memory_bytes(devices)
  kinds = sorted({f"{d.platform}:{d.device_kind}" for d in devices})
  return Efficiency(
    memory_gb=memory / GIB,
    memory_source=source,
    tokens_per_s=batch * new_tokens / t_decode,
    first_token_latency_s=t_first,
    batch_size=batch,
    prompt_tokens=length,
    new_tokens=new_tokens,
    repeats=repeats,
    devices=f"{len(devices)} x {', '.join(kinds)}",
  )
