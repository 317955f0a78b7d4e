"""Which signal each capability distils, and the `MapRequest` each model must materialise.

A `DistillConfig` holds everything the train step reads (defaults = the official code,
`docs/drivekd_method.md` §2–3). `map_requests` turns it into one `MapRequest` for the
student and one per teacher, so each model builds only the maps (or hidden states) its losses use.

Signals (one per capability, options cover the paper's ablations, Table 3):
  kind="attention": head-averaged attention maps, `map` "text_to_image" (A_tv block) or "full",
    on the layer range [start..end] (inclusive, negative = from the end) resolved on each model's
    own depth, grouped matching of student layer i to a window of teacher layers (a single layer
    is the range [l..l]); `metric` "mse" (official) or "cosine".
  kind="hidden": hidden-state MSE at layer `start` (student and teacher), with a learned
    `[D_s, D_t]` projection when the widths differ.
  kind="logit_kl": logit KD, T² · KL at temperature `temperature` on the supervised tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

from drivekd_jax.distill import losses
from drivekd_jax.models.config import MapRequest

CAPABILITIES = losses.CAPABILITIES


@dataclasses.dataclass(frozen=True)
class CapabilitySignal:
  """What one capability distils (see the module docstring)."""

  kind: Literal["attention", "hidden", "logit_kl"] = "attention"
  map: Literal["text_to_image", "full"] = "text_to_image"
  start: int = 0
  end: int = 0
  metric: Literal["mse", "cosine"] = "mse"
  temperature: float = 1.0

  def __post_init__(self):
    if self.kind not in ("attention", "hidden", "logit_kl"):
      raise ValueError(f"signal kind {self.kind!r}: expected attention, hidden or logit_kl")
    if self.map not in ("text_to_image", "full"):
      raise ValueError(f"signal map {self.map!r}: expected text_to_image or full")
    if self.metric not in ("mse", "cosine"):
      raise ValueError(f"signal metric {self.metric!r}: expected mse or cosine")

  def layers(self, num_layers: int) -> tuple[int, ...]:
    """The resolved layer range on a model with `num_layers` decoder layers."""
    return losses.resolve_layer_range(self.start, self.end, num_layers)


OFFICIAL_SIGNALS = {
  "perception": CapabilitySignal("attention", "text_to_image", 0, 0),
  "reasoning": CapabilitySignal("attention", "full", 0, -2),
  "planning": CapabilitySignal("attention", "text_to_image", -2, -2),
}


@dataclasses.dataclass(frozen=True)
class DistillConfig:
  """Everything the Drive-KD train step reads; defaults follow docs/drivekd_method.md §3.

  Attributes:
    capabilities: enabled capabilities, a subset of ("perception", "reasoning", "planning") in
      that order; the loss vector is [L_sup, L_k for k enabled].
    signals: capability -> `CapabilitySignal` (missing ones take the official signal).
    mixing: 3 rows (sample type perception / reasoning / planning) x 3 teacher columns; rows are
      normalised. `other_row` is used for capability id 3 ("other", absent from the official
      data); its default zero row trains such samples on CE only (the official trainer, given
      an all-zero row, would skip the sample entirely).
    weight_ce, weights: static loss weights (w_ce; w_p, w_r, w_pl). A zero weight disables the
      capability, as in the official code.
    teacher_for: index of the teacher model serving each capability ((0, 0, 0): one shared
      teacher, the official default; (0, 1, 2): one per capability).
    agp_mode, agp_seed: see `drivekd_jax.distill.agp` ("sum" = official `--no-agp`).
    microbatch_size: samples per AGP application (official 1); a batch of B runs B/microbatch
      micro-steps, each a mini-step of the optimizer (`train.optimizer.DistillOptimizer`).
    grad_accum_steps: micro-steps per optimizer update (the dynamic reweighting window).
    dynamic_weights: the official GradNorm-like reweighting (§3.3, default on in the code).
    reweight_*: its hyper-parameters (official defaults).
    trainable: "all" (official code: full fine-tuning) or "llm" (paper figure: language model
      only; vision tower and projector frozen).
  """

  capabilities: tuple[str, ...] = CAPABILITIES
  signals: tuple[tuple[str, CapabilitySignal], ...] = tuple(OFFICIAL_SIGNALS.items())
  mixing: tuple[tuple[float, ...], ...] = losses.OFFICIAL_MIXING
  other_row: tuple[float, ...] = (0.0, 0.0, 0.0)
  weight_ce: float = 1.0
  weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
  teacher_for: tuple[int, int, int] = (0, 0, 0)
  agp_mode: str = "agp"
  agp_seed: int = 42
  microbatch_size: int = 1
  grad_accum_steps: int = 4
  dynamic_weights: bool = True
  reweight_lr: float = 3e-4
  reweight_alpha: float = 0.0
  reweight_eps: float = 1e-8
  reweight_min: float = 1e-6
  reweight_max: float = 1e6
  reweight_min_ce: float = 0.6
  trainable: Literal["all", "llm"] = "all"

  def __post_init__(self):
    for cap in self.capabilities:
      if cap not in CAPABILITIES:
        raise ValueError(f"unknown capability {cap!r}; expected some of {CAPABILITIES}")
    if tuple(c for c in CAPABILITIES if c in self.capabilities) != tuple(self.capabilities):
      raise ValueError(f"capabilities must keep the order {CAPABILITIES}: {self.capabilities}")
    if self.trainable not in ("all", "llm"):
      raise ValueError(f"trainable={self.trainable!r}: expected 'all' or 'llm'")
    if self.microbatch_size < 1 or self.grad_accum_steps < 1:
      raise ValueError("microbatch_size and grad_accum_steps must be >= 1")

  @property
  def active(self) -> tuple[str, ...]:
    """Enabled capabilities with a non-zero static weight (the official `active_losses`)."""
    return tuple(c for c in self.capabilities if self.weights[CAPABILITIES.index(c)] != 0)

  def signal(self, capability: str) -> CapabilitySignal:
    return dict(self.signals).get(capability, OFFICIAL_SIGNALS[capability])

  def teacher_index(self, capability: str) -> int:
    return int(self.teacher_for[CAPABILITIES.index(capability)])

  @property
  def num_teachers(self) -> int:
    return 1 + max((self.teacher_index(c) for c in self.active), default=-1)

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any) -> DistillConfig:
    """From a dict / `ml_collections.ConfigDict` with the field names above.

    `signals` may be a mapping capability -> dict of `CapabilitySignal` fields.
    """
    raw = dict(config.items() if hasattr(config, "items") else vars(config))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
      raise ValueError(f"unknown distill config keys {unknown}; known: {sorted(known)}")
    if "signals" in raw:
      sig = {}
      for cap, spec in dict(raw["signals"]).items():
        if cap not in CAPABILITIES:
          raise ValueError(f"config.signals: unknown capability {cap!r}")
        sig[cap] = spec if isinstance(spec, CapabilitySignal) else CapabilitySignal(**dict(spec))
      raw["signals"] = tuple(sig.items())
    for key in ("capabilities", "weights", "teacher_for", "other_row"):
      if key in raw:
        raw[key] = tuple(raw[key])
    if "mixing" in raw:
      raw["mixing"] = tuple(tuple(float(x) for x in row) for row in raw["mixing"])
    return cls(**raw)


@dataclasses.dataclass(frozen=True)
class ResolvedSignal:
  """A capability's signal resolved on concrete depths: student/teacher layer windows."""

  capability: str
  signal: CapabilitySignal
  teacher: int
  windows: tuple[tuple[int, tuple[int, ...]], ...]


def resolve_signals(
  config: DistillConfig, student_layers: int, teacher_layers: tuple[int, ...]
) -> tuple[ResolvedSignal, ...]:
  """Layer windows of every active capability on the given depths (one per teacher)."""
  out = []
  for cap in config.active:
    sig = config.signal(cap)
    t = config.teacher_index(cap)
    if t >= len(teacher_layers):
      raise ValueError(f"capability {cap} uses teacher {t} but only {len(teacher_layers)} given")
    if sig.kind == "logit_kl":
      windows = ()
    elif sig.kind == "hidden":
      s_layer = losses.resolve_layer_range(sig.start, sig.start, student_layers)[0]
      t_layer = losses.resolve_layer_range(sig.start, sig.start, teacher_layers[t])[0]
      windows = ((s_layer, (t_layer,)),)
    else:
      windows = losses.grouped_layer_windows(
        sig.layers(student_layers), sig.layers(teacher_layers[t])
      )
    out.append(ResolvedSignal(cap, sig, t, windows))
  return tuple(out)


def _request(pairs) -> MapRequest:
  full, t2i, hidden = set(), set(), set()
  for kind, map_kind, layers in pairs:
    if kind == "hidden":
      hidden.update(layers)
    elif kind == "attention":
      (full if map_kind == "full" else t2i).update(layers)
  return MapRequest(tuple(sorted(full)), tuple(sorted(t2i)), tuple(sorted(hidden)))


def map_requests(
  config: DistillConfig, student_layers: int, teacher_layers: tuple[int, ...]
) -> tuple[MapRequest, tuple[MapRequest, ...]]:
  """(student request, one request per teacher): exactly the layers the active losses read.

  Teacher requests hold only the layers inside the grouped windows; layers are resolved
  (non-negative), so requests from different signals merge.
  """
  resolved = resolve_signals(config, student_layers, teacher_layers)
  student = _request((r.signal.kind, r.signal.map, [s for s, _ in r.windows]) for r in resolved)
  teachers = tuple(
    _request(
      (r.signal.kind, r.signal.map, [t for _, ts in r.windows for t in ts])
      for r in resolved
      if r.teacher == i
    )
    for i in range(len(teacher_layers))
  )
  return student, teachers


def needs_teacher_logits(config: DistillConfig) -> tuple[bool, ...]:
  """Per teacher: whether any capability it serves uses logit KD."""
  n = max(config.num_teachers, 1)
  return tuple(
    any(config.signal(c).kind == "logit_kl" and config.teacher_index(c) == i for c in config.active)
    for i in range(n)
  )
