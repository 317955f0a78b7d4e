"""Where a run's examples come from: data settings, TFDS builds, synthetic files, tokenizer.

`prepare_data(settings, workdir, seed)` turns the data settings of a run into a `DataBundle`:
synthetic files written into the workdir when asked (once; a marker records the settings), each
split built (once) by its TFDS builder and opened as a random-access source (optionally
restricted to some capabilities), the tokenizer (a local tokenizer.json, or a byte-level BPE
trained on the synthetic text and kept in the workdir so a resumed run reuses it), and the
pipeline settings. In multi-process runs process 0 writes and the others wait at a barrier.

`build_dataset(kind, data_dir, out_dir)` is the one-call build of one driving dataset.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import tensorflow_datasets as tfds
from absl import logging

from drivekd_jax.data import pipeline as pipeline_lib
from drivekd_jax.data.drivebench import DriveBench
from drivekd_jax.data.drivekd_qa import DriveKDQA
from drivekd_jax.data.drivelm import DriveLM
from drivekd_jax.data.processor import CAPABILITIES
from drivekd_jax.data.tokenizer import Tokenizer, train_bpe_tokenizer

BUILDERS = {"drivebench": DriveBench, "drivelm": DriveLM, "drivekd_qa": DriveKDQA}


@dataclasses.dataclass(frozen=True)
class SyntheticData:
  """Synthetic driving files written into `<workdir>/data/synthetic` (or `dir`); `questions`:
  the question set, "driving" or "grounded" (`drivekd_jax.data.synthetic`)."""

  dir: str = ""
  num_train_frames: int = 200
  num_test_frames: int = 20
  seed: int = 0
  image_size: int = 64
  questions: str = "driving"
  corruptions: tuple = ()  # DriveBench corruption stems rendered for the test frames


@dataclasses.dataclass(frozen=True)
class Split:
  """One split: a TFDS builder `kind` over a folder of released files (its manual dir)."""

  kind: str = "drivekd_qa"
  dir: str = ""  # "": the synthetic folder
  config: str = ""  # builder config, e.g. DriveBench "fog"
  split: str = "train"
  builder_kwargs: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """Where the examples come from and how they are batched.

  Attributes:
    source: "synthetic" (written into the workdir) or "files" (the splits' folders).
    tfds_dir: where builders write ("": `<workdir>/data/tfds`).
    capabilities: e.g. ("planning",): train and test on that capability only (empty: all).
    tokenizer: tokenizer.json (or its folder); "": a BPE trained on the synthetic text.
    vocab_size: BPE size when training one.
    batch_size: examples per process per step.
    buckets: padded sequence lengths (one compilation each).
    shuffle_seed: order of the training examples.
    overlong: "error" or "truncate" for examples longer than the largest bucket.
  """

  source: str = "synthetic"
  synthetic: SyntheticData = SyntheticData()
  train: Split = Split()
  test: Split = Split(split="test")
  tfds_dir: str = ""
  capabilities: tuple = ()
  tokenizer: str = ""
  vocab_size: int = 512
  batch_size: int = 4
  buckets: tuple = (256, 512, 1024)
  max_images: int = 6
  max_tiles: int = 1
  system_message: str = ""
  shuffle_seed: int = 42
  overlong: str = "error"
  num_threads: int = 0

  def __post_init__(self):
    if self.source not in ("synthetic", "files"):
      raise ValueError(f"source={self.source!r}: expected 'synthetic' or 'files'")
    if self.overlong not in ("error", "truncate"):
      raise ValueError(f"overlong={self.overlong!r}: expected 'error' or 'truncate'")


@dataclasses.dataclass
class DataBundle:
  """The run's data: tokenizer, sources and the pipeline settings."""

  tokenizer: Tokenizer
  train_source: Any
  test_source: Any
  train_name: str
  test_name: str
  pipeline_config: pipeline_lib.PipelineConfig


def on_process_zero_then_barrier(name: str, fn: Callable[[], Any]) -> None:
  """Runs `fn` on process 0 only; every process then waits for it."""
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def build_dataset(
  kind: str,
  data_dir: str | os.PathLike,
  out_dir: str | os.PathLike,
  *,
  config: str | None = None,
  overwrite: bool = False,
  **builder_kwargs,
):
  """Builds one of the driving datasets from a folder in one call and returns the builder.

  Args:
    kind: "drivebench", "drivelm" or "drivekd_qa".
    data_dir: the folder with the released (or synthetic) files: the builder's manual dir.
    out_dir: where TFDS writes the prepared dataset (its `data_dir`).
    config: builder config name (DriveBench: "clean", "no_image", "fog", ...).
    overwrite: rebuild even if `out_dir` already holds this dataset version.
    **builder_kwargs: passed to the builder (`json_path`, `image_root`, `skip_bad_records`, ...).

  Returns:
    The prepared builder; `builder.as_data_source("test" | "train")` reads the records.
  """
  if kind not in BUILDERS:
    raise ValueError(f"unknown dataset kind {kind!r}: {', '.join(BUILDERS)}")
  builder = BUILDERS[kind](
    config=config,
    data_dir=os.path.abspath(out_dir),
    manual_dir=os.path.abspath(data_dir),
    **builder_kwargs,
  )
  mode = (
    tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    if overwrite
    else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
  return builder


class Subset:
  """Random-access view of some indices of a source (capability-filtered splits)."""

  def __init__(self, source: Sequence, indices: list[int]):
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i]]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def synthetic_root(settings: DataSettings, workdir: str) -> str:
  return os.path.abspath(settings.synthetic.dir or os.path.join(workdir, "data", "synthetic"))


def prepare_synthetic(settings: DataSettings, workdir: str) -> str:
  """Writes the synthetic driving files once (a marker records the settings); returns the root."""
  from drivekd_jax.data import synthetic

  root = synthetic_root(settings, workdir)
  marker = os.path.join(root, "COMPLETE.json")
  wanted = {
    "num_train_frames": settings.synthetic.num_train_frames,
    "num_test_frames": settings.synthetic.num_test_frames,
    "seed": settings.synthetic.seed,
    "image_size": settings.synthetic.image_size,
    "questions": settings.synthetic.questions,
  }
  if settings.synthetic.corruptions:  # recorded only when used, so older markers still match
    wanted["corruptions"] = list(settings.synthetic.corruptions)

  def write():
    if os.path.exists(marker):
      with open(marker) as f:
        if json.load(f) == wanted:
          return
      raise ValueError(
        f"{root} holds synthetic data written with other settings ({marker}); "
        "use a new workdir or config.data.synthetic.dir"
      )
    logging.info("writing synthetic driving data to %s (%s)", root, wanted)
    synthetic.write_synthetic_driving(
      root, **{**wanted, "corruptions": tuple(wanted.get("corruptions", ()))}
    )
    with open(marker, "w") as f:
      json.dump(wanted, f)

  on_process_zero_then_barrier("drivekd_synthetic_data", write)
  return root


def open_split(split: Split, default_dir: str, tfds_dir: str, capabilities: tuple[str, ...]):
  """Builds (once) and opens one split; returns (source, name)."""
  manual_dir = os.path.abspath(split.dir or default_dir)
  builder_config = split.config or None
  holder = {}

  def build():
    holder["builder"] = build_dataset(
      split.kind, manual_dir, tfds_dir, config=builder_config, **split.builder_kwargs
    )

  on_process_zero_then_barrier(f"drivekd_build_{split.kind}", build)
  builder = holder.get("builder") or build_dataset(
    split.kind, manual_dir, tfds_dir, config=builder_config, **split.builder_kwargs
  )
  source = builder.as_data_source(split.split)
  name = (
    f"{split.kind}{'/' + builder_config if builder_config else ''}:{split.split} ({manual_dir})"
  )
  if not capabilities or set(capabilities) >= set(CAPABILITIES):
    return source, name
  cache = os.path.join(
    tfds_dir, f"indices_{split.kind}_{builder_config}_{split.split}_{'-'.join(capabilities)}.json"
  )
  if os.path.exists(cache):
    with open(cache) as f:
      indices = json.load(f)
  else:
    indices = [i for i in range(len(source)) if _text(source[i]["capability"]) in capabilities]
    if jax.process_index() == 0:
      with open(cache, "w") as f:
        json.dump(indices, f)
  if not indices:
    raise ValueError(f"{name}: no records of capabilities {capabilities}")
  return Subset(source, indices), f"{name} [{','.join(capabilities)}]"


def load_tokenizer(settings: DataSettings, workdir: str, synthetic_dir: str | None) -> Tokenizer:
  """The configured tokenizer.json, or a BPE trained on the synthetic training text."""
  if settings.tokenizer:
    return Tokenizer.from_path(settings.tokenizer)
  if synthetic_dir is None:
    raise ValueError("config.data.tokenizer is required unless config.data.source='synthetic'")
  out = os.path.join(workdir, "data", "tokenizer", "tokenizer.json")

  def train():
    if os.path.exists(out):
      return  # a resumed run keeps the tokenizer its checkpoints were trained with
    os.makedirs(os.path.dirname(out), exist_ok=True)
    texts = []
    with open(os.path.join(synthetic_dir, "drivekd_train.json")) as f:
      for item in json.load(f):
        texts.extend(m["content"] for m in item["messages"])
    train_bpe_tokenizer(texts, settings.vocab_size, out)

  on_process_zero_then_barrier("drivekd_tokenizer", train)
  return Tokenizer.from_path(out)


def prepare_data(settings: DataSettings, workdir: str) -> DataBundle:
  """Synthetic files (if asked) -> TFDS builders -> sources, tokenizer and pipeline settings."""
  synthetic_dir = prepare_synthetic(settings, workdir) if settings.source == "synthetic" else None
  tfds_dir = os.path.abspath(settings.tfds_dir or os.path.join(workdir, "data", "tfds"))
  capabilities = tuple(settings.capabilities)
  default_dir = synthetic_dir or ""
  train_source, train_name = open_split(settings.train, default_dir, tfds_dir, capabilities)
  test_source, test_name = open_split(settings.test, default_dir, tfds_dir, capabilities)
  pipeline_config = pipeline_lib.PipelineConfig(
    batch_size=settings.batch_size,
    buckets=tuple(settings.buckets),
    max_images=settings.max_images,
    seed=settings.shuffle_seed,
    overlong=settings.overlong,
    num_threads=settings.num_threads,
  )
  return DataBundle(
    load_tokenizer(settings, workdir, synthetic_dir),
    train_source,
    test_source,
    train_name,
    test_name,
    pipeline_config,
  )
