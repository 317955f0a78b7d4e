r"""A synthetic IMUG-Bench with exact ground truth, written in the release format.

`python -m imug_jax.data.synthetic --out DIR --num_samples N --seed S` writes

  DIR/benchmark.jsonl  images/  image_references.jsonl  dynamic_references.jsonl  grid_gt/
  DIR/ground_truth/<domain>__<subdomain>__<id>__turn_<t>.png   target image of every image turn
  DIR/synthetic_meta.jsonl   how each dynamic answer follows from the drawn image (exact oracle)

Four domains, one per idea, each sample 2-6 turns (a prefix of a 6-turn script):
  Geometric_Coloring/grid_coloring   3x3 grids in the grid-scorer format ("0"/"1"/"r"/"g"),
                                     grid_gt for every image turn
  Color_Reasoning/paint_mixing       mix two paints, add a border, repaint
  Stack_Simulation/block_stacking    draw, grow and shrink a stack of blocks (counting)
  Chemistry/litmus_test              litmus paper in acids, bases and water
Text turns are static MCQs (answer from the instruction) or dynamic MCQs (`<DYNAMIC>` or
`A+<DYNAMIC>`: the answer depends on what the model drew; `oracle_dynamic_answer` resolves it
exactly from the image, with `synthetic_meta.jsonl`). All images are drawn on the palette-patch
lattice of `imug_jax.models.image_tokenizer`, so the tiny model can represent them exactly.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from imug_jax.data import release, schema
from imug_jax.models import image_tokenizer as itok
from imug_jax.models.image_tokenizer import EDGE_BOTTOM, EDGE_LEFT, EDGE_RIGHT, EDGE_TOP

GROUND_TRUTH = "ground_truth"
META = "synthetic_meta.jsonl"
LETTERS = "ABCDEFG"
TOKENIZER = itok.PaletteTokenizer()  # 12 x 12 patches of 8 px: 96 px images.
_G = TOKENIZER.grid
_CELL = _G // 3  # Patches per grid cell side.
_GRID_COLOURS = {"0": "white", "1": "grey", "r": "red", "g": "green"}
_CELL_NAMES = (
  "top-left",
  "top-middle",
  "top-right",
  "middle-left",
  "centre",
  "middle-right",
  "bottom-left",
  "bottom-middle",
  "bottom-right",
)


def ground_truth_name(key: schema.SampleKey, turn: int) -> str:
  return f"{key.domain}__{key.subdomain}__{key.sample_id}__turn_{turn}.png"


# ------------------------------------------------------------------------------------- drawing
# Every picture is a [G, G] int array of palette-patch tokens.


def _blank(colour: str = "white") -> np.ndarray:
  return np.full((_G, _G), TOKENIZER.token(colour), np.int32)


def draw_grid(cells: Sequence[Sequence[str]]) -> np.ndarray:
  """3x3 grid of "0"/"1"/"r"/"g": thin black lines on white; a filled cell holds a grey, red or
  green square inset by a white gutter. The gutter matters to the grid scorer: its adaptive
  threshold finds a fill by the fill's contrast with white, which a line touching the fill hides.
  """
  tokens = _blank()
  for i in range(_G):
    for j in range(_G):
      a, b = i % _CELL, j % _CELL
      edges = (
        (a == 0) * EDGE_TOP
        | (a == _CELL - 1) * EDGE_BOTTOM
        | (b == 0) * EDGE_LEFT
        | (b == _CELL - 1) * EDGE_RIGHT
      )
      inner = 0 < a < _CELL - 1 and 0 < b < _CELL - 1
      colour = _GRID_COLOURS[cells[i // _CELL][j // _CELL]] if inner else "white"
      tokens[i, j] = TOKENIZER.token(colour, int(edges))
  return tokens


def draw_canvas(fill: str, border: str | None = None) -> np.ndarray:
  """A canvas painted `fill`, optionally with a one-patch `border` ring."""
  tokens = _blank(fill)
  if border is not None:
    ring = np.ones((_G, _G), bool)
    ring[1:-1, 1:-1] = False
    tokens[ring] = TOKENIZER.token(border)
  return tokens


def draw_swatches(left: str, right: str) -> np.ndarray:
  """Two paint swatches on white, outlined."""
  tokens = _blank()
  for colour, cols in ((left, range(1, 5)), (right, range(7, 11))):
    for i in range(3, 9):
      for j in cols:
        edges = (
          (i == 3) * EDGE_TOP
          | (i == 8) * EDGE_BOTTOM
          | (j == cols[0]) * EDGE_LEFT
          | (j == cols[-1]) * EDGE_RIGHT
        )
        tokens[i, j] = TOKENIZER.token(colour, int(edges))
  return tokens


def draw_stack(count: int, colour: str) -> np.ndarray:
  """`count` outlined blocks (one patch high, four wide) stacked from the bottom row up."""
  tokens = _blank()
  for level in range(count):
    i = _G - 1 - level
    for j in range(4, 8):
      edges = EDGE_TOP | EDGE_BOTTOM | (j == 4) * EDGE_LEFT | (j == 7) * EDGE_RIGHT
      tokens[i, j] = TOKENIZER.token(colour, int(edges))
  return tokens


def draw_strip(colour: str) -> np.ndarray:
  """A vertical paper strip (litmus) on white."""
  tokens = _blank()
  for i in range(1, _G - 1):
    for j in (5, 6):
      edges = (
        (i == 1) * EDGE_TOP
        | (i == _G - 2) * EDGE_BOTTOM
        | (j == 5) * EDGE_LEFT
        | (j == 6) * EDGE_RIGHT
      )
      tokens[i, j] = TOKENIZER.token(colour, int(edges))
  return tokens


# --------------------------------------------------------------------------- exact dynamic oracle


def _colour_names(image: np.ndarray) -> np.ndarray:
  """Image uint8 [H, W, 3] -> [G, G] array of palette colour names of its patches."""
  colours = TOKENIZER.colours(TOKENIZER.encode(image)).reshape(_G, _G)
  return np.asarray(itok.COLOUR_NAMES, dtype=object)[colours]


def measure(kind: str, image: np.ndarray, colour: str | None = None) -> Any:
  """What a dynamic question asks about an image, measured exactly.

  Kinds: "grid_count" (cells of a 3x3 grid whose paint, the most frequent colour other than
  white/black in the cell, is in `colour`, a "|"-joined list), "dominant" (most frequent colour
  other than white/black), "border" (majority colour of the outer ring), "stack_height" (rows
  holding any non-white, non-black patch).
  """
  names = _colour_names(image)
  if kind == "grid_count":
    wanted = set(colour.split("|"))
    count = 0
    for a in range(3):
      for b in range(3):
        cell = names[a * _CELL : (a + 1) * _CELL, b * _CELL : (b + 1) * _CELL].reshape(-1)
        paint = cell[(cell != "white") & (cell != "black")]
        if paint.size:
          values, counts = np.unique(paint, return_counts=True)
          count += int(values[counts.argmax()] in wanted)
    return count
  if kind in ("dominant", "border"):
    if kind == "border":
      ring = np.ones((_G, _G), bool)
      ring[1:-1, 1:-1] = False
      picked = names[ring]
    else:
      picked = names[(names != "white") & (names != "black")]
    if picked.size == 0:
      return "white"
    values, counts = np.unique(picked, return_counts=True)
    return str(values[counts.argmax()])
  if kind == "stack_height":
    return int(((names != "white") & (names != "black")).any(axis=1).sum())
  raise ValueError(f"unknown measurement kind {kind!r}")


def oracle_dynamic_answer(entry: dict[str, Any], image: np.ndarray | None) -> str:
  """Resolves a synthetic dynamic MCQ from the model's image at `entry["image_turn"]`.

  Returns the sorted union of the fixed letters and the letter whose option value equals the
  measurement, joined with no separator (the official resolved-answer form); only the fixed
  letters when the image is missing or matches no option.
  """
  letters = set(entry.get("fixed", ""))
  if image is not None:
    value = measure(entry["kind"], image, entry.get("colour"))
    letters |= {letter for letter, option in entry["options"].items() if option == value}
  return "".join(sorted(letters))


# --------------------------------------------------------------------------------- sample scripts


@dataclasses.dataclass
class _Script:
  """A sample under construction: turns, images, references, ground truth and oracle entries."""

  key: schema.SampleKey
  tasks: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  input_images: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  targets: dict[int, np.ndarray] = dataclasses.field(default_factory=dict)
  image_refs: dict[int, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
  dynamic: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  grids: dict[int, list[list[str]]] = dataclasses.field(default_factory=dict)

  @property
  def next_turn(self) -> int:
    return len(self.tasks) + 1

  def image_turn(
    self,
    text: str,
    target: np.ndarray,
    points: list[str],
    *,
    input_image: np.ndarray | None = None,
    refs: Sequence[tuple[int, str]] = (),
  ) -> int:
    turn = self.next_turn
    items: list[dict[str, str]] = [{"text": text}]
    refs = list(refs)
    if input_image is not None:
      key, index = self.key, len(self.input_images)
      name = f"{key.domain}__{key.subdomain}__{key.sample_id}__img_{index}.png"
      self.input_images[name] = input_image
      items.append({"image": name})
      refs.insert(0, (turn, "input"))
    self.tasks.append(
      {"turn": turn, "modality": "image", "input": items, "output": {"evaluation_points": points}}
    )
    self.targets[turn] = target
    if refs:
      self.image_refs[turn] = [{"ref_turn": r, "ref_type": t} for r, t in refs]
    return turn

  def static_mcq(self, question: str, options: Sequence[Any], correct: Any) -> int:
    text = f"{question}\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    self.tasks.append(
      {
        "turn": self.next_turn,
        "modality": "text",
        "input": [{"text": text}],
        "output": {"answer": LETTERS[list(options).index(correct)]},
      }
    )
    return self.next_turn - 1

  def dynamic_mcq(
    self,
    question: str,
    options: Sequence[Any],
    *,
    kind: str,
    image_turn: int,
    ref_turns: Sequence[int],
    colour: str | None = None,
    fixed_statement: str | None = None,
    labels: Sequence[str] | None = None,
  ) -> int:
    """A dynamic MCQ; `options` are the measured values, `labels` their text (default str)."""
    turn = self.next_turn
    labels = [str(o) for o in options] if labels is None else list(labels)
    shown = ([fixed_statement] if fixed_statement else []) + labels
    offset = 1 if fixed_statement else 0
    text = f"{question}\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(shown))
    answer = "A+<DYNAMIC>" if fixed_statement else "<DYNAMIC>"
    self.tasks.append(
      {"turn": turn, "modality": "text", "input": [{"text": text}], "output": {"answer": answer}}
    )
    entry = {
      "turn": turn,
      "image_turn": image_turn,
      "kind": kind,
      "options": {LETTERS[i + offset]: o for i, o in enumerate(options)},
      "fixed": "A" if fixed_statement else "",
      "ref_turn_idxs": list(ref_turns),
    }
    if colour is not None:
      entry["colour"] = colour
    self.dynamic.append(entry)
    return turn


def _cells_text(cells: list[tuple[int, int]]) -> str:
  return ", ".join(_CELL_NAMES[3 * a + b] for a, b in cells) or "none"


def _grid_points(grid: list[list[str]], what: str) -> list[str]:
  def where_is(value):
    return _cells_text([(a, b) for a in range(3) for b in range(3) if grid[a][b] == value])

  filled = _cells_text([(a, b) for a in range(3) for b in range(3) if grid[a][b] != "0"])
  return [
    f"The image shows a 3x3 grid with black lines on white ({what}).",
    f"Exactly these cells are filled: {filled}.",
    f"Exactly these cells are red: {where_is('r')}.",
    f"Exactly these cells are green: {where_is('g')}.",
  ]


def _grid_coloring(s: _Script, rng: np.random.Generator) -> None:
  order = [(a, b) for a in range(3) for b in range(3)]
  picks = [order[i] for i in rng.permutation(9)]
  grid = [["0"] * 3 for _ in range(3)]
  first = picks[: int(rng.integers(2, 5))]
  for a, b in first:
    grid[a][b] = "1"
  if rng.random() < 0.5:
    given, extra = first[:-1], first[-1]
    start = [["1" if (a, b) in given else "0" for b in range(3)] for a in range(3)]
    t1 = s.image_turn(
      f"The image shows a 3x3 grid. Redraw it with black lines on a white background and "
      f"also fill the {_CELL_NAMES[3 * extra[0] + extra[1]]} cell with grey.",
      draw_grid(grid),
      _grid_points(grid, "copied and extended"),
      input_image=draw_grid(start),
    )
  else:
    t1 = s.image_turn(
      f"Draw a 3x3 grid with black lines on a white background. Fill these cells with grey: "
      f"{_cells_text(first)}. Leave the other cells empty.",
      draw_grid(grid),
      _grid_points(grid, "drawn from the instruction"),
    )
  s.grids[t1] = [row[:] for row in grid]
  s.dynamic_mcq(
    "How many filled cells does the grid you just drew have?",
    [1, 2, 3, 4, 5, 6],
    kind="grid_count",
    colour="grey|red|green",
    image_turn=t1,
    ref_turns=[t1],
  )
  red, green = first[0], picks[5]
  grid[red[0]][red[1]] = "r"
  grid[green[0]][green[1]] = "g"
  t3 = s.image_turn(
    f"In your grid, colour the {_CELL_NAMES[3 * red[0] + red[1]]} cell red and the "
    f"{_CELL_NAMES[3 * green[0] + green[1]]} cell green. Keep everything else.",
    draw_grid(grid),
    _grid_points(grid, "edited"),
    refs=[(t1, "output")],
  )
  s.grids[t3] = [row[:] for row in grid]
  s.static_mcq(
    "Which cell of the grid were you asked to colour red?",
    [
      _CELL_NAMES[3 * red[0] + red[1]],
      _CELL_NAMES[3 * green[0] + green[1]],
      _CELL_NAMES[3 * picks[6][0] + picks[6][1]],
    ],
    _CELL_NAMES[3 * red[0] + red[1]],
  )
  s.dynamic_mcq(
    "Select every true statement about the grid you drew most recently.",
    [0, 1, 2],
    kind="grid_count",
    colour="red",
    image_turn=t3,
    ref_turns=[t3],
    fixed_statement="A 3x3 grid has nine cells.",
    labels=["It has no red cell.", "It has exactly one red cell.", "It has exactly two red cells."],
  )
  for a in range(3):
    for b in range(3):
      grid[a][b] = {"1": "r", "g": "0"}.get(grid[a][b], grid[a][b])
  t6 = s.image_turn(
    "Empty the green cell and colour every grey cell red. Keep the grid lines.",
    draw_grid(grid),
    _grid_points(grid, "edited again"),
    refs=[(t3, "output")],
  )
  s.grids[t6] = [row[:] for row in grid]


_MIXES = {
  ("red", "yellow"): "orange",
  ("blue", "yellow"): "green",
  ("red", "blue"): "purple",
  ("red", "white"): "pink",
  ("black", "white"): "grey",
  ("green", "red"): "brown",
}
_PAINTS = ("red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "grey", "cyan")


def _paint_mixing(s: _Script, rng: np.random.Generator) -> None:
  pair = list(_MIXES)[int(rng.integers(len(_MIXES)))]
  mix = _MIXES[pair]
  left, right = pair if rng.random() < 0.5 else pair[::-1]
  t1 = s.image_turn(
    "The image shows two paints. Paint the whole canvas in the colour you get by mixing them.",
    draw_canvas(mix),
    [f"The canvas is a single {mix} colour.", "Nothing else is drawn."],
    input_image=draw_swatches(left, right),
  )
  distractors = [c for c in _PAINTS if c != mix]
  options = [mix, *rng.choice(distractors, 3, replace=False).tolist()]
  rng.shuffle(options)
  s.static_mcq(f"Which colour do you get by mixing {left} and {right} paint?", options, mix)
  shown = [mix, *rng.choice(distractors, 4, replace=False).tolist()]
  rng.shuffle(shown)
  s.dynamic_mcq(
    "What colour is the canvas you painted?", shown, kind="dominant", image_turn=t1, ref_turns=[t1]
  )
  border = str(rng.choice([c for c in _PAINTS if c != mix]))
  t4 = s.image_turn(
    f"Add a thin {border} border around the edge of your canvas.",
    draw_canvas(mix, border),
    [
      f"A {border} border runs around the canvas.",
      f"The inside is still {mix}, as in the previous image.",
    ],
    refs=[(t1, "output")],
  )
  borders = [border, *rng.choice([c for c in _PAINTS if c != border], 2, replace=False).tolist()]
  rng.shuffle(borders)
  s.dynamic_mcq(
    "Select every true statement.",
    borders,
    kind="border",
    image_turn=t4,
    ref_turns=[t4],
    fixed_statement=f"Mixing {left} and {right} paint gives {mix}.",
    labels=[f"The border is {c}." for c in borders],
  )
  fill = str(rng.choice([c for c in _PAINTS if c not in (border, mix)]))
  s.image_turn(
    f"Repaint the inside of the canvas {fill}; keep the border.",
    draw_canvas(fill, border),
    [f"The inside is {fill}.", f"The {border} border is unchanged."],
    refs=[(t4, "output")],
  )


def _block_stacking(s: _Script, rng: np.random.Generator) -> None:
  colour = str(rng.choice(["red", "blue", "green", "orange", "purple"]))
  count, added = int(rng.integers(1, 5)), int(rng.integers(1, 4))
  t1 = s.image_turn(
    f"Draw a stack of {count} {colour} blocks on a white background.",
    draw_stack(count, colour),
    [
      f"There are exactly {count} blocks.",
      f"The blocks are {colour}.",
      "The blocks are stacked vertically.",
    ],
  )
  s.dynamic_mcq(
    "How many blocks are in the stack you drew?",
    [1, 2, 3, 4, 5, 6],
    kind="stack_height",
    image_turn=t1,
    ref_turns=[t1],
  )
  t3 = s.image_turn(
    f"Add {added} more blocks of the same colour on top of your stack.",
    draw_stack(count + added, colour),
    [f"{added} blocks were added on top.", "The original blocks are unchanged."],
    refs=[(t1, "output")],
  )
  options = sorted({count + added, count, added, count + added + 1, abs(count - added) or 2})
  s.static_mcq(
    f"A stack of {count} blocks gets {added} more. How many blocks does it have?",
    options,
    count + added,
  )
  s.dynamic_mcq(
    "How many blocks does your stack have now?",
    [1, 2, 3, 4, 5, 6, 7],
    kind="stack_height",
    image_turn=t3,
    ref_turns=[t3, t1],
  )
  removed = int(rng.integers(1, count + added))
  s.image_turn(
    f"Remove the top {removed} blocks from your stack.",
    draw_stack(count + added - removed, colour),
    [f"Exactly {removed} blocks were removed from the top.", "The remaining blocks did not move."],
    refs=[(t3, "output")],
  )


_LIQUIDS = {
  "lemon juice": "acidic",
  "vinegar": "acidic",
  "soap water": "basic",
  "baking soda solution": "basic",
  "pure water": "neutral",
}


def _litmus_after(colour: str, liquid: str) -> str:
  return {"acidic": "red", "basic": "blue", "neutral": colour}[_LIQUIDS[liquid]]


def _litmus_test(s: _Script, rng: np.random.Generator) -> None:
  liquids = list(_LIQUIDS)
  first, second = (liquids[i] for i in rng.permutation(len(liquids))[:2])
  colour = _litmus_after("purple", first)
  t1 = s.image_turn(
    f"The image shows a purple litmus strip. It is dipped into {first}. Draw the "
    "strip after dipping.",
    draw_strip(colour),
    [f"The strip is {colour}.", "The strip keeps its shape and position."],
    input_image=draw_strip("purple"),
  )
  s.dynamic_mcq(
    "What colour is the strip you drew?",
    ["red", "blue", "purple", "green"],
    kind="dominant",
    image_turn=t1,
    ref_turns=[t1],
  )
  s.static_mcq(f"{first.capitalize()} is:", ["acidic", "basic", "neutral"], _LIQUIDS[first])
  after = _litmus_after(colour, second)
  t4 = s.image_turn(
    f"The same strip is then dipped into {second}. Draw it afterwards.",
    draw_strip(after),
    [f"The strip is {after}.", "Nothing else changed."],
    refs=[(t1, "output")],
  )
  s.dynamic_mcq(
    "What colour is the strip now?",
    ["red", "blue", "purple", "green"],
    kind="dominant",
    image_turn=t4,
    ref_turns=[t4, t1],
  )
  s.static_mcq(f"{second.capitalize()} is:", ["acidic", "basic", "neutral"], _LIQUIDS[second])


# Synthetic subdomains in the grid-scorer format (pass to the scorer's grid override).
GRID_SUBDOMAINS = ("grid_coloring",)

DOMAINS: tuple[tuple[str, str, Callable[[_Script, np.random.Generator], None]], ...] = (
  ("Geometric_Coloring", "grid_coloring", _grid_coloring),
  ("Color_Reasoning", "paint_mixing", _paint_mixing),
  ("Stack_Simulation", "block_stacking", _block_stacking),
  ("Chemistry", "litmus_test", _litmus_test),
)


def make_sample(index: int, seed: int, *, min_turns: int = 2, max_turns: int = 6) -> _Script:
  """Sample `index` (domains in rotation, ids 1-based per domain), cut to 2-6 turns."""
  domain, subdomain, script_fn = DOMAINS[index % len(DOMAINS)]
  rng = np.random.default_rng([seed, index])
  script = _Script(schema.SampleKey(domain, subdomain, str(index // len(DOMAINS) + 1)))
  script_fn(script, rng)
  keep = int(rng.integers(min_turns, min(max_turns, len(script.tasks)) + 1))
  script.tasks = script.tasks[:keep]
  script.targets = {t: v for t, v in script.targets.items() if t <= keep}
  script.image_refs = {t: v for t, v in script.image_refs.items() if t <= keep}
  script.dynamic = [d for d in script.dynamic if d["turn"] <= keep]
  script.grids = {t: v for t, v in script.grids.items() if t <= keep}
  used = {item["image"] for task in script.tasks for item in task["input"] if "image" in item}
  script.input_images = {k: v for k, v in script.input_images.items() if k in used}
  return script


def write_synthetic(out: str | Path, num_samples: int, seed: int = 0) -> release.Release:
  """Writes the synthetic benchmark under `out` and returns it loaded and cross-checked."""
  if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
    raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
  out = Path(out)
  for sub in (release.IMAGES, release.GRID_GT, GROUND_TRUTH):
    (out / sub).mkdir(parents=True, exist_ok=True)
  scripts = [make_sample(i, seed) for i in range(num_samples)]
  samples, image_refs, dynamic_refs, meta = [], [], [], []
  for s in scripts:
    key = s.key
    samples.append(
      {
        "domain": key.domain,
        "subdomain": key.subdomain,
        "sample_id": key.sample_id,
        "system_prompt": "You are a unified model. Answer multiple-choice questions "
        "with the option letters only.",
        "tasks": s.tasks,
      }
    )
    image_refs.append(
      {
        "sample_id": key.sample_id,
        "domain": key.domain,
        "subdomain": key.subdomain,
        "reference_links": [{"turn_idx": t, "refs": r} for t, r in sorted(s.image_refs.items())],
      }
    )
    for d in s.dynamic:
      dynamic_refs.append(
        {
          "domain": key.domain,
          "subdomain": key.subdomain,
          "sample_id": key.sample_id,
          "turn_idx": d["turn"],
          "ref_turn_idxs": d["ref_turn_idxs"],
        }
      )
    meta.append(
      {
        "domain": key.domain,
        "subdomain": key.subdomain,
        "sample_id": key.sample_id,
        "dynamic": s.dynamic,
      }
    )
    for name, tokens in s.input_images.items():
      (out / release.IMAGES / name).write_bytes(itok.png_bytes(TOKENIZER.decode(tokens)))
    for turn, tokens in s.targets.items():
      (out / GROUND_TRUTH / ground_truth_name(key, turn)).write_bytes(
        itok.png_bytes(TOKENIZER.decode(tokens))
      )
    if s.grids:
      schema.write_jsonl(
        out / release.GRID_GT / key.grid_gt_name,
        [{"turn": t, "grid": g} for t, g in sorted(s.grids.items())],
      )
  schema.write_jsonl(out / release.BENCHMARK, samples)
  schema.write_jsonl(out / release.IMAGE_REFERENCES, image_refs)
  schema.write_jsonl(out / release.DYNAMIC_REFERENCES, dynamic_refs)
  schema.write_jsonl(out / META, meta)
  return release.load_release(out)


def load_meta(root: str | Path) -> dict[tuple[schema.SampleKey, int], dict[str, Any]]:
  """(sample, dynamic turn) -> oracle entry, from `synthetic_meta.jsonl`."""
  table = {}
  for _, raw in schema.read_jsonl(Path(root) / META):
    key = schema.SampleKey(raw["domain"], raw["subdomain"], raw["sample_id"])
    for entry in raw["dynamic"]:
      table[(key, entry["turn"])] = entry
  return table


def ground_truth_images(root: str | Path) -> dict[tuple[schema.SampleKey, int], Path]:
  """(sample, image turn) -> ground-truth target PNG: the reference-history source."""
  table = {}
  for path in sorted((Path(root) / GROUND_TRUTH).glob("*__turn_*.png")):
    domain, subdomain, sample_id, turn = path.stem.split("__")
    table[(schema.SampleKey(domain, subdomain, sample_id), int(turn[len("turn_") :]))] = path
  return table


def ground_truth_answer(
  key: schema.SampleKey,
  task: schema.Turn,
  truth: dict[tuple[schema.SampleKey, int], Path],
  meta: dict[tuple[schema.SampleKey, int], dict[str, Any]],
) -> str:
  """The gold reply of a text turn: its answer, or for a dynamic one the oracle's answer on the
  ground-truth image it depends on (`truth` from `ground_truth_images`, `meta` from `load_meta`)."""
  if not task.is_dynamic:
    return task.answer
  entry = meta[(key, task.turn)]
  image = itok.read_image(truth[(key, entry["image_turn"])].read_bytes())
  return oracle_dynamic_answer(entry, image)


_PLAN_FILLS = ("grey", "red", "green")  # The grid's fill colours, in the order a plan lists them.


def plan_text(subdomain: str, tokens: np.ndarray) -> str:
  """The chain-of-thought plan of a target image: what it shows, read exactly off its lattice.

  `tokens` is the target's palette tokens [G, G] (`judges.oracle.lattice_tokens`). Per script:
  grid_coloring "Grid. grey: top-left, centre. red: top-right." (filled cells per colour, or
  "Empty grid."); paint_mixing "orange canvas, red border." (no border clause without one);
  block_stacking "3 blue blocks."; litmus_test "red strip.".
  """
  tokens = np.asarray(tokens)
  if tokens.shape != (_G, _G):
    raise ValueError(f"plan_text: tokens must be [{_G}, {_G}], got {tokens.shape}")
  names = np.asarray(itok.COLOUR_NAMES, dtype=object)[TOKENIZER.colours(tokens)]
  if subdomain == "grid_coloring":
    cells: dict[str, list[str]] = {}
    for a in range(3):
      for b in range(3):
        fill = names[a * _CELL + 1, b * _CELL + 1]  # Inside the gutter: the cell's fill.
        if fill != "white":
          cells.setdefault(str(fill), []).append(_CELL_NAMES[3 * a + b])
    order = sorted(cells, key=lambda c: (_PLAN_FILLS.index(c) if c in _PLAN_FILLS else 9, c))
    parts = [f"{colour}: {', '.join(cells[colour])}." for colour in order]
    return " ".join(["Grid.", *parts]) if parts else "Empty grid."
  if subdomain == "paint_mixing":
    inside, edge = names[_G // 2, _G // 2], names[0, 0]
    return f"{inside} canvas." if edge == inside else f"{inside} canvas, {edge} border."
  if subdomain == "block_stacking":
    painted = (names != "white") & (names != "black")
    if not painted.any():
      return "No blocks."
    values, counts = np.unique(names[painted], return_counts=True)
    return f"{int(painted.any(axis=1).sum())} {values[counts.argmax()]} blocks."
  if subdomain == "litmus_test":
    return f"{names[_G // 2, _G // 2 - 1]} strip."
  raise ValueError(f"plan_text: no plan for subdomain {subdomain!r}; known: {_SUBDOMAINS}")


_SUBDOMAINS = tuple(subdomain for _, subdomain, _ in DOMAINS)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num_samples", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  if args.num_samples < 1:
    parser.error(f"--num_samples must be >= 1, got {args.num_samples}")
  bench = write_synthetic(args.out, args.num_samples, args.seed)
  turns = sum(len(s.tasks) for s in bench.samples or ())
  print(f"wrote {len(bench.samples or ())} samples, {turns} turns to {bench.data_dir}")


if __name__ == "__main__":
  main()
