"""Where the tests find the real release files they check: `tests/data/` (see its README)."""

from pathlib import Path

TEST_DATA = Path(__file__).resolve().parent / "data"


def data_file(*parts: str) -> Path:
  """The path of `tests/data/<parts...>`; a clear error when the file is not in the checkout."""
  path = TEST_DATA.joinpath(*parts)
  if not path.exists():
    raise FileNotFoundError(f"test data file missing from the repository: {path}")
  return path
