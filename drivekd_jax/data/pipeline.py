"""The training input pipeline: records -> processed examples -> padded, bucketed batches.

    source (random access: a TFDS data source of driving records, or any Sequence of dicts)
      -> per-epoch seeded permutation of the whole source (the same on every process)
      -> global batch s = permuted positions [s*G, (s+1)*G), G = batch_size * process_count;
         process p takes rows [p*B, (p+1)*B) of it, so processes never overlap and every global
         batch is the same whatever the number of processes
      -> Processor (Drive-KD construction) -> pad to the smallest length bucket of the batch,
         image slots padded to `max_images`
      -> grain: a `MapDataset` of examples, built by `num_threads` threads, batched in order
         -> `DatasetIterator` (get_state / set_state for checkpoints).

An epoch that does not fill its last global batch is completed with padding examples
(`example_mask` False) unless `drop_remainder`. Examples longer than the largest bucket raise an
error naming the record (`overlong="error"`, the default), or with `overlong="truncate"` are cut
at the end (the tail of the answer is lost); a cut inside an image block is always an error.

Everything is a pure function of (seed, position): two runs with one seed give identical batches
and a restored iterator continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grain
import jax
import numpy as np

from drivekd_jax.data.batch import BATCH_KEYS
from drivekd_jax.data.processor import (
  CAPABILITY_IDS,
  IGNORE_INDEX,
  Processor,
  record_where,
  text_positions,
)

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]


# Padding examples are marked by example_mask False; this capability keeps them out of the
# per-capability distillation terms even where a consumer forgets the mask.
PADDING_CAPABILITY = CAPABILITY_IDS["other"]


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Input pipeline settings.

  Attributes:
    batch_size: examples per process per step (B); the global batch is B * process_count.
    buckets: allowed sequence lengths L, ascending; a batch is padded to the smallest bucket
      holding its longest example, so the train step compiles at most len(buckets) times.
    max_images: image slots M per example (tiles, counted after tiling); unused slots are zeros.
    seed: shuffling seed; epoch e uses the permutation drawn from (seed, e).
    shuffle: False keeps the source order (evaluation).
    num_epochs: None repeats forever.
    drop_remainder: drop the last, incomplete global batch of each epoch instead of padding it.
    overlong: "error" (default) or "truncate" for examples longer than the largest bucket.
    num_threads: grain reader threads that build examples in parallel (0: in the calling thread).
    prefetch_batches: batches' worth of examples prefetched when num_threads > 0.
  """

  batch_size: int
  buckets: tuple[int, ...] = (256, 512, 1024)
  max_images: int = 6
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  drop_remainder: bool = False
  overlong: Literal["error", "truncate"] = "error"
  num_threads: int = 0
  prefetch_batches: int = 2

  def __post_init__(self):
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}")
    if not self.buckets or list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
      raise ValueError(f"buckets must be positive and strictly ascending, got {self.buckets}")
    if self.overlong not in ("error", "truncate"):
      raise ValueError(f"overlong must be 'error' or 'truncate', got {self.overlong!r}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"num_epochs must be None or positive, got {self.num_epochs}")


def select_bucket(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= length (ValueError when none is)."""
  for bucket in buckets:
    if length <= bucket:
      return bucket
  raise ValueError(f"length {length} exceeds the largest bucket {buckets[-1]}")


def truncate_example(example: Example, length: int, *, where: str = "") -> Example:
  """Cuts a processed example to `length` tokens, never inside an image block."""
  image_positions = np.flatnonzero(example["image_mask"])
  # Keep the `</img>` after the last image-context token as well.
  if image_positions.size and image_positions[-1] + 2 > length:
    raise ValueError(
      f"{where}cannot truncate to {length} tokens: the last image block ends at position "
      f"{image_positions[-1] + 1}"
    )
  out = dict(example)
  for key in ("input_ids", "labels", "attention_mask", "image_mask"):
    out[key] = example[key][:length]
  return out


def padding_example(pad_id: int, image_shape: tuple[int, int, int]) -> Example:
  """A one-token stand-in for missing examples: no labels, no images.

  Its first position is marked real so that no attention row is fully masked (fully masked rows
  give NaN softmax rows); `example_mask` False is what tells the loss to ignore it.
  """
  return {
    "input_ids": np.full((1,), pad_id, np.int32),
    "labels": np.full((1,), IGNORE_INDEX, np.int32),
    "attention_mask": np.ones((1,), bool),
    "image_mask": np.zeros((1,), bool),
    "pixel_values": np.zeros((0, *image_shape), np.float32),
    "capability": np.asarray(PADDING_CAPABILITY, np.int32),
    "example_mask": np.asarray(False),
  }


def collate(
  examples: Sequence[Example],
  *,
  buckets: Sequence[int],
  max_images: int,
  pad_id: int,
  image_shape: tuple[int, int, int],
  positions_fn: Callable[[np.ndarray, np.ndarray], np.ndarray] = text_positions,
) -> Batch:
  """Pads processed examples to one bucket and stacks them into a training batch.

  `positions_fn(image_mask, attention_mask)` gives the RoPE positions from the padded masks
  (`Processor.batch_positions`: the model family's).

  Returns:
    input_ids int32 [B, L] (pad_id after the end), labels int32 [B, L] (-100 after the end),
    attention_mask bool [B, L], image_mask bool [B, L], positions int32 [B, L] (default: 0..n-1
    over the n real tokens, 0 after; Qwen2.5-VL's M-RoPE [B, 3, L]), pixel_values float32
    [B, M, S, S, 3], capability int32 [B], example_mask bool [B].
  """
  length = select_bucket(max(len(ex["input_ids"]) for ex in examples), buckets)
  batch_size = len(examples)
  batch = {
    "input_ids": np.full((batch_size, length), pad_id, np.int32),
    "labels": np.full((batch_size, length), IGNORE_INDEX, np.int32),
    "attention_mask": np.zeros((batch_size, length), bool),
    "image_mask": np.zeros((batch_size, length), bool),
    "pixel_values": np.zeros((batch_size, max_images, *image_shape), np.float32),
    "capability": np.zeros((batch_size,), np.int32),
    "example_mask": np.zeros((batch_size,), bool),
  }
  for row, example in enumerate(examples):
    n = len(example["input_ids"])
    batch["input_ids"][row, :n] = example["input_ids"]
    batch["labels"][row, :n] = example["labels"]
    batch["attention_mask"][row, :n] = example["attention_mask"]
    batch["image_mask"][row, :n] = example["image_mask"]
    pixels = example["pixel_values"]
    if pixels.shape[0] > max_images:
      raise ValueError(f"an example has {pixels.shape[0]} image tiles, above max_images")
    batch["pixel_values"][row, : pixels.shape[0]] = pixels
    batch["capability"][row] = example["capability"]
    batch["example_mask"][row] = example.get("example_mask", True)
  batch["positions"] = positions_fn(batch["image_mask"], batch["attention_mask"])
  return {key: batch[key] for key in BATCH_KEYS}


def pad_batch_length(batch: Mapping[str, np.ndarray], length: int, pad_id: int) -> Batch:
  """Right-pads the [B, L] fields (and [B, 3, L] M-RoPE positions) of a batch to a longer
  `length`."""
  current = batch["input_ids"].shape[1]
  if length < current:
    raise ValueError(f"cannot pad a batch of length {current} down to {length}")
  if length == current:
    return dict(batch)
  fill = {
    "input_ids": pad_id,
    "labels": IGNORE_INDEX,
    "attention_mask": False,
    "image_mask": False,
    "positions": 0,
  }
  out = dict(batch)
  for key, value in fill.items():
    widths = [(0, 0)] * (batch[key].ndim - 1) + [(0, length - current)]
    out[key] = np.pad(batch[key], widths, constant_values=value)
  return out


class TrainingPipeline:
  """Deterministic, sharded, checkpointable batches of Drive-KD training examples.

  Usage:
    pipeline = TrainingPipeline(source, processor, PipelineConfig(batch_size=4))
    iterator = pipeline.iterator()          # grain DatasetIterator
    batch = next(iterator)                  # dict of numpy arrays (see `collate`)
    state = iterator.get_state()            # save with the checkpoint; later set_state(state)
    arrays = pipeline.global_batch(batch, sharding)
  """

  def __init__(
    self,
    source: Sequence[Mapping[str, Any]],
    processor: Processor,
    config: PipelineConfig,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    example_fn: Callable[[Mapping[str, Any], str], Example] | None = None,
    source_name: str = "source",
  ):
    """Builds the pipeline.

    Args:
      source: random-access records (`len`, `[i]`), e.g. `tfds.data_source(...)`.
      processor: turns a record into a processed example.
      config: the pipeline settings.
      process_index / process_count: this process's shard; default `jax.process_index()` /
        `jax.process_count()`.
      example_fn: (record, where) -> processed example; default `processor.record_example`.
      source_name: names the source in error messages (e.g. the dataset directory and split).
    """
    self.source = source
    self.processor = processor
    self.config = config
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process {self.process_index} is not in 0..{self.process_count - 1}")
    self.example_fn = example_fn or (
      lambda record, where: processor.record_example(record, where=where)
    )
    self.source_name = source_name
    self.num_records = len(source)
    self.global_batch_size = config.batch_size * self.process_count
    if config.drop_remainder:
      self.steps_per_epoch = self.num_records // self.global_batch_size
    else:
      self.steps_per_epoch = -(-self.num_records // self.global_batch_size)
    if self.steps_per_epoch == 0:
      raise ValueError(
        f"{source_name}: {self.num_records} records give no full global batch of "
        f"{self.global_batch_size}"
      )
    size = processor.config.image_size
    self._image_shape = (size, size, 3)
    self._permutations: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  # -- index arithmetic ---------------------------------------------------------------------

  @property
  def examples_per_epoch(self) -> int:
    """Local examples (real and padding) per epoch on this process."""
    return self.steps_per_epoch * self.config.batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      permutation = self._permutations.get(epoch)
      if permutation is None:
        rng = np.random.default_rng([self.config.seed, epoch])
        permutation = rng.permutation(self.num_records)
        self._permutations = {e: p for e, p in self._permutations.items() if e >= epoch - 1}
        self._permutations[epoch] = permutation
      return permutation

  def record_index(self, local_index: int) -> int | None:
    """Source index of this process's `local_index`-th example, or None for padding."""
    epoch, in_epoch = divmod(local_index, self.examples_per_epoch)
    step, row = divmod(in_epoch, self.config.batch_size)
    position = step * self.global_batch_size + self.process_index * self.config.batch_size + row
    if position >= self.num_records:
      return None
    if not self.config.shuffle:
      return position
    return int(self._permutation(epoch)[position])

  # -- examples and batches -----------------------------------------------------------------

  def _example(self, local_index: int) -> Example:
    index = self.record_index(local_index)
    if index is None:
      return padding_example(self.processor.tokenizer.pad_id, self._image_shape)
    record = self.source[index]
    where = f"{self.source_name} index {index}, {record_where(record)}"
    example = self.example_fn(record, where)
    longest = self.config.buckets[-1]
    if len(example["input_ids"]) > longest:
      if self.config.overlong == "error":
        raise ValueError(
          f"{where}{len(example['input_ids'])} tokens exceed the largest bucket {longest} "
          "(add a bucket, or set overlong='truncate')"
        )
      example = truncate_example(example, longest, where=where)
    if example["pixel_values"].shape[0] > self.config.max_images:
      raise ValueError(
        f"{where}{example['pixel_values'].shape[0]} image tiles exceed max_images="
        f"{self.config.max_images}"
      )
    return example

  def _collate(self, examples: Sequence[Example]) -> Batch:
    return collate(
      examples,
      buckets=self.config.buckets,
      max_images=self.config.max_images,
      pad_id=self.processor.tokenizer.pad_id,
      image_shape=self._image_shape,
      positions_fn=self.processor.batch_positions,
    )

  def _num_examples(self) -> int:
    if self.config.num_epochs is None:
      return (2**62 // self.examples_per_epoch) * self.examples_per_epoch
    return self.config.num_epochs * self.examples_per_epoch

  def examples(self) -> grain.MapDataset:
    """This process's examples in order (random access; padding examples included)."""
    return grain.MapDataset.range(self._num_examples()).map(self._example)

  def dataset(self) -> grain.MapDataset:
    """This process's batches as a random-access dataset (length = steps, or unbounded)."""
    return self.examples().batch(
      self.config.batch_size, drop_remainder=True, batch_fn=self._collate
    )

  def iterator(self) -> grain.DatasetIterator:
    """A fresh batch iterator; `get_state()` / `set_state()` save and restore its position.

    Examples are built by `num_threads` threads (images decode and resize in parallel, as
    Pillow releases the GIL) and batched in order, so the batches do not depend on threading.
    """
    if self.config.num_threads:
      options = grain.ReadOptions(
        num_threads=self.config.num_threads,
        prefetch_buffer_size=self.config.prefetch_batches * self.config.batch_size,
      )
    else:
      options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    examples = self.examples().to_iter_dataset(options)
    batches = examples.batch(self.config.batch_size, drop_remainder=True, batch_fn=self._collate)
    return iter(batches)

  def __iter__(self):
    return self.iterator()

  def global_batch(self, batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
    """`make_global_batch` with this pipeline's pad id."""
    return make_global_batch(batch, sharding, pad_id=self.processor.tokenizer.pad_id)


def make_global_batch(
  batch: Mapping[str, np.ndarray],
  sharding: jax.sharding.Sharding | Mapping[str, jax.sharding.Sharding],
  *,
  pad_id: int = 0,
) -> dict[str, jax.Array]:
  """Assembles every process's host batch into global `jax.Array`s.

  With several processes the sequence length is first agreed on (the longest local bucket,
  one small all-gather), so every process contributes arrays of one shape; every process must
  then call this for every batch, in step.

  Args:
    batch: this process's batch from `TrainingPipeline` ([B_local, ...]).
    sharding: one sharding for every field (e.g. NamedSharding(mesh, P(("data", "fsdp")))) or
      one per field.
    pad_id: token id written into the added padding.

  Returns:
    The same fields as global arrays with leading dimension B_local * (processes along the
    batch axis).
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    lengths = multihost_utils.process_allgather(np.int32(batch["input_ids"].shape[1]))
    batch = pad_batch_length(batch, int(np.max(lengths)), pad_id)
  out = {}
  for key, value in batch.items():
    field_sharding = sharding[key] if isinstance(sharding, Mapping) else sharding
    out[key] = jax.make_array_from_process_local_data(field_sharding, np.asarray(value))
  return out
