"""Palette-patch image tokenizer: an image is a G x G lattice of flat-colour patches.

Each patch of P x P pixels is one discrete token `colour * 16 + edges`: a colour from a small
fixed palette and 4 edge bits (top, bottom, left, right) that draw a 1-pixel black line on that
side of the patch. Lines on patch edges let the tokenizer represent grids (black lines on white
with coloured cells, the Geometric_Coloring format read by the OpenCV grid scorer), swatches and
stacked blocks exactly; the synthetic benchmark draws all its images on this lattice, so its
ground truth round-trips (`encode(decode(tokens)) == tokens` for canonical tokens).

Encoding an arbitrary image resizes it to G*P square, takes each patch's median inner colour
(nearest palette entry) and sets an edge bit where that 1-pixel border row/column is dark.
Canonical form: a black patch carries no edge bits (they would be invisible).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

# Palette: (name, RGB). Red and green fall in the grid scorer's HSV ranges
# (red H in [0,10] or [160,180], green H in [35,95], S >= 70, V >= 40); grey has no saturation.
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
  ("white", (255, 255, 255)),
  ("black", (0, 0, 0)),
  ("grey", (110, 110, 110)),
  ("red", (220, 30, 30)),
  ("green", (40, 170, 60)),
  ("blue", (40, 80, 220)),
  ("yellow", (240, 220, 40)),
  ("orange", (245, 140, 30)),
  ("purple", (130, 50, 170)),
  ("pink", (245, 160, 190)),
  ("brown", (120, 75, 40)),
  ("cyan", (60, 200, 220)),
)
COLOUR_NAMES = tuple(name for name, _ in PALETTE)
EDGE_TOP, EDGE_BOTTOM, EDGE_LEFT, EDGE_RIGHT = 1, 2, 4, 8
NUM_EDGE_CODES = 16
_DARK = 60  # A border pixel darker than this (max over channels) counts as a line.


def colour_index(name: str) -> int:
  return COLOUR_NAMES.index(name)


@dataclasses.dataclass(frozen=True)
class PaletteTokenizer:
  """Tokens <-> images on a `grid x grid` lattice of `patch x patch` pixel patches.

  Attributes:
    grid: patches per side (G); an image has G*G tokens, row-major.
    patch: pixels per patch side (P); images are G*P pixels square.
  """

  grid: int = 12
  patch: int = 8

  @property
  def vocab_size(self) -> int:
    return len(PALETTE) * NUM_EDGE_CODES

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  @property
  def image_size(self) -> int:
    return self.grid * self.patch

  @staticmethod
  def token(colour: int | str, edges: int = 0) -> int:
    """Token id of a patch: colour index or name, edge bits (EDGE_* ORed)."""
    if isinstance(colour, str):
      colour = colour_index(colour)
    if colour == colour_index("black"):
      edges = 0
    return colour * NUM_EDGE_CODES + edges

  def decode(self, tokens: np.ndarray) -> np.ndarray:
    """Tokens [G*G] or [G, G] int -> image uint8 [G*P, G*P, 3]."""
    tokens = np.asarray(tokens).reshape(self.grid, self.grid)
    if tokens.min() < 0 or tokens.max() >= self.vocab_size:
      raise ValueError(
        f"image tokens must lie in [0, {self.vocab_size}), got [{tokens.min()}, {tokens.max()}]"
      )
    colours = np.array([rgb for _, rgb in PALETTE], np.uint8)[tokens // NUM_EDGE_CODES]
    image = np.repeat(np.repeat(colours, self.patch, axis=0), self.patch, axis=1)
    edges = np.repeat(np.repeat(tokens % NUM_EDGE_CODES, self.patch, 0), self.patch, 1)
    offset = np.arange(self.image_size) % self.patch  # Pixel offset inside its patch.
    row, col = offset[:, None], offset[None, :]
    line = (
      (((edges & EDGE_TOP) != 0) & (row == 0))
      | (((edges & EDGE_BOTTOM) != 0) & (row == self.patch - 1))
      | (((edges & EDGE_LEFT) != 0) & (col == 0))
      | (((edges & EDGE_RIGHT) != 0) & (col == self.patch - 1))
    )
    image[line] = 0
    return image

  def encode(self, image: np.ndarray) -> np.ndarray:
    """Image uint8 [H, W, 3] (any size; resized to G*P) -> tokens int32 [G*G]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
      raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    size = self.image_size
    if image.shape[:2] != (size, size):
      image = np.asarray(
        Image.fromarray(image.astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST)
      )
    p, g = self.patch, self.grid
    patches = image.reshape(g, p, g, p, 3).transpose(0, 2, 1, 3, 4).astype(np.int32)  # [G,G,p,p,3]
    inner = patches[:, :, 1:-1, 1:-1].reshape(g, g, -1, 3)
    median = np.median(inner, axis=2)  # [G, G, 3]
    palette = np.array([rgb for _, rgb in PALETTE], np.float32)
    distance = ((median[:, :, None, :] - palette[None, None]) ** 2).sum(-1)
    colour = distance.argmin(-1)

    def dark(border: np.ndarray) -> np.ndarray:  # [G, G, p, 3] -> [G, G]
      return (border.max(-1) < _DARK).mean(-1) >= 0.75

    edges = (
      dark(patches[:, :, 0]) * EDGE_TOP
      + dark(patches[:, :, -1]) * EDGE_BOTTOM
      + dark(patches[:, :, :, 0]) * EDGE_LEFT
      + dark(patches[:, :, :, -1]) * EDGE_RIGHT
    )
    edges = np.where(colour == colour_index("black"), 0, edges)
    return (colour * NUM_EDGE_CODES + edges).reshape(-1).astype(np.int32)

  def colours(self, tokens: np.ndarray) -> np.ndarray:
    """Colour index of each token, same shape."""
    return np.asarray(tokens) // NUM_EDGE_CODES


def png_bytes(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes."""
  buffer = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
  return buffer.getvalue()


def read_image(data: bytes) -> np.ndarray:
  """Encoded image bytes (PNG, JPEG, ...) -> uint8 [H, W, 3] RGB."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))
