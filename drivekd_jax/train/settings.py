"""Typed settings of a Drive-KD run, and the config every config file starts from.

Each section of the config is a frozen dataclass here; its field defaults are the only place a
default is written. `default_config()` turns them into the `ml_collections.ConfigDict` that
config files edit (so every key can be set with `--config.key=value`), and
`RunSettings.from_config(config)` reads a config back into typed settings, with one clear error
for a key that does not exist or a value of the wrong kind:

    settings = RunSettings.from_config(config)
    settings.data.batch_size, settings.teachers["shared"].preset, settings.distill.agp_mode

The data section is `drivekd_jax.data.sources.DataSettings` and the distillation section
`drivekd_jax.distill.signals.DistillConfig`, where those libraries define them.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections

from drivekd_jax.data.sources import DataSettings
from drivekd_jax.distill.signals import DistillConfig
from drivekd_jax.train.distributed import DistributedSettings
from drivekd_jax.train.optimizer import OptimizerSettings


@dataclasses.dataclass(frozen=True)
class ModelEntry:
  """A model: a preset (`drivekd_jax.models.presets`, random init) or a local HF checkpoint.

  Attributes:
    text_overrides: decoder fields replacing the preset's (`hidden_size`, `num_layers`, ...).
    tokenizer: a teacher's tokenizer, checked equal to the student's (the official code feeds
      every model one token sequence).
  """

  preset: str = "1B"
  checkpoint: str = ""
  dtype: str = "float32"
  param_dtype: str = ""
  tokenizer: str = ""
  text_overrides: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class CheckpointSettings:
  every_steps: int = 500
  keep: int = 3
  async_save: bool = True


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Held-out answers after training (task drivekd.train) or of a checkpoint (drivekd.heldout).

  Attributes:
    teachers: also score every teacher with the same evaluator.
    max_examples: 0: the whole test split.
    checkpoint_dir: "" : `<workdir>/checkpoints` (task drivekd.heldout).
  """

  after_training: bool = True
  batch_size: int = 8
  max_new_tokens: int = 64
  max_examples: int = 0
  teachers: bool = False
  checkpoint_dir: str = ""


@dataclasses.dataclass(frozen=True)
class WarmupSettings:
  """Plain-CE training of preset-built teachers before distillation (0 steps: none; teachers
  loaded from checkpoints are never warmed). batch_size 0: the data batch size."""

  steps: int = 0
  learning_rate: float = 3e-3
  warmup_steps: int = 10
  grad_clip_norm: float = 1.0
  batch_size: int = 0
  log_every: int = 50


@dataclasses.dataclass(frozen=True)
class RunSettings:
  """A whole run. Top-level fields:

  Attributes:
    num_steps: train steps (each consumes one global batch).
    peak_flops_per_device: for MFU; 0 detects from the device kind (none on CPU).
    jax_distributed ... initialization_timeout: multi-process start-up
      (`drivekd_jax.train.distributed`); empty / 0 / None leave JAX's own detection.
    mesh: sizes of the ("data", "fsdp", "tensor") axes; -1: the remaining devices.
    sharding_rules: (logical name, mesh axes) pairs over `sharding.DEFAULT_RULES`.
    teacher_names: comma-separated keys of `teachers`, in the order `distill.teacher_for`
      indexes them.
    export_dir: after training, the student in the HF layout (`models.save_pretrained`),
      loadable by `transformers`.
  """

  task: str = "drivekd.train"
  seed: int = 42
  num_steps: int = 1000
  log_every: int = 10
  progress_bar: bool = True
  max_consecutive_nonfinite: int = 10
  peak_flops_per_device: float = 0.0
  jax_distributed: bool = DistributedSettings.jax_distributed
  coordinator_address: str = DistributedSettings.coordinator_address
  num_processes: int | None = DistributedSettings.num_processes
  process_id: int | None = DistributedSettings.process_id
  local_device_ids: tuple = DistributedSettings.local_device_ids
  cluster_detection_method: str = DistributedSettings.cluster_detection_method
  initialization_timeout: int = DistributedSettings.initialization_timeout
  mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
  sharding_rules: tuple = ()
  data: DataSettings = DataSettings()
  student: ModelEntry = ModelEntry()
  teacher_names: str = "shared"
  teachers: dict[str, ModelEntry] = dataclasses.field(
    default_factory=lambda: {"shared": ModelEntry(preset="8B", dtype="bfloat16")}
  )
  distill: DistillConfig = DistillConfig()
  optimizer: OptimizerSettings = OptimizerSettings()
  checkpoint: CheckpointSettings = CheckpointSettings()
  eval: EvalSettings = EvalSettings()
  teacher_warmup: WarmupSettings = WarmupSettings()
  export_dir: str = ""  # write the trained student there in the HF layout ("": do not)

  @classmethod
  def from_config(cls, config: Any) -> RunSettings:
    """Reads a config (ConfigDict or mapping); missing keys take the defaults above."""
    return _read(cls, config, "config")

  @property
  def teacher_order(self) -> tuple[str, ...]:
    """The teacher names in `distill.teacher_for` order, each checked to have an entry."""
    names = tuple(n.strip() for n in self.teacher_names.split(",") if n.strip())
    for name in names:
      if name not in self.teachers:
        raise ValueError(
          f"config.teacher_names lists {name!r} but config.teachers has no entry for it "
          f"(entries: {sorted(self.teachers)})"
        )
    return names


def check_config(config: Any) -> None:
  """Reads a Drive-KD training or evaluation config once, so a wrong key or value fails at
  launch with its name (configs of other tasks are left to their task)."""
  if config.get("task", "") in ("drivekd.train", "drivekd.heldout"):
    RunSettings.from_config(config)


def teacher_config(
  preset: str = "tiny",
  *,
  checkpoint: str = "",
  dtype: str = "float32",
  param_dtype: str = "",
  tokenizer: str = "",
  **text_overrides,
) -> ml_collections.ConfigDict:
  """One entry of `config.teachers`: a preset (random init, optionally CE warm-up) or a local
  checkpoint, with decoder fields (`hidden_size=...`, `num_layers=...`) overriding the preset."""
  entry = ModelEntry(preset, checkpoint, dtype, param_dtype, tokenizer, dict(text_overrides))
  return _to_config(entry)


def default_config() -> ml_collections.ConfigDict:
  """Every key a Drive-KD run reads, with the official Drive-KD defaults where they exist.

  Config files start from this and change what their experiment needs.
  """
  return _to_config(RunSettings())


# ---------------------------------------------------------------------------------------------
# Dataclass <-> ConfigDict
# ---------------------------------------------------------------------------------------------


def _to_config(value: Any) -> Any:
  if isinstance(value, DistillConfig):
    fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    fields["signals"] = {}  # capability -> CapabilitySignal fields; empty: the official signals
    fields["mixing"] = tuple(tuple(row) for row in fields["mixing"])
    return ml_collections.ConfigDict(fields)
  if dataclasses.is_dataclass(value):
    out = ml_collections.ConfigDict()
    hints = typing.get_type_hints(type(value))
    for f in dataclasses.fields(value):
      item = getattr(value, f.name)
      if item is None:  # a typed placeholder, so `--config.key=3` still works
        out[f.name] = ml_collections.FieldReference(None, field_type=_optional_type(hints[f.name]))
      else:
        out[f.name] = _to_config(item)
    return out
  if isinstance(value, Mapping):
    return ml_collections.ConfigDict({k: _to_config(v) for k, v in value.items()})
  return value


def _optional_type(hint: Any) -> type:
  return next(a for a in typing.get_args(hint) if a is not type(None))


def _items(config: Any, path: str) -> dict:
  if hasattr(config, "items"):
    return dict(config.items())
  raise TypeError(f"{path}: expected a section (mapping), got {type(config).__name__}")


def _read(cls: type, config: Any, path: str) -> Any:
  """Builds dataclass `cls` from a mapping, naming the offending key on error."""
  if cls is DistillConfig:
    try:
      return DistillConfig.from_config(config)
    except (TypeError, ValueError) as error:
      raise ValueError(f"{path}: {error}") from error
  raw = _items(config, path)
  hints = typing.get_type_hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(raw) - set(names))
  if unknown:
    key = unknown[0]
    close = difflib.get_close_matches(key, names, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(names)}"
    raise ValueError(f"{path}.{key} is not a setting{hint}")
  kwargs = {}
  for name in names:
    if name in raw:
      kwargs[name] = _convert(hints[name], raw[name], f"{path}.{name}")
  try:
    return cls(**kwargs)
  except ValueError as error:
    raise ValueError(f"{path}: {error}") from error


def _convert(hint: Any, value: Any, path: str) -> Any:
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    return _read(hint, value, path)
  if origin is dict:
    args = typing.get_args(hint)
    items = _items(value, path)
    if args and dataclasses.is_dataclass(args[1]):
      return {k: _read(args[1], v, f"{path}.{k}") for k, v in items.items()}
    return {k: _plain(v) for k, v in items.items()}
  if hint is dict:
    return {k: _plain(v) for k, v in _items(value, path).items()}
  if value is None:
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
      return None
    raise ValueError(f"{path} must be set")
  if hint is tuple:
    if isinstance(value, str):
      raise ValueError(f"{path}: expected a sequence, got the string {value!r}")
    return tuple(_plain(v) for v in value)
  target = _optional_type(hint) if typing.get_args(hint) else hint
  if target is bool:
    if not isinstance(value, bool):
      raise ValueError(f"{path}: expected True or False, got {value!r}")
    return value
  if target in (int, float, str):
    try:
      if target is int and isinstance(value, float) and not value.is_integer():
        raise ValueError
      return target(value)
    except (TypeError, ValueError):
      raise ValueError(
        f"{path}: expected {target.__name__}, got {value!r} ({type(value).__name__})"
      ) from None
  return value


def _plain(value: Any) -> Any:
  """ConfigDicts and lists inside free-form values become dicts and tuples."""
  if hasattr(value, "items"):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return tuple(_plain(v) for v in value)
  return value
