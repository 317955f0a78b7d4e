"""Answers to DriveBench questions from an in-process InternVL, written as the toolkit reads them.

`answer_setting(...)` answers one setting (clean, no_image or a corruption) of a DriveBench
folder: the questions come from the DriveBench TFDS builder (camera filtering and image order as
the toolkit's preprocessing), each prompt is the question behind a system prompt that names the
views given (our wording of the toolkit's, rewritten for the number of views as the toolkit
does), batches of prompts are answered by the jitted sampler, and every answer is appended to
`<workdir>/drivebench/<setting>/answers.jsonl` as the release record plus `pred` as soon as its
batch is done. A killed run resumes where it stopped: answered ids are skipped, nothing is
written twice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from drivekd_jax.data import drivebench as drivebench_data
from drivekd_jax.data.processor import Processor, record_text, record_where
from drivekd_jax.data.tokenizer import Tokenizer
from drivekd_jax.eval import answers as answers_lib
from drivekd_jax.eval.heldout import answer_batch
from drivekd_jax.models import sampling

# The toolkit's decoding (vLLM): temperature 0.2, top-p 0.2, up to 512 tokens.
OFFICIAL_SAMPLING = sampling.SamplingMethod(temperature=0.2, top_p=0.2)
OFFICIAL_MAX_NEW_TOKENS = 512

_ROLE = (
  "You are an autonomous-driving assistant that answers questions about the scene around the "
  "ego vehicle."
)
_COORDINATES = (
  "Coordinates in the question are normalised to [0, 1], with (0, 0) the top-left and (1, 1) "
  "the bottom-right corner of an image."
)
_ANSWERING = (
  "For a multiple-choice question, give the letter of the correct option, then explain. For a "
  "yes/no question, answer Yes or No, then explain. Pay attention to what the objects are, where "
  "they are and how they move."
)


def system_prompt(cameras: Sequence[str]) -> str:
  """The system prompt for a question shown with `cameras` (in the order given)."""
  cameras = list(cameras)
  if not cameras:
    views = "You are given no camera image."
  elif len(cameras) == 1:
    views = f"You are given a single camera image: [{cameras[0]}]."
  else:
    views = f"You are given {len(cameras)} camera images in the order [{', '.join(cameras)}]."
  return " ".join((_ROLE, views, _COORDINATES, _ANSWERING))


def prompt_example(processor: Processor, record: Mapping[str, Any], where: str) -> dict:
  """The processed prompt of one DriveBench record: system prompt, images, question."""
  cameras = [record_text(c) for c in record.get("cameras", ())]
  messages = [
    {"role": "system", "content": system_prompt(cameras)},
    {"role": "user", "content": record_text(record["question"])},
  ]
  return processor.build(
    messages,
    list(record.get("images", ())),
    capability=record.get("capability", "other"),
    cameras=cameras or None,
    add_generation_prompt=True,
    where=where,
  )


def release_json(drivebench_dir: str | os.PathLike, setting: str) -> Path:
  """The release JSON of a setting, found as the DriveBench builder finds it."""
  root = Path(drivebench_dir)
  names = drivebench_data.TEST_JSON_NAMES
  if setting in drivebench_data.CORRUPTIONS:
    names = (f"{setting}.json", *names)
  for name in names:
    if (root / name).is_file():
      return root / name
  raise FileNotFoundError(f"{root}: none of {', '.join(names)} (DriveBench setting {setting!r})")


def answer_setting(
  model,
  processor: Processor,
  tokenizer: Tokenizer,
  records: Sequence[Mapping[str, Any]],
  json_path: str | os.PathLike,
  out_path: str | os.PathLike,
  *,
  batch_size: int,
  buckets: Sequence[int],
  max_images: int,
  max_new_tokens: int,
  method: sampling.SamplingMethod = sampling.GREEDY,
  seed: int = 0,
  max_items: int = 0,
) -> int:
  """Answers the items of `json_path` not yet in `out_path`; returns how many it wrote.

  Args:
    records: the setting's TFDS records (`DriveBench` builder, split "test"), matched to the
      release items by `record_id`.
    json_path: the setting's release JSON (`release_json`).
    out_path: the answers file (`answers.answers_path(workdir, setting)`).
    max_items: answer only the first `max_items` items of the release (0: all).
    method, seed: decoding (greedy, or `OFFICIAL_SAMPLING` with a key from `seed` and the
      batch's first item index, so a resumed run samples as an uninterrupted one would).
  """
  items = answers_lib.release_items(json_path)
  if max_items:
    items = items[:max_items]
  by_id = {record_text(r["record_id"]): i for i, r in enumerate(records)}
  missing = [rid for rid, _ in items if rid not in by_id]
  if missing:
    raise ValueError(
      f"{json_path}: {len(missing)} items have no record in the built dataset (first: "
      f"{missing[0]}); rebuild it from the same folder"
    )
  position = {rid: i for i, (rid, _) in enumerate(items)}
  written = 0
  with answers_lib.JsonlRecords(out_path) as out:
    todo = answers_lib.pending(items, out)
    for start in range(0, len(todo), batch_size):
      chunk = todo[start : start + batch_size]
      examples = []
      for rid, _ in chunk:
        record = records[by_id[rid]]
        examples.append(prompt_example(processor, record, f"{json_path}: {record_where(record)}"))
      rng = jax.random.fold_in(jax.random.key(seed), position[chunk[0][0]])
      preds = answer_batch(
        model,
        examples,
        tokenizer,
        image_size=processor.config.image_size,
        batch_size=batch_size,
        buckets=buckets,
        max_images=max_images,
        max_new_tokens=max_new_tokens,
        method=method,
        rng=rng,
      )
      for (rid, item), pred in zip(chunk, preds):
        out.append(answers_lib.answer_record(rid, item, pred))
      written += len(chunk)
      logging.info("%s: %d/%d answered", out_path, len(items) - len(todo) + written, len(items))
  return written


def first_prompt(
  processor: Processor, records: Sequence[Mapping[str, Any]]
) -> dict[str, np.ndarray]:
  """The processed prompt of the first record (the efficiency measurement's input)."""
  return prompt_example(processor, records[0], record_where(records[0]))
