"""The import graph of the two packages: no circles, and each layer imports only those below it.

Layers, bottom up: `models` (networks) and `paths`; `data` and `distill`; `eval`; `train`;
`tasks` and `bench`; then `imug_jax`, which may import `drivekd_jax` but never the reverse.
Imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("drivekd_jax", "imug_jax")

# What each part of drivekd_jax may import (besides itself).
ALLOWED = {
  "paths": set(),
  "models": {"paths"},
  "data": {"models", "paths"},
  "distill": {"models"},
  "eval": {"models", "data", "paths"},
  "train": {"models", "data", "distill", "eval", "paths"},
  "tasks": {"models", "data", "distill", "eval", "train", "paths"},
  "bench": {"models", "data", "distill", "eval", "train", "paths"},
}


def module_files() -> dict[str, Path]:
  out = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py"):
      parts = path.relative_to(REPO).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports (the most specific module named)."""
  modules = module_files()
  graph = {name: set() for name in modules}
  for name, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        subs = [f"{node.module}.{alias.name}" for alias in node.names]
        known = [s for s in subs if s in modules]
        targets = known if len(known) == len(subs) else [node.module, *known]
      else:
        continue
      graph[name].update(t for t in targets if t in modules and t != name)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def part(module: str) -> str:
  pieces = module.split(".")
  return pieces[1] if pieces[0] == "drivekd_jax" and len(pieces) > 1 else pieces[0]


def test_cycle_finder_sees_a_planted_circle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_circles():
  assert cycles(import_graph()) == []


def test_layers_import_downwards_only():
  wrong = []
  for module, targets in import_graph().items():
    for target in targets:
      if module.startswith("drivekd_jax") and target.startswith("imug_jax"):
        wrong.append((module, target))
      elif module.startswith("drivekd_jax.") and target.startswith("drivekd_jax."):
        source, dest = part(module), part(target)
        if source != dest and dest not in ALLOWED.get(source, set()):
          wrong.append((module, target))
  assert wrong == []
