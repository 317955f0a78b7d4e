"""Deterministic 3x3 grid scorer for Geometric_Coloring image turns (official `score_grid.py`).

For the subdomains cubes_coloring, cubes_completion and cubes_synthesis the judge's record for an
image turn is replaced by this scorer whenever a ground-truth grid exists for that turn.

Detection (OpenCV, BGR input, exactly the official operations and constants):
  1. grayscale -> adaptiveThreshold(GAUSSIAN_C, BINARY_INV, block 15, C 10) -> external contours;
     the bounding box of all contour points together is the grid.
  2. erode the binary image 3x3 once, fill external contours with area > 50, crop both the filled
     mask and the colour image to the grid box and resize them to 300x300 (cells of 100 px).
  3. a cell is "0" if the mean of the filled mask over the cell minus a 10 px margin is < 15;
     otherwise its HSV pixels (20 px margin) decide: "r" if the red-mask mean > 30
     (H in [0,10] or [160,180], S >= 70, V >= 40), else "g" if the green-mask mean > 30
     (H in [35,95], S >= 70, V >= 40), else "1".
Points (each 0 or 5): p1 grid found; p2 occupancy pattern equal (if not, stop here); p3 red cells
exactly equal (only with >= 3 points); p4 green cells exactly equal (only with >= 4 points).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

GRID_DOMAIN = "Geometric_Coloring"
GRID_SUBDOMAINS = ("cubes_coloring", "cubes_completion", "cubes_synthesis")
CELL_VALUES = ("0", "1", "r", "g")

_RED_RANGES = (((0, 70, 40), (10, 255, 255)), ((160, 70, 40), (180, 255, 255)))
_GREEN_RANGE = ((35, 70, 40), (95, 255, 255))
_CANVAS = 300
_CELL = 100
_OCCUPANCY_MARGIN = 10
_COLOUR_MARGIN = 20


@dataclasses.dataclass(frozen=True)
class GridDetection:
  """Result of reading one image: `matrix` is 3x3 of "0"/"1"/"r"/"g", or None with a reason."""

  matrix: list[list[str]] | None
  status: str


def is_grid_task(domain: str, subdomain: str) -> bool:
  return domain == GRID_DOMAIN and subdomain in GRID_SUBDOMAINS


def detect_grid(image: str | Path | np.ndarray) -> GridDetection:
  """Reads the 3x3 cell states from an image path or a BGR uint8 array [H, W, 3]."""
  if isinstance(image, (str, Path)):
    bgr = cv2.imread(str(image))
    if bgr is None:
      return GridDetection(None, "Image read failed")
  else:
    bgr = np.asarray(image)
    if bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
      raise ValueError(f"expected a BGR uint8 image [H, W, 3], got {bgr.dtype} {bgr.shape}")
  gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
  binary = cv2.adaptiveThreshold(
    gray, 255, cv2.ADAPTIVE_THRESH_GAUSSIAN_C, cv2.THRESH_BINARY_INV, 15, 10
  )
  outline_contours, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  if not outline_contours:
    return GridDetection(None, "Grid not found")
  x, y, width, height = cv2.boundingRect(np.concatenate(outline_contours))
  eroded = cv2.erode(binary, np.ones((3, 3), np.uint8), iterations=1)
  blob_contours, _ = cv2.findContours(eroded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  filled = np.zeros_like(eroded)
  for contour in blob_contours:
    if cv2.contourArea(contour) > 50:
      cv2.drawContours(filled, [contour], -1, 255, -1)
  size = (_CANVAS, _CANVAS)
  filled = cv2.resize(filled[y : y + height, x : x + width], size)
  hsv = cv2.cvtColor(cv2.resize(bgr[y : y + height, x : x + width], size), cv2.COLOR_BGR2HSV)
  matrix = []
  for row in range(3):
    cells = []
    for col in range(3):
      if _inner(filled, row, col, _OCCUPANCY_MARGIN).mean() < 15:
        cells.append("0")
        continue
      patch = _inner(hsv, row, col, _COLOUR_MARGIN)
      red = cv2.bitwise_or(cv2.inRange(patch, *_RED_RANGES[0]), cv2.inRange(patch, *_RED_RANGES[1]))
      green = cv2.inRange(patch, *_GREEN_RANGE)
      cells.append("r" if red.mean() > 30 else "g" if green.mean() > 30 else "1")
    matrix.append(cells)
  return GridDetection(matrix, "OK")


def point_scores(
  detected: Sequence[Sequence[str]] | None, truth: Sequence[Sequence[str]], num_points: int
) -> list[tuple[int, int]]:
  """Official point scores [(point_id, 0|5)] for a detected grid against the ground truth.

  Parity detail: like the official code, p1 and p2 are written when earned even if the task lists
  fewer points, so a one-point task whose pattern matches gets two point records.
  """
  scores = {point_id: 0 for point_id in range(1, num_points + 1)}
  if detected is None:
    return sorted(scores.items())
  scores[1] = 5
  if _pattern(detected, lambda v: v != "0") != _pattern(truth, lambda v: v != "0"):
    return sorted(scores.items())
  scores[2] = 5
  if num_points >= 3:
    scores[3] = 5 if _pattern(detected, "r".__eq__) == _pattern(truth, "r".__eq__) else 0
  if num_points >= 4:
    scores[4] = 5 if _pattern(detected, "g".__eq__) == _pattern(truth, "g".__eq__) else 0
  return sorted(scores.items())


def score_image(
  image: str | Path | np.ndarray, truth: Sequence[Sequence[str]], num_points: int
) -> tuple[list[tuple[int, int]], GridDetection]:
  """Detects the grid in `image` and returns (point scores, detection)."""
  detection = detect_grid(image)
  return point_scores(detection.matrix, truth, num_points), detection


def _inner(array: np.ndarray, row: int, col: int, margin: int) -> np.ndarray:
  top, left = row * _CELL, col * _CELL
  return array[top + margin : top + _CELL - margin, left + margin : left + _CELL - margin]


def _pattern(grid: Sequence[Sequence[str]], predicate) -> list[list[bool]]:
  return [[bool(predicate(value)) for value in row] for row in grid]
