"""IMUG-Bench records: samples, turns and the reference files, parsed and validated.

The release format (see `docs/imug_protocol.md` §1.4): one sample per line of
`benchmark.jsonl`:

  {"domain", "subdomain" (or "category"), "sample_id", "system_prompt"?,
   "tasks": [{"turn": int, "modality": "text" | "image",
              "input": [{"text": ...} | {"image": filename}, ...],   # first item is text
              "output": {"answer": "B" | "<DYNAMIC>" | "A+<DYNAMIC>"}   # text turns
                     or {"evaluation_points": [str, ...]}}]}         # image turns

Parsing is strict and every error names the file, the line, the sample and the turn. The sample
key (domain, subdomain, sample id) and image names become paths of the output layout, so each
must be a plain path component (`drivekd_jax.paths`): no `/`, `\\`, `..` or drive prefix.
Fields we do not know are kept (`extra`) so that a record round-trips unchanged, and a rollout's
`result.json` (the record plus `model_response` per task) is read by the same code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from drivekd_jax.paths import path_component_problem

MODALITIES = ("text", "image")
DYNAMIC = "<DYNAMIC>"
GRID_VALUES = ("0", "1", "r", "g")
REF_TYPES = ("input", "output")
_DYNAMIC_ANSWER = re.compile(r"^(?:([A-G]+)\+)?<DYNAMIC>$")


class BenchmarkFormatError(ValueError):
  """A release file breaks the format; the message names file, line, sample, turn and field."""


def where(
  path: str | Path | None = None,
  line: int | None = None,
  sample: str | None = None,
  turn: int | None = None,
  field: str | None = None,
) -> str:
  """Formats a location for error messages, e.g. `benchmark.jsonl:3 sample A/b/1 turn 2 'input'`."""
  parts = []
  if path is not None:
    parts.append(f"{path}:{line}" if line is not None else str(path))
  if sample is not None:
    parts.append(f"sample {sample}")
  if turn is not None:
    parts.append(f"turn {turn}")
  if field is not None:
    parts.append(f"field {field!r}")
  return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class SampleKey:
  """Identifies a sample: the triple that the reference files and the output layout use."""

  domain: str
  subdomain: str
  sample_id: str

  def __str__(self) -> str:
    return f"{self.domain}/{self.subdomain}/{self.sample_id}"

  @property
  def grid_gt_name(self) -> str:
    """File name of the grid ground truth, `<domain>__<subdomain>__<id>.jsonl`."""
    return f"{self.domain}__{self.subdomain}__{self.sample_id}.jsonl"


@dataclasses.dataclass(frozen=True)
class InputItem:
  """One item of a user turn: exactly one of `text` or `image` (a file name under images/)."""

  text: str | None = None
  image: str | None = None

  def to_json(self) -> dict[str, str]:
    return {"text": self.text} if self.text is not None else {"image": self.image}


@dataclasses.dataclass(frozen=True)
class Turn:
  """One task of a sample.

  Attributes:
    turn: the turn index as released (1-based).
    modality: "text" (answer an MCQ) or "image" (generate or edit an image).
    inputs: the user content, in order; the first item is text (the instruction or question).
    answer: gold answer of a text turn (letters, `<DYNAMIC>` or `X+<DYNAMIC>`), else None.
    evaluation_points: judge rubric of an image turn, else None.
    model_response: present only in a rollout's result.json.
    output_extra / extra: unknown fields, kept for an exact round trip.
  """

  turn: int
  modality: str
  inputs: tuple[InputItem, ...]
  answer: str | None = None
  evaluation_points: tuple[str, ...] | None = None
  model_response: str | None = None
  output_extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def instruction(self) -> str:
    """The first input item's text: what the scorers show the judge."""
    return self.inputs[0].text or ""

  @property
  def output_mode(self) -> str:
    """The official `/infer` output mode this turn forces."""
    return "image_only" if self.modality == "image" else "text_only"

  @property
  def is_dynamic(self) -> bool:
    return self.answer is not None and _DYNAMIC_ANSWER.match(self.answer) is not None

  @property
  def fixed_letters(self) -> str:
    """Letters always right in a dynamic answer (`"A"` for `A+<DYNAMIC>`); a static answer as is."""
    if self.answer is None:
      return ""
    match = _DYNAMIC_ANSWER.match(self.answer)
    if match is None:
      return self.answer
    return match.group(1) or ""

  @property
  def input_images(self) -> tuple[str, ...]:
    return tuple(item.image for item in self.inputs if item.image is not None)

  def to_json(self) -> dict[str, Any]:
    output: dict[str, Any] = {}
    if self.answer is not None:
      output["answer"] = self.answer
    if self.evaluation_points is not None:
      output["evaluation_points"] = list(self.evaluation_points)
    output.update(self.output_extra)
    record = {
      "turn": self.turn,
      "modality": self.modality,
      "input": [item.to_json() for item in self.inputs],
      "output": output,
    }
    record.update(self.extra)
    if self.model_response is not None:
      record["model_response"] = self.model_response
    return record


@dataclasses.dataclass(frozen=True)
class Sample:
  """One multi-turn dialogue of the benchmark."""

  domain: str
  subdomain: str
  sample_id: str
  tasks: tuple[Turn, ...]
  system_prompt: str | None = None
  subdomain_field: str = "subdomain"  # "category" when the record used the fallback name
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def key(self) -> SampleKey:
    return SampleKey(self.domain, self.subdomain, self.sample_id)

  def task(self, turn: int) -> Turn:
    for task in self.tasks:
      if task.turn == turn:
        return task
    raise KeyError(f"sample {self.key} has no turn {turn}")

  def to_json(self) -> dict[str, Any]:
    record: dict[str, Any] = {
      "domain": self.domain,
      self.subdomain_field: self.subdomain,
      "sample_id": self.sample_id,
    }
    if self.system_prompt is not None:
      record["system_prompt"] = self.system_prompt
    record["tasks"] = [task.to_json() for task in self.tasks]
    record.update(self.extra)
    return record

  def with_responses(self, responses: Mapping[int, str]) -> Sample:
    """Returns a copy whose tasks carry `model_response` (turn -> text or image file name)."""
    tasks = tuple(
      dataclasses.replace(t, model_response=responses.get(t.turn, t.model_response))
      for t in self.tasks
    )
    return dataclasses.replace(self, tasks=tasks)


def _require(cond: bool, message: str, **loc) -> None:
  if not cond:
    raise BenchmarkFormatError(f"{where(**loc)}: {message}")


def _require_key_part(value: Any, name: str, loc: dict[str, Any], label: str = "") -> None:
  """A part of a sample key: a non-empty string that is a plain path component."""
  problem = path_component_problem(value)
  message = f"{label or name} (a folder of the output layout) {problem}"
  _require(problem is None, message, **loc, field=name)


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _parse_turn(raw: Any, loc: dict[str, Any]) -> Turn:
  _require(
    isinstance(raw, dict),
    f"a task must be an object, got {type(raw).__name__}",
    **loc,
    field="tasks",
  )
  turn = raw.get("turn")
  _require(_is_int(turn), f"turn must be an integer, got {turn!r}", **loc, field="turn")
  loc = {**loc, "turn": turn}
  modality = raw.get("modality")
  _require(
    modality in MODALITIES,
    f"modality must be one of {MODALITIES}, got {modality!r}",
    **loc,
    field="modality",
  )
  items = raw.get("input")
  _require(
    isinstance(items, list) and len(items) > 0,
    "input must be a non-empty list",
    **loc,
    field="input",
  )
  inputs = []
  for index, item in enumerate(items):
    field = f"input[{index}]"
    _require(
      isinstance(item, dict) and len(item) == 1 and next(iter(item)) in ("text", "image"),
      f"an input item is {{'text': str}} or {{'image': file}}, got {item!r}",
      **loc,
      field=field,
    )
    kind, value = next(iter(item.items()))
    _require(
      isinstance(value, str),
      f"{kind} must be a string, got {type(value).__name__}",
      **loc,
      field=field,
    )
    if kind == "image":
      problem = path_component_problem(value)
      _require(
        problem is None, f"image must be a file name under images/: {problem}", **loc, field=field
      )
    inputs.append(InputItem(**{kind: value}))
  _require(inputs[0].text is not None, "the first input item must be text", **loc, field="input[0]")
  output = raw.get("output")
  _require(isinstance(output, dict), "output must be an object", **loc, field="output")
  output_extra = {k: v for k, v in output.items() if k not in ("answer", "evaluation_points")}
  answer = points = None
  if modality == "text":
    answer = output.get("answer")
    _require(
      isinstance(answer, str) and answer.strip() != "",
      f"a text turn needs a non-empty answer string, got {answer!r}",
      **loc,
      field="output.answer",
    )
    if DYNAMIC in answer:
      _require(
        _DYNAMIC_ANSWER.match(answer) is not None,
        f"a dynamic answer is '<DYNAMIC>' or 'X+<DYNAMIC>' (X in A-G), got {answer!r}",
        **loc,
        field="output.answer",
      )
  else:
    raw_points = output.get("evaluation_points")
    _require(
      isinstance(raw_points, list)
      and len(raw_points) > 0
      and all(isinstance(p, str) for p in raw_points),
      f"an image turn needs a non-empty list of evaluation_points strings, got {raw_points!r}",
      **loc,
      field="output.evaluation_points",
    )
    points = tuple(raw_points)
  response = raw.get("model_response")
  _require(
    response is None or isinstance(response, str),
    "model_response must be a string",
    **loc,
    field="model_response",
  )
  extra = {
    k: v
    for k, v in raw.items()
    if k not in ("turn", "modality", "input", "output", "model_response")
  }
  return Turn(
    turn=turn,
    modality=modality,
    inputs=tuple(inputs),
    answer=answer,
    evaluation_points=points,
    model_response=response,
    output_extra=output_extra,
    extra=extra,
  )


def parse_sample(raw: Any, *, path: str | Path | None = None, line: int | None = None) -> Sample:
  """Validates one release record (a decoded JSON object) and returns the `Sample`.

  Raises:
    BenchmarkFormatError: naming file, line, sample, turn and field of the first problem.
  """
  loc: dict[str, Any] = {"path": path, "line": line}
  _require(
    isinstance(raw, dict), f"a sample must be a JSON object, got {type(raw).__name__}", **loc
  )
  subdomain_field = "subdomain" if "subdomain" in raw else "category"
  for name in ("domain", subdomain_field, "sample_id"):
    label = "subdomain (or category)" if name == subdomain_field else name
    _require_key_part(raw.get(name), name, loc, label=label)
  subdomain = raw[subdomain_field]
  name = f"{raw['domain']}/{subdomain}/{raw['sample_id']}"
  loc["sample"] = name
  system_prompt = raw.get("system_prompt")
  _require(
    system_prompt is None or isinstance(system_prompt, str),
    "system_prompt must be a string",
    **loc,
    field="system_prompt",
  )
  tasks_raw = raw.get("tasks")
  _require(
    isinstance(tasks_raw, list) and len(tasks_raw) > 0,
    "tasks must be a non-empty list",
    **loc,
    field="tasks",
  )
  tasks = tuple(_parse_turn(task, loc) for task in tasks_raw)
  turns = [task.turn for task in tasks]
  _require(
    all(a < b for a, b in zip(turns, turns[1:])) and turns[0] >= 1,
    f"turns must be >= 1 and strictly increasing, got {turns}",
    **loc,
    field="turn",
  )
  known = ("domain", "subdomain", "category", "sample_id", "system_prompt", "tasks")
  extra = {
    k: v
    for k, v in raw.items()
    if k not in known or (k in ("subdomain", "category") and k != subdomain_field)
  }
  return Sample(
    domain=raw["domain"],
    subdomain=subdomain,
    sample_id=raw["sample_id"],
    tasks=tasks,
    system_prompt=system_prompt,
    subdomain_field=subdomain_field,
    extra=extra,
  )


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
  """Yields (line number, decoded object) for every non-blank line; bad JSON names the line."""
  path = Path(path)
  with path.open(encoding="utf-8") as f:
    for number, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        yield number, json.loads(text)
      except json.JSONDecodeError as e:
        raise BenchmarkFormatError(f"{where(path, number)}: invalid JSON: {e}") from e


def load_benchmark(path: str | Path) -> list[Sample]:
  """Reads and validates `benchmark.jsonl`; sample keys must be unique."""
  samples, seen = [], {}
  for number, raw in read_jsonl(path):
    sample = parse_sample(raw, path=path, line=number)
    _require(
      sample.key not in seen,
      f"duplicate sample (first on line {seen.get(sample.key)})",
      path=path,
      line=number,
      sample=str(sample.key),
    )
    seen[sample.key] = number
    samples.append(sample)
  return samples


def write_jsonl(path: str | Path, records: Iterable[Mapping[str, Any]]) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- reference files


@dataclasses.dataclass(frozen=True)
class ImageRef:
  """An earlier image the judge sees: the first input image (`input`) or the model's output."""

  ref_turn: int
  ref_type: str


def _key_of(raw: Mapping[str, Any], loc: dict[str, Any]) -> SampleKey:
  for name in ("domain", "subdomain", "sample_id"):
    _require_key_part(raw.get(name), name, loc)
  return SampleKey(raw["domain"], raw["subdomain"], raw["sample_id"])


def load_image_references(path: str | Path) -> dict[SampleKey, dict[int, tuple[ImageRef, ...]]]:
  """Reads `image_references.jsonl`: sample -> {image turn -> references in the judge's order}."""
  table: dict[SampleKey, dict[int, tuple[ImageRef, ...]]] = {}
  for number, raw in read_jsonl(path):
    loc: dict[str, Any] = {"path": path, "line": number}
    _require(isinstance(raw, dict), "a line must be a JSON object", **loc)
    key = _key_of(raw, loc)
    loc["sample"] = str(key)
    _require(key not in table, "duplicate sample", **loc)
    links = raw.get("reference_links")
    _require(
      isinstance(links, list), "reference_links must be a list", **loc, field="reference_links"
    )
    turns: dict[int, tuple[ImageRef, ...]] = {}
    for link in links:
      turn = link.get("turn_idx") if isinstance(link, dict) else None
      _require(
        _is_int(turn) and turn >= 1,
        f"turn_idx must be an integer >= 1, got {turn!r}",
        **loc,
        field="reference_links.turn_idx",
      )
      _require(turn not in turns, "duplicate turn_idx", **loc, turn=turn, field="turn_idx")
      refs = link.get("refs")
      _require(isinstance(refs, list), "refs must be a list", **loc, turn=turn, field="refs")
      parsed = []
      for ref in refs:
        ok = (
          isinstance(ref, dict)
          and _is_int(ref.get("ref_turn"))
          and ref.get("ref_type") in REF_TYPES
        )
        _require(
          ok,
          f"a ref is {{'ref_turn': int, 'ref_type': input|output}}, got {ref!r}",
          **loc,
          turn=turn,
          field="refs",
        )
        _require(
          1 <= ref["ref_turn"] <= turn,
          f"ref_turn {ref['ref_turn']} must lie in [1, {turn}]",
          **loc,
          turn=turn,
          field="refs.ref_turn",
        )
        _require(
          ref["ref_turn"] < turn or ref["ref_type"] == "input",
          "a turn can reference only its own input, not its own output",
          **loc,
          turn=turn,
          field="refs.ref_type",
        )
        parsed.append(ImageRef(ref["ref_turn"], ref["ref_type"]))
      turns[turn] = tuple(parsed)
    table[key] = turns
  return table


def load_dynamic_references(path: str | Path) -> dict[tuple[SampleKey, int], tuple[int, ...]]:
  """Reads `dynamic_references.jsonl`: (sample, dynamic MCQ turn) -> turns its answer depends on."""
  table: dict[tuple[SampleKey, int], tuple[int, ...]] = {}
  for number, raw in read_jsonl(path):
    loc: dict[str, Any] = {"path": path, "line": number}
    _require(isinstance(raw, dict), "a line must be a JSON object", **loc)
    key = _key_of(raw, loc)
    loc["sample"] = str(key)
    turn = raw.get("turn_idx")
    _require(
      _is_int(turn) and turn >= 1,
      f"turn_idx must be an integer >= 1, got {turn!r}",
      **loc,
      field="turn_idx",
    )
    refs = raw.get("ref_turn_idxs")
    _require(
      isinstance(refs, list) and len(refs) > 0 and all(_is_int(r) for r in refs),
      f"ref_turn_idxs must be a non-empty list of integers, got {refs!r}",
      **loc,
      turn=turn,
      field="ref_turn_idxs",
    )
    _require(
      all(1 <= r < turn for r in refs),
      f"ref_turn_idxs {refs} must be earlier turns (1 <= r < {turn})",
      **loc,
      turn=turn,
      field="ref_turn_idxs",
    )
    _require((key, turn) not in table, "duplicate (sample, turn_idx)", **loc, turn=turn)
    table[(key, turn)] = tuple(refs)
  return table


Grid = tuple[tuple[str, str, str], tuple[str, str, str], tuple[str, str, str]]


def parse_grid_gt_name(name: str) -> SampleKey:
  """`Geometric_Coloring__cubes_coloring__7.jsonl` -> SampleKey."""
  stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
  parts = stem.split("__")
  if len(parts) != 3 or not all(parts):
    raise BenchmarkFormatError(f"{name}: grid file name must be <domain>__<subdomain>__<id>.jsonl")
  return SampleKey(*parts)


def load_grid_file(path: str | Path) -> dict[int, Grid]:
  """Reads one `grid_gt/*.jsonl`: turn -> 3x3 grid of "0" (empty), "1", "r" (red), "g" (green)."""
  grids: dict[int, Grid] = {}
  for number, raw in read_jsonl(path):
    loc: dict[str, Any] = {"path": path, "line": number}
    _require(isinstance(raw, dict), "a line must be a JSON object", **loc)
    turn = raw.get("turn")
    _require(
      _is_int(turn) and turn >= 1,
      f"turn must be an integer >= 1, got {turn!r}",
      **loc,
      field="turn",
    )
    grid = raw.get("grid")
    ok = (
      isinstance(grid, list)
      and len(grid) == 3
      and all(isinstance(row, list) and len(row) == 3 for row in grid)
      and all(cell in GRID_VALUES for row in grid for cell in row)
    )
    _require(ok, f"grid must be 3x3 of {GRID_VALUES}, got {grid!r}", **loc, turn=turn, field="grid")
    _require(turn not in grids, "duplicate turn", **loc, turn=turn)
    grids[turn] = tuple(tuple(row) for row in grid)  # type: ignore[assignment]
  return grids


def load_grid_gt(directory: str | Path) -> dict[SampleKey, dict[int, Grid]]:
  """Reads every `grid_gt/<domain>__<subdomain>__<id>.jsonl` under `directory`."""
  return {
    parse_grid_gt_name(p.name): load_grid_file(p) for p in sorted(Path(directory).glob("*.jsonl"))
  }


# ----------------------------------------------------------------------------- domain classes


@functools.cache
def domain_classes() -> dict[str, tuple[str, ...]]:
  """The benchmark's 3 classes and their 19 domains (`config/domain_classes.json`, shipped)."""
  text = resources.files("imug_jax.data").joinpath("domain_classes.json").read_text("utf-8")
  return {name: tuple(domains) for name, domains in json.loads(text).items()}


def class_of(domain: str) -> str:
  """The class ("Static Spatial", "Temporal Causal" or "Hybrid") of a domain."""
  for name, domains in domain_classes().items():
    if domain in domains:
      return name
  raise KeyError(f"domain {domain!r} is in no class of domain_classes.json")
