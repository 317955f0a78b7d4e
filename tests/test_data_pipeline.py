"""The grain training pipeline: buckets, determinism, checkpointed iterator state, sharding."""

import io
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import PIL.Image
import pytest
from _paths import data_file
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from drivekd_jax.data import pipeline as pl
from drivekd_jax.data import sources
from drivekd_jax.data.batch import BATCH_KEYS
from drivekd_jax.data.processor import IGNORE_INDEX, Processor, ProcessorConfig
from drivekd_jax.data.tokenizer import train_bpe_tokenizer

TOKENS_PER_IMAGE = 2
IMAGE_SIZE = 14
CAPABILITIES = ("perception", "reasoning", "planning")


def _png(value: int) -> bytes:
  buffer = io.BytesIO()
  image = np.full((9, 16, 3), value % 256, np.uint8)
  image[:, : value % 16] = 255 - value % 256
  PIL.Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def _records(count: int) -> list[dict]:
  """Driving records in the records.py layout; lengths and image counts vary with the index."""
  out = []
  for i in range(count):
    num_images = 1 + i % 3
    out.append(
      {
        "record_id": f"rec{i}".encode(),
        "question": f"Q{i}: what is ahead? ".encode() + b"lane " * (i % 7) * 3,
        "answer": f"Final: {'ABC'[i % 3]}.".encode(),
        "images": [_png(i * 7 + k) for k in range(num_images)],
        "cameras": [b"CAM_FRONT", b"CAM_BACK", b"CAM_BACK_LEFT"][:num_images],
        "capability": CAPABILITIES[i % 3].encode(),
      }
    )
  return out


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
  texts = ["what is ahead? lane lane Final: A. B. C.", "the ego vehicle keeps its lane"] * 8
  tokenizer = train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))
  return Processor(tokenizer, ProcessorConfig(IMAGE_SIZE, TOKENS_PER_IMAGE))


@pytest.fixture(scope="module")
def records():
  return _records(11)


def _config(**overrides):
  settings = dict(batch_size=3, buckets=(32, 48, 96), max_images=3, seed=7, num_epochs=2)
  settings.update(overrides)
  return pl.PipelineConfig(**settings)


def _pipeline(records, processor, process_index=0, process_count=1, **overrides):
  return pl.TrainingPipeline(
    records,
    processor,
    _config(**overrides),
    process_index=process_index,
    process_count=process_count,
  )


def _assert_batches_equal(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batch_format_and_padding(records, processor):
  pipeline = _pipeline(records, processor)
  batches = list(pipeline.iterator())
  assert pipeline.steps_per_epoch == 4 and len(batches) == 8  # ceil(11 / 3) per epoch, 2 epochs
  lengths = set()
  for batch in batches:
    assert tuple(batch) == BATCH_KEYS
    b, length = batch["input_ids"].shape
    assert b == 3 and length in (32, 48, 96)
    lengths.add(length)
    dtypes = {k: v.dtype for k, v in batch.items()}
    assert dtypes == {
      "input_ids": np.int32,
      "labels": np.int32,
      "attention_mask": bool,
      "image_mask": bool,
      "positions": np.int32,
      "pixel_values": np.float32,
      "capability": np.int32,
      "example_mask": bool,
    }
    assert batch["pixel_values"].shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE, 3)
    real = batch["attention_mask"].sum(axis=1)
    # The bucket is the smallest one that holds the longest example of the batch.
    assert length == min(bk for bk in (32, 48, 96) if bk >= real.max())
    for row in range(b):
      n = real[row]
      assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
      np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))
      assert (batch["positions"][row, n:] == 0).all()
      assert (batch["input_ids"][row, n:] == processor.tokenizer.pad_id).all()
      assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
      assert not batch["image_mask"][row, n:].any()
      tiles = batch["image_mask"][row].sum() // TOKENS_PER_IMAGE
      assert tiles > 0 or not batch["example_mask"][row]
      assert (np.abs(batch["pixel_values"][row, :tiles]).sum(axis=(1, 2, 3)) > 0).all()
      assert (batch["pixel_values"][row, tiles:] == 0).all()
  assert len(lengths) > 1
  # 12 slots per epoch for 11 records: exactly one padding example, at the end of the epoch.
  masks = np.stack([batch["example_mask"] for batch in batches]).reshape(2, -1)
  np.testing.assert_array_equal(masks[:, -1], False)
  assert masks[:, :-1].all()
  padding = batches[3]
  assert padding["attention_mask"][2].sum() == 1 and (padding["labels"][2] == IGNORE_INDEX).all()


def test_each_epoch_is_a_new_permutation(records, processor):
  pipeline = _pipeline(records, processor)
  epochs = [[pipeline.record_index(i) for i in range(e * 12, (e + 1) * 12)] for e in range(2)]
  for order in epochs:
    assert order[-1] is None and sorted(order[:-1]) == list(range(11))
  assert epochs[0] != epochs[1]
  unshuffled = _pipeline(records, processor, shuffle=False)
  assert [unshuffled.record_index(i) for i in range(12)] == list(range(11)) + [None]


def test_same_seed_same_batches_other_seed_other_order(records, processor):
  first = list(_pipeline(records, processor).iterator())
  second = list(_pipeline(records, processor, num_threads=2).iterator())
  _assert_batches_equal(first, second)
  _assert_batches_equal(first, list(_pipeline(records, processor).dataset()))  # random access
  reseeded = _pipeline(records, processor, seed=8)
  assert [reseeded.record_index(i) for i in range(24)] != [
    _pipeline(records, processor).record_index(i) for i in range(24)
  ]


@pytest.mark.parametrize("num_threads", [0, 2])
def test_iterator_state_restores_bit_identically(records, processor, num_threads):
  pipeline = _pipeline(records, processor, num_epochs=None, num_threads=num_threads)
  iterator = pipeline.iterator()
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(6)]  # crosses into the next epoch
  restored = _pipeline(records, processor, num_epochs=None, num_threads=num_threads).iterator()
  restored.set_state(state)
  _assert_batches_equal([next(restored) for _ in range(6)], expected)


def test_process_shards_are_disjoint_and_form_the_global_batches(records, processor):
  processes = 2
  shards = [_pipeline(records, processor, p, processes, num_epochs=1) for p in range(processes)]
  assert {s.steps_per_epoch for s in shards} == {2}  # ceil(11 / 6)
  indices = [[s.record_index(i) for i in range(s.examples_per_epoch)] for s in shards]
  real = [i for shard in indices for i in shard if i is not None]
  assert sorted(real) == list(range(11))  # all records, none twice
  # Process p's batch s is rows [p*B, (p+1)*B) of the one-process global batch s.
  single = list(_pipeline(records, processor, batch_size=6, num_epochs=1).iterator())
  local = [list(s.iterator()) for s in shards]
  for step, global_batch in enumerate(single):
    for p in range(processes):
      part = local[p][step]
      rows = slice(p * 3, (p + 1) * 3)
      length = part["input_ids"].shape[1]
      padded = pl.pad_batch_length(part, global_batch["input_ids"].shape[1], 0)
      for key in ("labels", "attention_mask", "image_mask", "positions"):
        np.testing.assert_array_equal(padded[key], global_batch[key][rows], err_msg=key)
      np.testing.assert_array_equal(part["input_ids"], global_batch["input_ids"][rows, :length])
      np.testing.assert_array_equal(part["pixel_values"], global_batch["pixel_values"][rows])


def test_overlong_examples_error_or_truncate(records, processor):
  long_records = [dict(records[0], question=b"9" * 120)]
  with pytest.raises(ValueError, match=r"source index 0, record record_id=rec0: \d+ tokens exceed"):
    next(_pipeline(long_records, processor, batch_size=1).iterator())
  batch = next(_pipeline(long_records, processor, batch_size=1, overlong="truncate").iterator())
  assert batch["input_ids"].shape == (1, 96) and batch["attention_mask"].all()
  assert batch["image_mask"].sum() == TOKENS_PER_IMAGE
  # A cut through an image block is refused even with truncation.
  images_late = [dict(records[0], question=b"9" * 120 + b"<image>")]
  with pytest.raises(ValueError, match="image block"):
    next(_pipeline(images_late, processor, batch_size=1, overlong="truncate").iterator())
  too_many = [dict(records[2])]  # 3 images
  with pytest.raises(ValueError, match="exceed max_images=2"):
    next(_pipeline(too_many, processor, batch_size=1, max_images=2).iterator())


def test_drop_remainder_and_config_checks(records, processor):
  pipeline = _pipeline(records, processor, drop_remainder=True, num_epochs=1)
  batches = list(pipeline.iterator())
  assert len(batches) == 3 and all(b["example_mask"].all() for b in batches)
  with pytest.raises(ValueError, match="ascending"):
    pl.PipelineConfig(batch_size=1, buckets=(64, 32))
  with pytest.raises(ValueError, match="no full global batch"):
    _pipeline(records[:2], processor, drop_remainder=True)


def test_global_batch_on_eight_devices(records, processor):
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  pipeline = _pipeline(records, processor, batch_size=8)
  batch = next(pipeline.iterator())
  arrays = pipeline.global_batch(batch, sharding)
  for key, value in batch.items():
    assert arrays[key].shape == value.shape and arrays[key].sharding == sharding
    assert len(arrays[key].addressable_shards) == 8
    assert arrays[key].addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(arrays[key]), value)
  per_field = {key: NamedSharding(mesh, P("data")) for key in batch}
  arrays = pl.make_global_batch(batch, per_field)
  assert arrays["pixel_values"].sharding.spec == P("data")


def test_drivekd_demo_through_tfds_builder_and_pipeline(processor, tmp_path):
  """The released demo.json -> DriveKDQA builder (array_record) -> data source -> pipeline."""
  demo_path = data_file("drivekd", "demo.json")
  demo = json.loads(demo_path.read_text())
  image_root = tmp_path / "images"
  images = {}
  for index, sample in enumerate(demo):
    for k, raw in enumerate(sample["images"]):
      path = image_root / raw.removeprefix(".../")
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(_png(index * 11 + k))
      images[raw] = path.read_bytes()
  builder = sources.build_dataset(
    "drivekd_qa",
    demo_path.parent,
    tmp_path / "tfds",
    json_path=str(demo_path),
    image_root=str(image_root),
  )
  source = builder.as_data_source("train")
  assert len(source) == len(demo)
  pipeline = pl.TrainingPipeline(
    source,
    processor,
    _config(batch_size=4, buckets=(512, 1024), max_images=6, num_epochs=1),
    process_index=0,
    process_count=1,
    source_name="drivekd_qa/train",
  )
  batches = list(pipeline.iterator())
  assert len(batches) == 2 and sum(int(b["example_mask"].sum()) for b in batches) == 7
  # Every real row equals the direct construction from the demo messages and the same images.
  seen = 0
  for step, batch in enumerate(batches):
    for row in range(4):
      index = pipeline.record_index(step * 4 + row)
      if index is None:
        continue
      sample = demo[int(source[index]["source_index"])]
      expected = processor.build(
        sample["messages"],
        [images[p] for p in sample["images"]],
        capability=sample["question_type"],
      )
      n = len(expected["input_ids"])
      np.testing.assert_array_equal(batch["input_ids"][row, :n], expected["input_ids"])
      np.testing.assert_array_equal(batch["labels"][row, :n], expected["labels"])
      np.testing.assert_array_equal(batch["image_mask"][row, :n], expected["image_mask"])
      m = len(expected["pixel_values"])
      np.testing.assert_array_equal(batch["pixel_values"][row, :m], expected["pixel_values"])
      assert batch["capability"][row] == expected["capability"]
      seen += 1
  assert seen == 7


_TWO_PROCESS_WORKER = """
import json, os, sys
process_id, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from drivekd_jax.data import pipeline as pl
from drivekd_jax.data.processor import Processor, ProcessorConfig
from drivekd_jax.data.tokenizer import train_bpe_tokenizer
tokenizer = train_bpe_tokenizer(["abc def"] * 4, 270, f"{out}/tokenizer{process_id}.json")
processor = Processor(tokenizer, ProcessorConfig(14, 2))
# Process 0 reads the four short records, process 1 the four long ones.
records = [{"question": "q", "answer": "a"}] * 4 + [{"question": "9" * 40, "answer": "a"}] * 4
config = pl.PipelineConfig(batch_size=4, buckets=(32, 64), max_images=1, shuffle=False)
pipeline = pl.TrainingPipeline(records, processor, config)
batch = next(pipeline.iterator())
mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
arrays = pipeline.global_batch(batch, NamedSharding(mesh, P("data")))
shards = sorted(arrays["labels"].addressable_shards, key=lambda s: s.index[0].start)
local = np.concatenate([np.asarray(s.data) for s in shards])
result = {"local_length": batch["labels"].shape[1], "global_shape": list(arrays["labels"].shape),
          "local": local.tolist(), "host": batch["labels"].tolist()}
with open(f"{out}/result{process_id}.json", "w") as f:
  json.dump(result, f)
"""


@pytest.mark.slow
def test_two_processes_agree_on_the_bucket(tmp_path):
  """Two jax.distributed CPU processes with different local buckets build one global batch."""
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    port = probe.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_TWO_PROCESS_WORKER)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  workers = [
    subprocess.Popen(
      [sys.executable, str(script), str(p), str(port), str(tmp_path)],
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for p in range(2)
  ]
  logs = [worker.communicate(timeout=180)[0] for worker in workers]
  assert [w.returncode for w in workers] == [0, 0], "\n".join(logs)
  results = [json.loads((tmp_path / f"result{p}.json").read_text()) for p in range(2)]
  assert [r["local_length"] for r in results] == [32, 64]
  for result in results:
    assert result["global_shape"] == [8, 64]
    for row, host_row in zip(result["local"], result["host"]):
      n = len(host_row)
      assert row[:n] == host_row and set(row[n:]) <= {IGNORE_INDEX}


def test_synthetic_driving_data_through_builders_and_pipeline(tmp_path):
  """write_synthetic_driving -> DriveKDQA / DriveBench builders -> pipeline, every record once."""
  from drivekd_jax.data.synthetic import write_synthetic_driving

  write_synthetic_driving(
    tmp_path / "raw", num_train_frames=3, num_test_frames=2, seed=0, image_size=32
  )
  built = {
    kind: sources.build_dataset(kind, tmp_path / "raw", tmp_path / "tfds").as_data_source(split)
    for kind, split in (("drivekd_qa", "train"), ("drivebench", "test"))
  }
  texts = [
    rec_[field].decode()
    for source in built.values()
    for rec_ in source
    for field in ("question", "answer")
  ]
  tokenizer = train_bpe_tokenizer(texts, 600, tmp_path / "tokenizer.json")
  processor = Processor(tokenizer, ProcessorConfig(IMAGE_SIZE, TOKENS_PER_IMAGE))
  for kind, source in built.items():
    config = pl.PipelineConfig(batch_size=4, buckets=(256, 512, 1024), max_images=6, num_epochs=1)
    pipeline = pl.TrainingPipeline(
      source, processor, config, process_index=0, process_count=1, source_name=kind
    )
    seen = []
    for step, batch in enumerate(pipeline.iterator()):
      for row in np.flatnonzero(batch["example_mask"]):
        index = pipeline.record_index(step * 4 + row)
        record = source[index]
        seen.append(index)
        supervised = batch["input_ids"][row][batch["labels"][row] != IGNORE_INDEX]
        answer = record["answer"].decode()
        assert tokenizer.decode(supervised) == f"<|im_start|>assistant\n{answer}<|im_end|>\n"
        num_images = len(record["images"])
        assert batch["image_mask"][row].sum() == num_images * TOKENS_PER_IMAGE
        assert (np.abs(batch["pixel_values"][row, :num_images]).sum(axis=(1, 2, 3)) > 0).all()
        assert batch["capability"][row] == int(record["capability_id"])
    assert sorted(seen) == list(range(len(source))), kind
