"""The IMUG-Bench release on disk: benchmark, images, reference files and grid ground truth.

Layout (the official `data/` folder; `config/domain_classes.json` ships with this package):

  benchmark.jsonl  images/  image_references.jsonl  dynamic_references.jsonl  grid_gt/*.jsonl

`load_release(root)` accepts either that folder or its parent (the repository root holding
`data/`). `Release.check()` cross-checks the files against each other and the domain classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from imug_jax.data import schema
from imug_jax.data.schema import BenchmarkFormatError, Grid, ImageRef, Sample, SampleKey

BENCHMARK = "benchmark.jsonl"
IMAGES = "images"
IMAGE_REFERENCES = "image_references.jsonl"
DYNAMIC_REFERENCES = "dynamic_references.jsonl"
GRID_GT = "grid_gt"
_MARKERS = (BENCHMARK, IMAGE_REFERENCES, DYNAMIC_REFERENCES, GRID_GT)


def resolve_data_dir(root: str | Path) -> Path:
  """The folder holding the release files: `root` itself, or `root/data`."""
  root = Path(root)
  if any((root / name).exists() for name in _MARKERS):
    return root
  if any((root / "data" / name).exists() for name in _MARKERS):
    return root / "data"
  raise FileNotFoundError(f"{root}: no IMUG release files ({', '.join(_MARKERS)}) here or in data/")


@dataclasses.dataclass
class Release:
  """Everything in a release folder, parsed. `samples` is None when benchmark.jsonl is absent."""

  data_dir: Path
  samples: list[Sample] | None
  image_references: dict[SampleKey, dict[int, tuple[ImageRef, ...]]]
  dynamic_references: dict[tuple[SampleKey, int], tuple[int, ...]]
  grid_gt: dict[SampleKey, dict[int, Grid]]

  @property
  def images_dir(self) -> Path:
    return self.data_dir / IMAGES

  def image_path(self, name: str) -> Path:
    return self.images_dir / name

  def sample(self, key: SampleKey) -> Sample:
    for sample in self.samples or ():
      if sample.key == key:
        return sample
    raise KeyError(f"no sample {key} in {self.data_dir / BENCHMARK}")

  def check(self, *, check_images: bool = True) -> None:
    """Cross-checks the files; raises BenchmarkFormatError naming file, sample, turn and field.

    Always: every domain belongs to a class, grid files are Geometric_Coloring. With
    benchmark.jsonl: every reference names an existing sample and turn of the right modality
    (`input` refs a turn with an input image, `output` refs an image turn), every dynamic answer
    has a dynamic reference and vice versa, grid turns are image turns, input images exist.
    """
    ir_path = self.data_dir / IMAGE_REFERENCES
    dr_path = self.data_dir / DYNAMIC_REFERENCES
    gt_dir = self.data_dir / GRID_GT

    def check_domain(key: SampleKey, path: Path) -> None:
      try:
        schema.class_of(key.domain)
      except KeyError as e:
        raise BenchmarkFormatError(f"{path} sample {key}: {e.args[0]}") from None

    for key in self.image_references:
      check_domain(key, ir_path)
    for key, _ in self.dynamic_references:
      check_domain(key, dr_path)
    for key in self.grid_gt:
      check_domain(key, gt_dir / key.grid_gt_name)
      if key.domain != "Geometric_Coloring":
        raise BenchmarkFormatError(
          f"{gt_dir / key.grid_gt_name}: grid ground truth exists only "
          f"for Geometric_Coloring, got domain {key.domain!r}"
        )
    if self.samples is None:
      return

    bench = self.data_dir / BENCHMARK
    by_key = {s.key: s for s in self.samples}
    for sample in self.samples:
      check_domain(sample.key, bench)
      for task in sample.tasks:
        if check_images:
          for name in task.input_images:
            if not self.image_path(name).is_file():
              raise BenchmarkFormatError(
                f"{schema.where(bench, sample=str(sample.key), turn=task.turn, field='input')}"
                f": image {name!r} is missing from {self.images_dir}"
              )
        if task.is_dynamic and (sample.key, task.turn) not in self.dynamic_references:
          raise BenchmarkFormatError(
            f"{schema.where(bench, sample=str(sample.key), turn=task.turn)}: dynamic answer "
            f"{task.answer!r} has no line in {dr_path.name}"
          )

    def task_of(key: SampleKey, turn: int, path: Path, field: str) -> schema.Turn:
      if key not in by_key:
        raise BenchmarkFormatError(
          f"{schema.where(path, sample=str(key))}: no such sample in {bench.name}"
        )
      try:
        return by_key[key].task(turn)
      except KeyError:
        raise BenchmarkFormatError(
          f"{schema.where(path, sample=str(key), field=field)}: turn {turn} is not in {bench.name}"
        ) from None

    for key, turns in self.image_references.items():
      if key not in by_key:
        raise BenchmarkFormatError(
          f"{schema.where(ir_path, sample=str(key))}: no such sample in {bench.name}"
        )
      for turn, refs in turns.items():
        if task_of(key, turn, ir_path, "turn_idx").modality != "image":
          raise BenchmarkFormatError(
            f"{schema.where(ir_path, sample=str(key), turn=turn)}: "
            "references are given for a turn that is not an image turn"
          )
        for ref in refs:
          target = task_of(key, ref.ref_turn, ir_path, "ref_turn")
          if ref.ref_type == "input" and not target.input_images:
            raise BenchmarkFormatError(
              f"{schema.where(ir_path, sample=str(key), turn=turn, field='refs')}: input ref "
              f"to turn {ref.ref_turn}, which has no input image"
            )
          if ref.ref_type == "output" and target.modality != "image":
            raise BenchmarkFormatError(
              f"{schema.where(ir_path, sample=str(key), turn=turn, field='refs')}: output ref "
              f"to turn {ref.ref_turn}, which is not an image turn"
            )
    for (key, turn), ref_turns in self.dynamic_references.items():
      task = task_of(key, turn, dr_path, "turn_idx")
      if not task.is_dynamic:
        raise BenchmarkFormatError(
          f"{schema.where(dr_path, sample=str(key), turn=turn)}: the "
          f"turn's answer {task.answer!r} is not dynamic"
        )
      for ref_turn in ref_turns:
        task_of(key, ref_turn, dr_path, "ref_turn_idxs")
    for key, grids in self.grid_gt.items():
      path = gt_dir / key.grid_gt_name
      for turn in grids:
        if task_of(key, turn, path, "turn").modality != "image":
          raise BenchmarkFormatError(
            f"{schema.where(path, sample=str(key), turn=turn)}: grid "
            "ground truth for a turn that is not an image turn"
          )


def load_release(
  root: str | Path, *, require_benchmark: bool = True, check: bool = True, check_images: bool = True
) -> Release:
  """Parses a release folder (see the module docstring) and, by default, cross-checks it.

  Args:
    root: the release `data/` folder or its parent.
    require_benchmark: fail when benchmark.jsonl is absent (the real benchmark is downloaded
      separately; the reference files alone can still be loaded and checked with False).
    check: run `Release.check()`.
    check_images: let the check stat every input image.
  """
  data_dir = resolve_data_dir(root)
  bench = data_dir / BENCHMARK
  if not bench.exists() and require_benchmark:
    raise FileNotFoundError(f"{bench} is missing")
  ir_path, dr_path, gt_dir = (
    data_dir / IMAGE_REFERENCES,
    data_dir / DYNAMIC_REFERENCES,
    data_dir / GRID_GT,
  )
  release = Release(
    data_dir=data_dir,
    samples=schema.load_benchmark(bench) if bench.exists() else None,
    image_references=schema.load_image_references(ir_path) if ir_path.exists() else {},
    dynamic_references=schema.load_dynamic_references(dr_path) if dr_path.exists() else {},
    grid_gt=schema.load_grid_gt(gt_dir) if gt_dir.exists() else {},
  )
  if check:
    release.check(check_images=check_images)
  return release
