"""The repository stands alone: no file of the project names a path outside it.

A user clones the repository by itself, so code, tests, configs and docs may read only what the
checkout holds (release files for the tests are in `tests/data/`, method notes in `docs/`). The
patterns below are written so that they do not match their own source text, so this file is
scanned too.
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# What the project is made of. Under tests/data only code and notes count: the release files
# there are data as published (DriveLM paths start with "../", for one).
SCANNED = (
  "drivekd_jax/",
  "imug_jax/",
  "configs/",
  "tests/",
  "docs/",
  ".ci/",
  "launch.py",
  "setup.py",
  "README.md",
  "pytest.ini",
  "ruff.toml",
)
DATA = "tests/data/"
DATA_TEXT = (".py", ".md")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", "build", ".pytest_cache", ".ruff_cache"}

# A path to a folder beside the repository, or an absolute path of one machine.
OUTSIDE = {
  "a sibling 'shared' folder": re.compile(r"\.\./share[d]\b|\bshare[d]/(reference|data)\b"),
  # The folder beside the clone (`parents[2]`, then its name, then "data"); a teacher that is
  # called like it (`teachers / <that name>`) is no such path.
  "a 'shared' path component": re.compile(
    r"[\"']share[d][\"']\s*/\s*[\"'](dat[a]|referenc[e])[\"']"
    r"|parents\[\d+\]\s*/\s*[\"']share[d][\"']|[\"']\.\.[\"']\s*,\s*[\"']share[d][\"']"
  ),
  "an absolute machine path": re.compile(r"(?<![\w.:/-])/(wor[k]|hom[e]|roo[t])/\w"),
  "a notes file that lives outside docs/": re.compile(
    r"(?<!docs/)\b(drivekd_metho[d]|imug_protoco[l]|driving_benchmark[s]|environment_note[s]"
    r"|jax_style_anchor[s]|DESIG[N])\.md\b"
  ),
}
# `Path(__file__)...parents[N]` or a chain of `.parent` on a line that starts from __file__.
PARENTS_INDEX = re.compile(r"__file_[_].*?\.parents\[(\d+)\]")
PARENT_CHAIN = re.compile(r"__file_[_]\)?(?:\.resolve\(\))?((?:\.parent\b)+)")
# `docs/<file>.md` pointers, with an optional section (`§3.4`, `§2–3`, `§3.2-3.4`).
DOCS_POINTER = re.compile(
  r"docs/([\w/-]+\.md)`?(?:\s*§\s*(\d+(?:\.\d+)*)(?:\s*[-–]\s*(\d+(?:\.\d+)*))?)?"
)
HEADING = re.compile(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", re.MULTILINE)


def project_files() -> list[str]:
  """Tracked files (all files under the scanned roots when the checkout has no git metadata)."""
  if (REPO / ".git").exists():
    out = subprocess.run(
      ["git", "ls-files", "-z"], cwd=REPO, check=True, capture_output=True, text=True
    ).stdout
    names = [n for n in out.split("\0") if n and (REPO / n).is_file()]
  else:
    names = [
      str(p.relative_to(REPO))
      for p in REPO.rglob("*")
      if p.is_file() and not SKIPPED_DIRS.intersection(p.relative_to(REPO).parts)
    ]
  return sorted(
    n for n in names if n.startswith(SCANNED) and (not n.startswith(DATA) or n.endswith(DATA_TEXT))
  )


def read_text(name: str) -> str | None:
  try:
    return (REPO / name).read_text(encoding="utf-8")
  except UnicodeDecodeError:
    return None  # Not a text file.


def escapes(name: str, text: str) -> list[str]:
  """Every reference to a path outside the repository in `text` (the file `name`), described."""
  found = []
  depth = len(Path(name).parts) - 1  # parents[depth] of the file is the repository root.
  for number, line in enumerate(text.splitlines(), 1):
    where = f"{name}:{number}: {line.strip()}"
    found += [f"{where}  ({what})" for what, rx in OUTSIDE.items() if rx.search(line)]
    for m in PARENTS_INDEX.finditer(line):
      if int(m.group(1)) > depth:
        found.append(f"{where}  (parents[{m.group(1)}] leaves the repository)")
    for m in PARENT_CHAIN.finditer(line):
      if m.group(1).count(".parent") > depth + 1:
        found.append(f"{where}  (the .parent chain leaves the repository)")
  return found


def headings(doc: Path) -> set[str]:
  return set(HEADING.findall(doc.read_text(encoding="utf-8")))


def broken_pointers(name: str, text: str) -> list[str]:
  """`docs/<file>.md §x` pointers whose file or section heading does not exist."""
  found = []
  for number, line in enumerate(text.splitlines(), 1):
    for m in DOCS_POINTER.finditer(line):
      doc = REPO / "docs" / m.group(1)
      if not doc.is_file():
        found.append(f"{name}:{number}: docs/{m.group(1)} does not exist")
        continue
      missing = [s for s in m.group(2, 3) if s and s not in headings(doc)]
      if missing:
        found.append(f"{name}:{number}: docs/{m.group(1)} has no section {', '.join(missing)}")
  return found


def test_the_scan_sees_the_project():
  files = project_files()
  for expected in ("setup.py", "README.md", ".ci/run", "tests/conftest.py"):
    assert expected in files
  assert any(f.startswith("drivekd_jax/") for f in files)
  assert any(f.startswith("docs/") for f in files)
  assert DATA + "README.md" in files
  assert not any(f.startswith(DATA) and not f.endswith(DATA_TEXT) for f in files)


@pytest.mark.parametrize(
  "line",
  [
    "ROOT = Path(__file_" + '_).resolve().parents[2] / "share' + 'd" / "data"',
    "see `share" + "d/reference/drivekd_metho" + "d.md` §3.4",
    "cd ../share" + "d && ls",
    'os.path.join(HERE, "..", "share' + 'd", "data")',
    "reads /wor" + "k/share" + "d/data/x.json",
    "the formulas in drivekd_metho" + "d.md §2.3",
    "HERE = Path(__file_" + "_).parent.parent.parent",
  ],
)
def test_escapes_are_found(line):
  assert escapes("tests/test_x.py", line)


@pytest.mark.parametrize(
  "line",
  [
    "REPO = Path(__file__).resolve().parents[1]",
    'c.teacher_names = "share' + 'd"',
    "--workdir=/tmp/drivekd_demo",
    "../nuscenes/samples/CAM_FRONT/x.jpg",
    "see `docs/drivekd_method.md` §3.4",
  ],
)
def test_paths_inside_are_allowed(line):
  assert not escapes("tests/test_x.py", line)


def test_no_file_refers_outside_the_repository():
  found = []
  for name in project_files():
    text = read_text(name)
    if text is not None:
      found += escapes(name, text)
  assert not found, "paths outside the repository:\n" + "\n".join(found)


def test_docs_pointers_resolve():
  found = []
  for name in project_files():
    text = read_text(name)
    if text is not None:
      found += broken_pointers(name, text)
  assert not found, "pointers into docs/ that lead nowhere:\n" + "\n".join(found)
