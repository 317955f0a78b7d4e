"""The Geometric_Coloring grid scorer: rendered grids, noise, near-miss colours, real truths."""

import cv2
import numpy as np
import pytest
from _paths import data_file

from imug_jax.data import schema
from imug_jax.scoring import grid

GRID_GT = data_file("imug", "data", "grid_gt")

# BGR fills. Near misses sit just outside the official HSV rules.
FILLS = {
  "r": (30, 30, 220),  # H 0, S 220
  "g": (40, 170, 40),  # H 60
  "1": (200, 150, 90),  # blue, H ~ 103
  "orange": (0, 140, 255),  # H ~ 16: not red (red ends at 10)
  "yellow": (0, 200, 200),  # H 30: not green (green starts at 35)
  "pale_red": (200, 190, 235),  # S ~ 49 < 70
  "dark_red": (0, 0, 32),  # V 32 < 40
  "magenta": (220, 30, 220),  # H 150: between the two red ranges
}
NEAR_MISS_READS_AS = dict.fromkeys(["orange", "yellow", "pale_red", "dark_red", "magenta"], "1")


def render(cells, *, cell=120, pad=40, noise=0.0, seed=0):
  """A white canvas with thin grid lines and bordered, filled cubes; BGR uint8 [H, W, 3]."""
  size = 2 * pad + 3 * cell
  image = np.full((size, size, 3), 255, np.uint8)
  for i in range(4):
    p = pad + i * cell
    cv2.line(image, (pad, p), (pad + 3 * cell, p), (160, 160, 160), 1)
    cv2.line(image, (p, pad), (p, pad + 3 * cell), (160, 160, 160), 1)
  for r in range(3):
    for c in range(3):
      if cells[r][c] == "0":
        continue
      x0, y0 = pad + c * cell + 8, pad + r * cell + 8
      corner = (x0 + cell - 16, y0 + cell - 16)
      cv2.rectangle(image, (x0, y0), corner, FILLS[cells[r][c]], -1)
      cv2.rectangle(image, (x0, y0), corner, (20, 20, 20), 4)
  if noise:
    rng = np.random.default_rng(seed)
    image = np.clip(image + rng.normal(0, noise, image.shape), 0, 255).astype(np.uint8)
  return image


@pytest.mark.parametrize("noise", [0.0, 8.0])
@pytest.mark.parametrize(
  "cells",
  [
    [["r", "0", "g"], ["0", "1", "0"], ["g", "0", "r"]],
    [["1", "0", "0"], ["0", "0", "0"], ["0", "0", "1"]],
    [["g", "g", "g"], ["r", "1", "r"], ["1", "0", "1"]],
  ],
)
def test_detects_rendered_grids(cells, noise):
  detection = grid.detect_grid(render(cells, noise=noise, seed=len(str(cells))))
  assert detection.status == "OK"
  assert detection.matrix == cells


def test_near_miss_colours_are_plain_cubes():
  cells = [["orange", "yellow", "0"], ["pale_red", "0", "dark_red"], ["0", "magenta", "r"]]
  expected = [[NEAR_MISS_READS_AS.get(v, v) for v in row] for row in cells]
  for noise in (0.0, 5.0):
    assert grid.detect_grid(render(cells, noise=noise)).matrix == expected


def test_blank_and_unreadable_images(tmp_path):
  blank = np.full((300, 300, 3), 255, np.uint8)
  assert grid.detect_grid(blank) == grid.GridDetection(None, "Grid not found")
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"not a png")
  scores, detection = grid.score_image(bad, [["1"] * 3] * 3, 4)
  assert detection.status == "Image read failed"
  assert scores == [(1, 0), (2, 0), (3, 0), (4, 0)]


def test_point_scores_follow_the_official_rules():
  truth = [["g", "r", "0"], ["0", "0", "0"], ["1", "0", "0"]]
  assert grid.point_scores(truth, truth, 4) == [(1, 5), (2, 5), (3, 5), (4, 5)]
  wrong_shape = [["g", "r", "1"], ["0", "0", "0"], ["1", "0", "0"]]
  assert grid.point_scores(wrong_shape, truth, 4) == [(1, 5), (2, 0), (3, 0), (4, 0)]
  swapped = [["r", "g", "0"], ["0", "0", "0"], ["1", "0", "0"]]
  assert grid.point_scores(swapped, truth, 4) == [(1, 5), (2, 5), (3, 0), (4, 0)]
  extra_green = [["g", "r", "0"], ["0", "0", "0"], ["g", "0", "0"]]
  assert grid.point_scores(extra_green, truth, 4) == [(1, 5), (2, 5), (3, 5), (4, 0)]
  assert grid.point_scores(truth, truth, 2) == [(1, 5), (2, 5)]
  assert grid.point_scores(None, truth, 3) == [(1, 0), (2, 0), (3, 0)]
  # Parity quirk: p2 is written even when the task lists a single point.
  assert grid.point_scores(truth, truth, 1) == [(1, 5), (2, 5)]


def test_real_ground_truths_round_trip(tmp_path):
  """Every released grid_gt grid, rendered and written as PNG, scores 5 on all four points."""
  truths = schema.load_grid_gt(GRID_GT)
  assert len(truths) == 24
  checked = 0
  for key, turns in truths.items():
    assert grid.is_grid_task(key.domain, key.subdomain)
    for turn, truth in turns.items():
      if all(v == "0" for row in truth for v in row):
        continue  # nothing to draw: no grid can be detected in an empty canvas
      path = tmp_path / f"{key.subdomain}_{key.sample_id}_{turn}.png"
      cv2.imwrite(str(path), render(truth, noise=4.0, seed=turn))
      scores, detection = grid.score_image(path, truth, 4)
      assert detection.matrix == [list(r) for r in truth], (key, turn)
      assert scores == [(1, 5), (2, 5), (3, 5), (4, 5)]
      checked += 1
  assert checked >= 40


def test_rejects_non_bgr_arrays():
  with pytest.raises(ValueError, match="BGR uint8"):
    grid.detect_grid(np.zeros((10, 10), np.float32))


# Threshold probes: an image whose grid box is exactly the 300 px canvas, so no resize blurs the
# pixel counts. The occupancy mean is 255 x (filled share of the 80x80 cell interior; a dark
# w x h block fills (w-2)(h-2) after the 3x3 erosion), the colour means 255 x (share of the 60x60
# colour patch). Official thresholds: occupancy mean >= 15, colour mean > 30.
PROBE_PAD = 50
DARK, RED, GREEN = (60, 60, 60), (0, 0, 255), (0, 255, 0)


def _probe_canvas():
  image = np.full((400, 400, 3), 255, np.uint8)
  cv2.rectangle(image, (PROBE_PAD, PROBE_PAD), (PROBE_PAD + 299, PROBE_PAD + 299), (0, 0, 0), 1)
  return image


def _block(image, row, col, width, height, colour, dx=20, dy=20):
  """A solid block with its top-left corner at (dx, dy) inside cell (row, col)."""
  x0, y0 = PROBE_PAD + col * 100 + dx, PROBE_PAD + row * 100 + dy
  image[y0 : y0 + height, x0 : x0 + width] = colour


def _plain_cube(image, row, col):
  """A bordered blue cube covering the cell interior (occupied, neither red nor green)."""
  x0, y0 = PROBE_PAD + col * 100 + 10, PROBE_PAD + row * 100 + 10
  cv2.rectangle(image, (x0, y0), (x0 + 79, y0 + 79), FILLS["1"], -1)
  cv2.rectangle(image, (x0, y0), (x0 + 79, y0 + 79), (20, 20, 20), 4)


def test_occupancy_and_colour_thresholds_at_the_boundary():
  image = _probe_canvas()
  # Occupancy: 17 x 22 = 374 filled px (mean 14.90) is empty; 21 x 18 = 378 (15.06) is a cube.
  _block(image, 0, 0, 19, 24, DARK, dx=40, dy=38)
  _block(image, 0, 1, 23, 20, DARK, dx=38, dy=40)
  for col in range(3):
    _plain_cube(image, 1, col)
    _plain_cube(image, 2, col)
  # Colour: 423 px of the 3600 (mean 29.96) is not enough, 424 px (30.03) is.
  _block(image, 1, 0, 9, 47, RED)
  _block(image, 1, 1, 8, 53, RED)
  _block(image, 1, 2, 8, 53, GREEN)
  _block(image, 2, 0, 9, 47, GREEN)
  _block(image, 2, 1, 8, 53, RED)  # both above the threshold: red wins
  _block(image, 2, 1, 8, 53, GREEN, dx=40)
  _block(image, 2, 2, 9, 47, RED)  # red just below, green just above: green
  _block(image, 2, 2, 8, 53, GREEN, dx=40)
  expected = [["0", "1", "0"], ["1", "r", "g"], ["1", "r", "g"]]
  assert grid.detect_grid(image).matrix == expected
