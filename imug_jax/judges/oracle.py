"""The synthetic benchmark's oracle judge: exact, deterministic scores against the ground truth.

On the synthetic benchmark (`imug_jax.data.synthetic`) every image turn has its exact target
image, drawn on the palette-patch lattice, and every dynamic question an exact resolution rule.
The oracle needs no network and no model, and gives the same score in every run:

  * image turn: the model's image is read back onto the lattice (`PaletteTokenizer.encode`, a
    [G, G] token per patch: colour and edge lines). The foreground is every patch that is not
    plain white (no colour, no line) in the target or in the candidate; the match is the
    fraction of foreground patches whose token equals the target's (1 when both are blank).
    Every evaluation point scores 5 x match, a real number in [0, 5]: an exact copy scores 5,
    one wrong grid cell a little less, a blank or unrelated image 0. The finer scale than the
    judge's integers keeps small differences between runs visible.
  * dynamic MCQ: `synthetic.oracle_dynamic_answer` measured on the model's own image of the
    turn the question asks about (the fixed letters only when it drew none).

`imug_jax.scoring.pipeline.score_model` uses these two methods instead of chat calls when it is
given an `OracleJudge`; it has no `chat`, so it can never stand in for a model-facing verifier.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imug_jax.data import synthetic
from imug_jax.data.schema import SampleKey, Turn
from imug_jax.models import image_tokenizer as itok

PLAIN_WHITE = synthetic.TOKENIZER.token("white")
MAX_POINT_SCORE = 5.0


def lattice_tokens(image: np.ndarray) -> np.ndarray:
  """Image uint8 [H, W, 3] -> palette tokens int32 [G, G] of the synthetic lattice."""
  grid = synthetic.TOKENIZER.grid
  return synthetic.TOKENIZER.encode(image).reshape(grid, grid)


def patch_match(target: np.ndarray, candidate: np.ndarray) -> float:
  """Fraction of foreground patches where `candidate` has `target`'s token; both int [G, G]."""
  target, candidate = np.asarray(target), np.asarray(candidate)
  if target.shape != candidate.shape:
    raise ValueError(f"token grids differ in shape: {target.shape} vs {candidate.shape}")
  foreground = (target != PLAIN_WHITE) | (candidate != PLAIN_WHITE)
  if not foreground.any():
    return 1.0
  return float((target == candidate)[foreground].mean())


class OracleJudge:
  """Scores a synthetic benchmark's turns against its exact ground truth (module docstring).

  Args:
    data_dir: the synthetic benchmark folder (with `ground_truth/` and `synthetic_meta.jsonl`).
  """

  name = "oracle"

  def __init__(self, data_dir: str | Path):
    self.data_dir = Path(data_dir)
    if not (self.data_dir / synthetic.META).is_file():
      raise FileNotFoundError(
        f"{self.data_dir}: no {synthetic.META}; the oracle judge scores only the synthetic "
        "benchmark (imug_jax.data.synthetic), whose ground truth it reads"
      )
    self.truth = synthetic.ground_truth_images(self.data_dir)
    self.meta = synthetic.load_meta(self.data_dir)
    self._targets: dict[tuple[SampleKey, int], np.ndarray] = {}

  def target(self, key: SampleKey, turn: int) -> np.ndarray:
    """The ground-truth tokens [G, G] of an image turn."""
    if (key, turn) not in self._targets:
      path = self.truth.get((key, turn))
      if path is None:
        raise KeyError(f"{self.data_dir}: no ground-truth image for sample {key} turn {turn}")
      self._targets[(key, turn)] = lattice_tokens(itok.read_image(path.read_bytes()))
    return self._targets[(key, turn)]

  def match(self, key: SampleKey, turn: int, image_path: Path | None) -> float:
    """`patch_match` of the model's image (0 when it has none) with the turn's target."""
    target = self.target(key, turn)
    if image_path is None:
      return 0.0
    return patch_match(target, lattice_tokens(itok.read_image(Path(image_path).read_bytes())))

  def score_image(self, key: SampleKey, task: Turn, image_path: Path | None) -> dict:
    """{"match", "points": one {"point_id", "score": 5 x match, "reason"} per evaluation point}."""
    value = self.match(key, task.turn, image_path)
    reason = "no image output" if image_path is None else f"patch match {value:.3f}"
    points = [
      {"point_id": i + 1, "score": round(MAX_POINT_SCORE * value, 4), "reason": reason}
      for i in range(len(task.evaluation_points or ()))
    ]
    return {"match": round(value, 4), "points": points}

  def dynamic_entry(self, key: SampleKey, turn: int) -> dict:
    """The oracle entry of a dynamic turn (its "image_turn" is the image it asks about)."""
    entry = self.meta.get((key, turn))
    if entry is None:
      raise KeyError(f"{self.data_dir / synthetic.META}: no entry for sample {key} turn {turn}")
    return entry

  def dynamic_answer(self, entry: dict, image_path: Path | None) -> str:
    """The resolved answer of a dynamic turn from the model's image (None: it drew none)."""
    image = None if image_path is None else itok.read_image(Path(image_path).read_bytes())
    return synthetic.oracle_dynamic_answer(entry, image)
