"""The multi-turn rollout: each sample's turns in order against a `UnifiedModel`.

For every turn (official `run_evaluation.py`, `docs/imug_protocol.md` §2.1): append the user
turn (text items, images as base64), force the turn's output mode, call the model, append the
assistant turn given by the history source (officially the model's own output), and record
`model_response`: the text, or `turn_<t>_output.png` saved beside result.json. A failed call
records `ERROR: <message>` and the assistant turn becomes the text "Error".

Output layout (read by the official scorers and `imug_jax.scoring`):

  <out_dir>/<model>/<domain>/<subdomain>/question_<id>/result.json   (+ turn_<t>_output.png)

result.json is the benchmark record with `model_response` on every task. It is written last and
atomically (temp file + rename), after the images, so a killed run leaves either a complete
sample or none; a restart skips complete samples (`force=True` redoes them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import logging
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from PIL import Image
from tqdm import tqdm

from drivekd_jax.paths import check_path_component, inside, write_bytes_atomic
from imug_jax.data.schema import BenchmarkFormatError, Sample, parse_sample
from imug_jax.models import protocol
from imug_jax.models.protocol import Response, UnifiedModel
from imug_jax.rollout.history import HistorySource, OwnHistory
from imug_jax.scoring.layout import question_dir, write_record

RESULT = "result.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def output_image_name(turn: int) -> str:
  return f"turn_{turn}_output.png"


@dataclasses.dataclass
class RolloutSummary:
  """Counts of one `run_rollout` call."""

  done: int = 0  # Samples rolled out now.
  skipped: int = 0  # Samples already complete.
  failed: int = 0  # Samples that could not be rolled out at all (see `failures`).
  turns: int = 0
  error_turns: int = 0  # Turns recorded as "ERROR: ...".
  failures: list[str] = dataclasses.field(default_factory=list)


def as_png(data: bytes) -> bytes:
  """Encoded image bytes -> PNG bytes (re-encoded only when not PNG already)."""
  if data.startswith(PNG_MAGIC):
    return data
  with Image.open(io.BytesIO(data)) as image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def is_complete(model_dir: str | Path, sample: Sample) -> bool:
  """True when result.json exists, parses, is this sample and has every model_response."""
  path = question_dir(model_dir, sample.key) / RESULT
  if not path.is_file():
    return False
  try:
    done = parse_sample(json.loads(path.read_text(encoding="utf-8")), path=path)
  except (json.JSONDecodeError, BenchmarkFormatError, UnicodeDecodeError):
    return False
  return (
    done.key == sample.key
    and [t.turn for t in done.tasks] == [t.turn for t in sample.tasks]
    and all(t.model_response is not None for t in done.tasks)
  )


def sample_rng(seed: int, sample: Sample) -> jax.Array:
  """A key per sample that does not depend on order or concurrency."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(str(sample.key).encode()))


def user_message(task, images_dir: Path) -> protocol.Message:
  content = []
  for item in task.inputs:
    if item.text is not None:
      content.append(protocol.text_item(item.text))
    else:
      content.append(protocol.image_item(inside(images_dir, item.image).read_bytes()))
  return protocol.message("user", content)


def rollout_sample(
  model: UnifiedModel,
  sample: Sample,
  *,
  images_dir: str | Path,
  model_dir: str | Path,
  history_source: HistorySource | None = None,
  temperature: float = 0.7,
  rng: jax.Array | None = None,
) -> Sample:
  """Rolls out one sample, writes its folder, and returns the sample with `model_response`s."""
  history_source = history_source or OwnHistory()
  images_dir = Path(images_dir)
  folder = question_dir(model_dir, sample.key)
  for stale in folder.glob(".*.tmp"):  # Left by a run killed in the middle of a write.
    stale.unlink(missing_ok=True)
  rng = jax.random.key(0) if rng is None else rng
  history: list[protocol.Message] = []
  if sample.system_prompt:
    history.append(protocol.message("system", [protocol.text_item(sample.system_prompt)]))
  responses: dict[int, str] = {}
  for task in sample.tasks:
    history.append(user_message(task, images_dir))
    response: Response | None = None
    try:
      response = model.respond(
        history, task.output_mode, temperature, jax.random.fold_in(rng, task.turn)
      )
      if task.modality == "image" and response.image is None:
        raise protocol.ModelError("an image turn got a text answer")
      if task.modality == "text" and response.text is None:
        raise protocol.ModelError("a text turn got an image answer")
    except Exception as e:
      logging.warning("sample %s turn %d: %s", sample.key, task.turn, e)
      response = None
      responses[task.turn] = f"ERROR: {type(e).__name__}: {e}"
    else:
      if response.image is not None:
        name = output_image_name(task.turn)
        write_bytes_atomic(folder / name, as_png(response.image))
        responses[task.turn] = name
      else:
        responses[task.turn] = response.text
    history.append(history_source.assistant_message(sample.key, task, response))
  result = sample.with_responses(responses)
  write_record(folder / RESULT, result.to_json())
  return result


def run_rollout(
  model: UnifiedModel,
  samples: Sequence[Sample],
  *,
  images_dir: str | Path,
  out_dir: str | Path,
  model_name: str | None = None,
  history_source: HistorySource | None = None,
  temperature: float = 0.7,
  seed: int = 0,
  concurrency: int = 1,
  force: bool = False,
  progress: bool = True,
) -> RolloutSummary:
  """Rolls out every sample into `<out_dir>/<model_name>/...`, resumably.

  Args:
    model: any `UnifiedModel`.
    samples: the benchmark samples to run.
    images_dir: the release `images/` folder.
    out_dir: the outputs root (official: `outputs/model_outputs`).
    model_name: folder name; defaults to `model.name`.
    history_source: `OwnHistory()` (official, default) or a `ReferenceHistory`.
    temperature: sent with every turn (official client: 0.7).
    seed: base of the per-sample PRNG keys (in-process models).
    concurrency: samples in flight at once (threads; for remote models; in-process models that
      are not thread-safe serialise themselves).
    force: redo samples that are already complete.
    progress: show a tqdm bar.

  Returns:
    A `RolloutSummary`. Samples that raise outside a model call (e.g. a missing input image or
    reference) are counted in `failed` with their error and leave no result.json.
  """
  model_dir = Path(out_dir) / check_path_component(model_name or model.name, "model name")
  summary = RolloutSummary()
  todo = []
  for sample in samples:
    if not force and is_complete(model_dir, sample):
      summary.skipped += 1
    else:
      todo.append(sample)

  def one(sample: Sample) -> Sample:
    return rollout_sample(
      model,
      sample,
      images_dir=images_dir,
      model_dir=model_dir,
      history_source=history_source,
      temperature=temperature,
      rng=sample_rng(seed, sample),
    )

  bar = tqdm(total=len(todo), desc=f"rollout {model_dir.name}", disable=not progress, unit="sample")
  with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
    futures = {pool.submit(one, sample): sample for sample in todo}
    for future in concurrent.futures.as_completed(futures):
      sample = futures[future]
      try:
        result = future.result()
      except Exception as e:
        summary.failed += 1
        summary.failures.append(f"{sample.key}: {type(e).__name__}: {e}")
        logging.error("sample %s failed: %s", sample.key, e)
      else:
        summary.done += 1
        summary.turns += len(result.tasks)
        summary.error_turns += sum(
          1 for t in result.tasks if (t.model_response or "").startswith("ERROR:")
        )
      bar.update(1)
  bar.close()
  return summary


def load_results(model_dir: str | Path, samples: Sequence[Sample]) -> dict[Any, Sample]:
  """sample key -> rolled-out Sample, for the samples whose result.json exists."""
  found = {}
  for sample in samples:
    path = question_dir(model_dir, sample.key) / RESULT
    if path.is_file():
      found[sample.key] = parse_sample(json.loads(path.read_text(encoding="utf-8")), path=path)
  return found
