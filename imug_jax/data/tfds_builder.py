"""TFDS builder for an IMUG-Bench release (array_record; needs no TensorFlow).

One example per sample, keyed `<domain>/<subdomain>/<sample_id>`:

  record              Text   the sample's benchmark.jsonl line, verbatim JSON (exact round trip)
  domain, subdomain, sample_id, class   Text
  modalities          Sequence(Text)   per turn, "text" | "image"
  images              Sequence({name: Text, data: bytes})   the sample's input images as released
  image_references    Text   JSON {turn: [{ref_turn, ref_type}]} ("{}" when the sample has none)
  dynamic_references  Text   JSON {turn: [ref turns]}
  grid_gt             Text   JSON {turn: 3x3 grid}

Images are stored as their original encoded bytes (JPEG or PNG, any size), never re-encoded.
Build: `python -m imug_jax.data.tfds_builder --release DIR --data_dir OUT`. Read back with
`tfds.builder_from_directory(dir).as_data_source(split="test")` and `decode_example`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from imug_jax.data import release as release_lib
from imug_jax.data import schema


@dataclasses.dataclass(frozen=True)
class BenchmarkExample:
  """A decoded builder example: the sample, its input image bytes and its reference data."""

  sample: schema.Sample
  images: dict[str, bytes]
  image_references: dict[int, tuple[schema.ImageRef, ...]]
  dynamic_references: dict[int, tuple[int, ...]]
  grid_gt: dict[int, schema.Grid]


class ImugBench(tfds.core.GeneratorBasedBuilder):
  """IMUG-Bench (arXiv 2606.09169) from a local release folder; a single "test" split."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Release format of ccccEsion/IMUG-Bench, one example per sample."}

  def __init__(self, *, release_dir: str | Path | None = None, **kwargs):
    """`release_dir` is needed to build; reading a built dataset needs only `data_dir`."""
    self._release_dir = release_dir
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    text = tfds.features.Text()
    return tfds.core.DatasetInfo(
      builder=self,
      description="IMUG-Bench: multi-turn interleaved image-text dialogue for unified models.",
      features=tfds.features.FeaturesDict(
        {
          "record": text,
          "domain": tfds.features.Text(),
          "subdomain": tfds.features.Text(),
          "sample_id": tfds.features.Text(),
          "class": tfds.features.Text(),
          "modalities": tfds.features.Sequence(tfds.features.Text()),
          "images": tfds.features.Sequence(
            {
              "name": tfds.features.Text(),
              "data": tfds.features.Tensor(shape=(), dtype=np.object_),
            }
          ),
          "image_references": tfds.features.Text(),
          "dynamic_references": tfds.features.Text(),
          "grid_gt": tfds.features.Text(),
        }
      ),
      homepage="https://github.com/ccccEsion/IMUG-Bench",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    if self._release_dir is None:
      raise ValueError("ImugBench needs release_dir=<folder with benchmark.jsonl> to build")
    release = release_lib.load_release(self._release_dir)
    return {"test": self._generate_examples(release)}

  def _generate_examples(self, release: release_lib.Release):
    dynamic: dict[schema.SampleKey, dict[int, list[int]]] = {}
    for (key, turn), refs in release.dynamic_references.items():
      dynamic.setdefault(key, {})[turn] = list(refs)
    for sample in release.samples or ():
      key = sample.key
      names = list(dict.fromkeys(name for task in sample.tasks for name in task.input_images))
      refs = release.image_references.get(key, {})
      yield (
        str(key),
        {
          "record": json.dumps(sample.to_json(), ensure_ascii=False),
          "domain": sample.domain,
          "subdomain": sample.subdomain,
          "sample_id": sample.sample_id,
          "class": schema.class_of(sample.domain),
          "modalities": [task.modality for task in sample.tasks],
          "images": [{"name": n, "data": release.image_path(n).read_bytes()} for n in names],
          "image_references": json.dumps(
            {t: [dataclasses.asdict(r) for r in rs] for t, rs in refs.items()}
          ),
          "dynamic_references": json.dumps(dynamic.get(key, {})),
          "grid_gt": json.dumps(
            {t: [list(r) for r in g] for t, g in release.grid_gt.get(key, {}).items()}
          ),
        },
      )


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode_example(example: dict[str, Any]) -> BenchmarkExample:
  """Turns a data-source example (bytes and lists) back into typed records."""
  sample = schema.parse_sample(json.loads(_text(example["record"])), path="tfds:imug_bench")
  images = {
    _text(n): bytes(d) for n, d in zip(example["images"]["name"], example["images"]["data"])
  }
  refs = {
    int(t): tuple(schema.ImageRef(**r) for r in rs)
    for t, rs in json.loads(_text(example["image_references"])).items()
  }
  dynamic = {
    int(t): tuple(rs) for t, rs in json.loads(_text(example["dynamic_references"])).items()
  }
  grids = {
    int(t): tuple(tuple(row) for row in g) for t, g in json.loads(_text(example["grid_gt"])).items()
  }
  return BenchmarkExample(sample, images, refs, dynamic, grids)


def build(release_dir: str | Path, data_dir: str | Path) -> ImugBench:
  """Builds (or reuses) the dataset under `data_dir` (absolute) and returns the builder."""
  builder = ImugBench(release_dir=release_dir, data_dir=str(Path(data_dir).resolve()))
  builder.download_and_prepare()
  return builder


def main(argv=None) -> None:
  import argparse

  parser = argparse.ArgumentParser(description="Builds the imug_bench TFDS dataset (array_record).")
  parser.add_argument("--release", required=True, help="release folder (or its parent)")
  parser.add_argument("--data_dir", required=True, help="TFDS data_dir to write")
  args = parser.parse_args(argv)
  builder = build(args.release, args.data_dir)
  print(
    f"built {builder.info.full_name} in {builder.data_dir}: "
    f"{builder.info.splits['test'].num_examples} samples"
  )


if __name__ == "__main__":
  main()
