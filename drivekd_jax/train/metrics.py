"""Training metrics: TensorBoard event files, a console progress bar, throughput and MFU.

FLOPs are estimated from the model configs (PaLM appendix B style): a matmul over N weights costs
2N FLOPs per token forward and 4N backward; causal attention adds 2·2·layers·L·d_attn per token
forward (scores and values, counting the full L×L square the kernels compute). Teachers run
forward only. The step's VJP pulls back one cotangent per loss term (`num_cotangents`), and each
pulls a full backward pass through the student.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from drivekd_jax.models.config import DecoderConfig, InternVLConfig, VisionConfig
from drivekd_jax.models.qwen25_vl import Qwen25VLConfig

# Dense bf16 peak FLOP/s per device, by substring of `device.device_kind` (checked in order).
PEAK_FLOPS_BY_DEVICE_KIND: tuple[tuple[str, float], ...] = (
  ("v6 lite", 918e12),
  ("v6e", 918e12),
  ("v5p", 459e12),
  ("v5 lite", 197e12),
  ("v5e", 197e12),
  ("v4", 275e12),
  ("v3", 123e12),
  ("h200", 989e12),
  ("h100", 989e12),
  ("a100", 312e12),
  ("l40s", 362e12),
  ("a10g", 125e12),
)


def detect_peak_flops(device: jax.Device | None = None) -> float | None:
  """Peak FLOP/s of one device from its kind, or None when unknown (e.g. CPU)."""
  device = device or jax.devices()[0]
  kind = device.device_kind.lower()
  for key, flops in PEAK_FLOPS_BY_DEVICE_KIND:
    if key in kind:
      return flops
  return None


def decoder_matmul_params(config: DecoderConfig) -> int:
  """Weights that take part in a matmul per token (all blocks and the head, no embedding)."""
  d, hd = config.hidden_size, config.resolved_head_dim
  attention = d * hd * (config.num_heads + 2 * config.num_kv_heads) + config.num_heads * hd * d
  mlp = 3 * d * config.intermediate_size
  return config.num_layers * (attention + mlp) + d * config.vocab_size


def vision_matmul_params(config: VisionConfig) -> int:
  d = config.hidden_size
  return config.num_layers * (4 * d * d + 2 * d * config.intermediate_size)


def _decoder_forward_flops(config: DecoderConfig, seq_len: int) -> float:
  """Forward FLOPs per token of a decoder at sequence length `seq_len`."""
  attn_width = config.num_heads * config.resolved_head_dim
  return 2.0 * decoder_matmul_params(config) + 4.0 * config.num_layers * seq_len * attn_width


def _vision_forward_flops_per_image(config: InternVLConfig) -> float:
  patches = config.vision.grid_size**2 + 1
  vit = 2.0 * vision_matmul_params(config.vision) * patches
  vit += 4.0 * config.vision.num_layers * patches * patches * config.vision.hidden_size
  proj_in = config.vision.hidden_size * int(round(1 / config.downsample_ratio**2))
  d = config.text.hidden_size
  projector = 2.0 * (proj_in * d + d * d) * config.tokens_per_image
  return vit + projector


def _qwen25_vl_vision_forward_flops_per_image(config: Qwen25VLConfig, image_size: int) -> float:
  """The Qwen2.5-VL vision tower on one `image_size`^2 image: patch embedding, blocks (full
  attention in `fullatt_block_indexes`, window attention elsewhere), the 2x2 merger."""
  vision = config.vision
  if image_size <= 0:
    raise ValueError("Qwen2.5-VL vision FLOPs need the image side (image_size)")
  patches = (image_size // vision.patch_size) ** 2
  window = min(patches, (vision.window_size // vision.patch_size) ** 2)
  d = vision.hidden_size
  blocks = 2.0 * vision.depth * (4 * d * d + 3 * d * vision.intermediate_size) * patches
  full = len(vision.fullatt_block_indexes)
  attention = 4.0 * patches * d * (full * patches + (vision.depth - full) * window)
  merged = 4 * d
  merger = 2.0 * (merged * merged + merged * vision.out_hidden_size) * patches / 4
  return 2.0 * vision.patch_dim * d * patches + blocks + attention + merger


def _text_config(config: DecoderConfig | InternVLConfig | Qwen25VLConfig) -> DecoderConfig:
  return config.text if isinstance(config, InternVLConfig | Qwen25VLConfig) else config


def train_step_flops(
  student: DecoderConfig | InternVLConfig,
  teachers: Sequence[DecoderConfig | InternVLConfig],
  *,
  batch_size: int,
  seq_len: int,
  images_per_example: int = 0,
  num_cotangents: int = 1,
  image_size: int = 0,
) -> float:
  """FLOPs of one micro-step: teacher forwards, student forward, `num_cotangents` backwards.

  Args:
    student, teachers: model configs (InternVL, Qwen2.5-VL or decoder-only).
    batch_size: examples per micro-step; seq_len: padded length L.
    images_per_example: image slots M (vision tower cost; 0 for text-only).
    num_cotangents: loss terms pulled back separately (1 + K for AGP).
    image_size: the image side (needed for Qwen2.5-VL, whose cost follows its resolution).
  """

  def forward(config):
    per_example = seq_len * _decoder_forward_flops(_text_config(config), seq_len)
    if isinstance(config, InternVLConfig):
      per_example += images_per_example * _vision_forward_flops_per_image(config)
    elif isinstance(config, Qwen25VLConfig) and images_per_example:
      vision = _qwen25_vl_vision_forward_flops_per_image(config, image_size)
      per_example += images_per_example * vision
    return batch_size * per_example

  student_forward = forward(student)
  return sum(forward(t) for t in teachers) + student_forward * (1 + 2 * num_cotangents)


class MetricsWriter:
  """Writes scalars to TensorBoard (process 0 only) and drives a tqdm bar with ETA.

  Args:
    logdir: folder for event files (e.g. `<workdir>/tensorboard`).
    total_steps: the run's last step; start_step: where this launch began (resume).
    peak_flops_per_device: device peak for MFU; None disables MFU.
    show_progress: draw the console bar; description: its label.
  """

  def __init__(
    self,
    logdir: str,
    *,
    total_steps: int,
    start_step: int = 0,
    peak_flops_per_device: float | None = None,
    show_progress: bool = True,
    description: str = "train",
  ):
    self.is_writer = jax.process_index() == 0
    self._writer = None
    if self.is_writer:
      from tensorboardX import SummaryWriter

      self._writer = SummaryWriter(logdir=logdir, flush_secs=10)
    self._description = description
    self._peak = (peak_flops_per_device * jax.device_count()) if peak_flops_per_device else None
    self._last_time: float | None = None
    self._last_step = start_step
    self._bar = None
    if show_progress and self.is_writer:
      from tqdm.auto import tqdm

      self._bar = tqdm(
        total=total_steps, initial=start_step, desc=description, unit="step", dynamic_ncols=True
      )

  def start_timer(self, step: int) -> None:
    """Marks the beginning of a timed window (after compilation)."""
    self._last_time = time.perf_counter()
    self._last_step = step

  def timing(
    self,
    step: int,
    *,
    tokens: float | None = None,
    examples: float | None = None,
    flops: float | None = None,
  ) -> dict[str, float]:
    """Throughput and MFU over the steps since the last call.

    Args:
      step: the current step.
      tokens, examples, flops: per-step averages over the window (all processes together).
    """
    now = time.perf_counter()
    out: dict[str, float] = {}
    if self._last_time is not None and step > self._last_step:
      seconds = (now - self._last_time) / (step - self._last_step)
      out["perf/step_seconds"] = seconds
      if tokens is not None:
        out["perf/tokens_per_second"] = tokens / seconds
      if examples is not None:
        out["perf/examples_per_second"] = examples / seconds
      if flops:
        achieved = flops / seconds
        out["perf/tflops_per_second"] = achieved / 1e12
        if self._peak:
          out["perf/mfu"] = achieved / self._peak
    self._last_time = now
    self._last_step = step
    return out

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    if self._writer is None:
      return
    for name, value in scalars.items():
      value = float(np.asarray(value))
      self._writer.add_scalar(name, value, global_step=step)

  def write_text(self, step: int, name: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(name, text, global_step=step)

  def update_progress(self, step: int, summary: Mapping[str, float] | None = None) -> None:
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    if summary:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in summary.items()}, refresh=False)

  def log(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars to TensorBoard and a one-line console summary."""
    self.write_scalars(step, scalars)
    if self.is_writer:
      text = ", ".join(f"{k}={float(np.asarray(v)):.5g}" for k, v in sorted(scalars.items()))
      logging.info("%s step %d: %s", self._description, step, text)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads every scalar from the event files in `logdir`: tag -> [(step, value)] in file order.

  Event files are TFRecord streams (u64 length, u32 crc, payload, u32 crc) of `Event` protos.
  """
  import glob
  import struct

  from tensorboardX.proto import event_pb2

  out: dict[str, list[tuple[int, float]]] = {}
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    offset = 0
    while offset + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      start = offset + 12
      if start + length + 4 > len(data):
        break  # a record still being written
      event = event_pb2.Event.FromString(data[start : start + length])
      offset = start + length + 4
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out
