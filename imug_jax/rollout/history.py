"""History sources: what the dialogue keeps of the model's own earlier answers.

* `OwnHistory` (the official protocol): every assistant turn is the model's own output.
* `ReferenceHistory` (our exposure-bias control, not in the official code): image turns are
  replaced by given images (the synthetic ground truth, or another run's outputs); text turns
  keep the model's own text. The model still answers every turn and is scored on its answers;
  only what later turns see changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Protocol

from imug_jax.data.schema import Sample, SampleKey, Turn
from imug_jax.models import protocol
from imug_jax.models.protocol import Message, Response
from imug_jax.scoring.layout import question_dir

OWN = "own"
REFERENCE = "reference"


class HistorySource(Protocol):
  name: str

  def assistant_message(self, key: SampleKey, task: Turn, response: Response | None) -> Message:
    """The assistant message appended after `task` (response None: the turn failed)."""
    ...


class OwnHistory:
  """The official rule: append the model's own output ("Error" after a failure)."""

  name = OWN

  def assistant_message(self, key: SampleKey, task: Turn, response: Response | None) -> Message:
    del key, task
    return protocol.assistant_message(response)


class ReferenceHistory:
  """Earlier image turns show a given reference image instead of the model's output.

  Args:
    images: (sample, image turn) -> image file. Every image turn of a rolled-out sample needs
      one; a missing reference is an error (the control would silently mix in own outputs).
  """

  name = REFERENCE

  def __init__(self, images: Mapping[tuple[SampleKey, int], str | Path]):
    self.images = {k: Path(v) for k, v in images.items()}

  def assistant_message(self, key: SampleKey, task: Turn, response: Response | None) -> Message:
    if task.modality != "image":
      return protocol.assistant_message(response)
    path = self.images.get((key, task.turn))
    if path is None:
      raise KeyError(f"reference history: no image for sample {key} turn {task.turn}")
    return protocol.message("assistant", [protocol.image_item(path.read_bytes())])

  def missing(self, samples: Iterable[Sample]) -> list[tuple[SampleKey, int]]:
    """Image turns of `samples` without a reference image."""
    return [
      (s.key, t.turn)
      for s in samples
      for t in s.tasks
      if t.modality == "image" and (s.key, t.turn) not in self.images
    ]


def outputs_of_run(
  model_dir: str | Path, samples: Iterable[Sample]
) -> dict[tuple[SampleKey, int], Path]:
  """(sample, image turn) -> `turn_<t>_output.png` of an earlier run, where it exists."""
  found = {}
  for sample in samples:
    for task in sample.tasks:
      path = question_dir(model_dir, sample.key) / f"turn_{task.turn}_output.png"
      if task.modality == "image" and path.is_file():
        found[(sample.key, task.turn)] = path
  return found
