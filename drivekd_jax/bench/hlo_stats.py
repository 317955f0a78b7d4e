"""FLOPs, memory traffic and collective bytes of a compiled XLA program, read from its HLO text.

`compiled.cost_analysis()` visits a `while` body once, but a train step is a `lax.scan` over
micro-batches: its body runs once per micro-batch. Here every computation gets the number of
times it runs (the product of the trip counts of the loops around it: `known_trip_count`, or
on TPU, where XLA leaves it out, the bound of a `counter < constant` condition), and:

  flops: 2 * output elements * contracted size of every `dot`, and of every `convolution`
    (output elements * kernel elements per output feature); elementwise work is not counted;
  traffic: bytes of the operands and outputs of every top-level instruction (fusions, dots,
    copies, collectives; not parameters, tuples, bitcasts, loops), a stand-in for HBM traffic;
    a slice counts what it takes and an in-place dynamic-update-slice its update, also inside a
    fusion (`_moved_bytes`);
  collective bytes: the output bytes of all-reduce, all-gather, reduce-scatter, all-to-all and
    collective-permute (the `-start` of an async pair);
  roofline_seconds(peak, bandwidth): each top-level instruction takes
    max(its flops / peak, its traffic / bandwidth), summed over executions.

All figures are per device: an SPMD-partitioned module is the program of one device.
"""

from __future__ import annotations

import dataclasses
import math
import re

_BYTES = {
  "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
  "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn|fnuz|b11fnuz)?)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$")
_CALLEE = re.compile(
  r"\b(calls|body|condition|to_apply|true_computation|false_computation)=%([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_FREE = {
  "parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional",
  "call", "after-all", "partition-id", "replica-id", "opt-barrier", "iota",
}  # fmt: skip


def array_bytes(shape: str) -> float:
  """Bytes of every array in an HLO shape string (a tuple counts all its elements)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
    total += size * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _dims(shape: str) -> list[int]:
  found = _ARRAY.search(shape)
  if not found:
    return []
  return [int(d) for d in found.group(2).split(",") if d]


def _split_shape(rest: str) -> tuple[str, str]:
  """(shape, the text after it) of an instruction's right-hand side."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        return rest[: i + 1], rest[i + 1 :].lstrip()
  shape, _, tail = rest.partition(" ")
  return shape, tail


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]
  attrs: str
  arguments: str = ""  # the text between the opcode's parentheses (a constant's value)


@dataclasses.dataclass
class HloStats:
  """Per-device totals of one execution of the program (see the module docstring)."""

  flops: float
  traffic_bytes: float
  collective_bytes: float
  collective_bytes_by_kind: dict[str, float]
  unknown_trip_counts: int
  # (flops, traffic bytes, executions) of every top-level instruction, for the roofline.
  ops: list[tuple[float, float, float]]

  def roofline_seconds(self, peak_flops: float, bandwidth: float) -> float:
    return sum(n * max(f / peak_flops, b / bandwidth) for f, b, n in self.ops)


def _parse(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  computations: dict[str, list[_Instruction]] = {}
  entry, current = "", None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
      continue
    if current is None:
      continue
    if line.startswith("}"):
      current = None
      continue
    found = _INSTRUCTION.match(line)
    if not found:
      continue
    shape, tail = _split_shape(found.group(2))
    opcode, _, rest = tail.partition("(")
    depth, end = 1, len(rest)
    for i, ch in enumerate(rest):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        end = i
        break
    operands = re.findall(r"%([\w.\-]+)", rest[:end])
    computations[current].append(
      _Instruction(found.group(1), shape, opcode.strip(), operands, rest[end + 1 :], rest[:end])
    )
  if not entry:
    raise ValueError("HLO text has no ENTRY computation")
  return computations, entry


def _callees(instruction: _Instruction) -> list[tuple[str, str]]:
  """(role, computation) pairs an instruction calls."""
  called = _CALLEE.findall(instruction.attrs)
  for group in _BRANCHES.findall(instruction.attrs):
    called += [("branch", name) for name in re.findall(r"%([\w.\-]+)", group)]
  return called


def _dot_flops(instruction: _Instruction, shapes: dict[str, str]) -> float:
  out = math.prod(_dims(instruction.shape))
  if instruction.opcode == "dot":
    found = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instruction.attrs)
    lhs = _dims(shapes.get(instruction.operands[0], ""))
    contracted = [int(d) for d in found.group(1).split(",") if d] if found else []
    return 2.0 * out * math.prod(lhs[d] for d in contracted if d < len(lhs))
  # convolution: each output element takes (kernel input features x the window taps that land
  # on real input) products.
  kernel = _dims(shapes.get(instruction.operands[1], "")) if len(instruction.operands) > 1 else []
  labels = re.search(r"dim_labels=([^_]*)_([^-]*)->", instruction.attrs)
  if not kernel or not labels or "i" not in labels.group(2):
    return 0.0
  lhs = _dims(shapes.get(instruction.operands[0], ""))
  lhs_labels, kernel_labels = labels.groups()
  spatial = sorted(
    (int(c), lhs[k]) for k, c in enumerate(lhs_labels) if c.isdigit() and k < len(lhs)
  )
  window_sizes = [
    kernel[k]
    for c in sorted(c for c in kernel_labels if c.isdigit())
    for k in [kernel_labels.index(c)]
  ]
  # The kernel's input-feature dimension is already per group.
  in_features = kernel[kernel_labels.index("i")]
  taps = _window_taps(instruction.attrs, [n for _, n in spatial], window_sizes)
  return 2.0 * out * in_features * taps


def _window_field(window: str, name: str, count: int, default: int) -> list[int]:
  found = re.search(rf"\b{name}=([0-9x]+)", window)
  return [int(v) for v in found.group(1).split("x")] if found else [default] * count


def _window_taps(attrs: str, input_sizes: list[int], window_sizes: list[int]) -> float:
  """The mean number of window positions per output element that read real input (not padding,
  not the holes of `lhs_dilate`), multiplied over the spatial dimensions. XLA:TPU writes batched
  products as convolutions whose batch dimensions are windows over a dilated input (window size
  = dilation: one real tap per output); counting every tap would count those products many
  times over."""
  found = re.search(r"window=\{([^}]*)\}", attrs)
  count = len(window_sizes)
  if not found or count == 0 or len(input_sizes) != count:
    return float(math.prod(window_sizes))
  window = found.group(1)
  strides = _window_field(window, "stride", count, 1)
  lhs_dilation = _window_field(window, "lhs_dilate", count, 1)
  rhs_dilation = _window_field(window, "rhs_dilate", count, 1)
  pads = re.search(r"\bpad=([0-9_x-]+)", window)
  pads = (
    [tuple(int(v) for v in p.split("_")) for p in pads.group(1).split("x")]
    if pads
    else [(0, 0)] * count
  )
  taps = 1.0
  for n, w, st, d, rd, (lo, hi) in zip(
    input_sizes, window_sizes, strides, lhs_dilation, rhs_dilation, pads
  ):
    dilated = (n - 1) * d + 1
    outputs = (lo + dilated + hi - ((w - 1) * rd + 1)) // st + 1
    if outputs <= 0:
      return 0.0
    real = 0
    for j in range(outputs):
      for t in range(w):
        position = j * st + t * rd - lo
        real += 0 <= position < dilated and position % d == 0
    taps *= real / outputs
  return taps


def _trip_count(loop: _Instruction, computations: dict[str, list[_Instruction]]) -> float | None:
  """How many times a `while` runs: its `known_trip_count` (XLA:CPU/GPU), else read off its
  condition when that is `counter < constant` (XLA:TPU leaves the count out; JAX's loops
  count from 0), else None."""
  trip = _TRIP.search(loop.attrs)
  if trip:
    return float(trip.group(1))
  condition = re.search(r"\bcondition=%([\w.\-]+)", loop.attrs)
  body = computations.get(condition.group(1), []) if condition else []
  constants = {i.name: i.arguments for i in body if i.opcode == "constant"}
  compares = [i for i in body if i.opcode == "compare" and "direction=LT" in i.attrs]
  if len(compares) == 1 and len(compares[0].operands) == 2:
    bound = constants.get(compares[0].operands[1], "")
    if re.fullmatch(r"-?\d+", bound.strip()):
      return float(bound)
  return None


_SLICES = ("dynamic-slice", "slice")


def _moved_bytes(instruction, out_bytes, shapes, computations) -> tuple[float, float]:
  """(bytes read, bytes written) of a top-level instruction: its operands and output, except
  that a slice reads only what it takes and a dynamic-update-slice (in place) reads and writes
  only its update, also inside a fusion (a scan's body slices one layer out of the stacked
  parameters: the whole stack is not read every iteration)."""
  sizes = [array_bytes(shapes.get(o, "")) for o in instruction.operands]
  if instruction.opcode in _SLICES:
    return out_bytes, out_bytes
  if instruction.opcode == "dynamic-update-slice" and len(sizes) > 1:
    return sizes[1], sizes[1]
  fused = [c for role, c in _callees(instruction) if role == "calls" and c in computations]
  if instruction.opcode != "fusion" or not fused:
    return sum(sizes), out_bytes
  body = computations[fused[0]]
  users: dict[str, list] = {}
  for inner in body:
    for position, operand in enumerate(inner.operands):
      users.setdefault(operand, []).append((inner, position))
  for inner in body:
    if inner.opcode != "parameter" or not inner.arguments.strip().isdigit():
      continue
    index = int(inner.arguments)
    uses = users.get(inner.name, [])
    if index >= len(sizes) or not uses:
      continue
    if all(user.opcode in _SLICES and position == 0 for user, position in uses):
      sizes[index] = sum(array_bytes(user.shape) for user, _ in uses)
    elif all(user.opcode == "dynamic-update-slice" and position == 0 for user, position in uses):
      update = sum(array_bytes(shapes.get(user.operands[1], "")) for user, _ in uses)
      sizes[index] = update
      out_bytes = min(out_bytes, update)
  return sum(sizes), out_bytes


def analyze(text: str) -> HloStats:
  """The per-device statistics of an optimized HLO module (`compiled.as_text()`)."""
  computations, entry = _parse(text)
  shapes = {i.name: i.shape for body in computations.values() for i in body}
  runs = dict.fromkeys(computations, 0.0)
  runs[entry] = 1.0
  fused: set[str] = set()
  unknown = 0
  # A computation is printed before every computation that calls it.
  for name in reversed(list(computations)):
    for instruction in computations[name]:
      trips = 1.0
      if instruction.opcode == "while":
        trip = _trip_count(instruction, computations)
        trips = 1.0 if trip is None else trip
        unknown += trip is None
      for role, callee in _callees(instruction):
        if callee not in runs:
          continue
        runs[callee] += runs[name] * (trips if role in ("body", "condition") else 1.0)
        if role in ("calls", "to_apply"):
          fused.add(callee)

  def inner_flops(name: str) -> float:
    total = 0.0
    for instruction in computations[name]:
      if instruction.opcode in ("dot", "convolution"):
        total += _dot_flops(instruction, shapes)
      for role, callee in _callees(instruction):
        if role == "calls" and callee in computations:
          total += inner_flops(callee)
    return total

  flops = traffic = collective = 0.0
  by_kind = dict.fromkeys(COLLECTIVES, 0.0)
  ops = []
  for name, body in computations.items():
    if name in fused or not runs[name]:
      continue
    n = runs[name]
    for instruction in body:
      op = instruction.opcode
      if op in _FREE or op.endswith("-done"):
        continue
      op_flops = _dot_flops(instruction, shapes) if op in ("dot", "convolution") else 0.0
      for role, callee in _callees(instruction):
        if role == "calls" and callee in computations:
          op_flops += inner_flops(callee)
      kind = op.removesuffix("-start")
      out_bytes = array_bytes(instruction.shape)
      if kind in COLLECTIVES:
        if op.endswith("-start") and instruction.shape.startswith("("):
          # async pairs carry (operands, results, ...): the largest array is the result
          out_bytes = max(array_bytes(f"{t}[{d}]") for t, d in _ARRAY.findall(instruction.shape))
        by_kind[kind] += n * out_bytes
        collective += n * out_bytes
      in_bytes, out_bytes = _moved_bytes(instruction, out_bytes, shapes, computations)
      flops += n * op_flops
      traffic += n * (in_bytes + out_bytes)
      ops.append((op_flops, in_bytes + out_bytes, n))
  return HloStats(flops, traffic, collective, by_kind, unknown, ops)
