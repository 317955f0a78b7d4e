"""Held-out evaluation: generated answers to test questions and MCQ accuracy by capability.

`evaluate(model, processor, tokenizer, source, out_dir, ...)` is what the training task runs
after training (student and teachers) and what task "drivekd.heldout" runs on a checkpoint.

For every test record the prompt (question + images, ending with `<|im_start|>assistant\\n`) is
built by the same processor as training, batched to the training length buckets (padding rows
fill the last batch, so every batch of one bucket reuses one compiled sampler), and answered
greedily by the jitted sampler. Results go to the workdir:

  eval/answers.jsonl    one line per question: capability, question type, question, reference,
                        prediction, and for multiple-choice questions the two letters;
  eval_summary.json     counts and MCQ accuracy per capability (and overall), run facts.

MCQ scoring is an exact letter match. A question is multiple-choice when its reference answer
starts with an option letter followed by punctuation or nothing ("B", "B.", "(B)", "Final: B.
..." as in Drive-KD answers; "A car ..." is not a letter); the predicted letter is read the same
way from the start of the generated answer, so an answer that does not open with a letter is
wrong. The judge-based DriveBench scores are not computed here.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from drivekd_jax.data import pipeline as pipeline_lib
from drivekd_jax.data.processor import (
  CAPABILITIES,
  Processor,
  capability_id,
  record_text,
  record_where,
)
from drivekd_jax.data.tokenizer import Tokenizer
from drivekd_jax.models import internvl as internvl_lib
from drivekd_jax.models import qwen25_vl as qwen25_vl_lib
from drivekd_jax.models import sampling

_LETTER = re.compile(r"^\s*(?:final(?:\s+answer)?\s*:\s*)?\(?([A-D])\)?(?=$|[.,:;)])", re.I)


def mcq_letter(text: str) -> str | None:
  """The option letter an answer opens with ("C", "C.", "(C)", "Final: C. ..."), else None."""
  match = _LETTER.match(text)
  return match.group(1).upper() if match else None


def _capability_name(record: Mapping[str, Any]) -> str:
  return CAPABILITIES[capability_id(record.get("capability", "other"))]


def answer_batch(
  model,
  examples: Sequence[Mapping[str, np.ndarray]],
  tokenizer: Tokenizer,
  *,
  image_size: int,
  batch_size: int,
  buckets: Sequence[int],
  max_images: int,
  max_new_tokens: int,
  method: sampling.SamplingMethod = sampling.GREEDY,
  rng: jax.Array | None = None,
) -> list[str]:
  """Answers up to `batch_size` processed prompts in one generate call (padding rows fill the
  batch, so every batch of one bucket reuses one compiled sampler).

  Args:
    model: an `InternVL` or a `Qwen25VL`.
    examples: prompts from `Processor.prompt_example` / `record_example(prompt_only=True)`.
    image_size: the processor's image side; max_images: image slots per row.
    buckets: prompt length buckets; max_new_tokens: answer length limit.
    method, rng: greedy (default) or sampling settings and their key.

  Returns:
    One decoded answer per example (special tokens removed, stripped).
  """
  if not 0 < len(examples) <= batch_size:
    raise ValueError(f"answer_batch takes 1 to {batch_size} examples, got {len(examples)}")
  image_shape = (image_size, image_size, 3)
  examples = list(examples)
  real = len(examples)
  while len(examples) < batch_size:
    examples.append(pipeline_lib.padding_example(tokenizer.pad_id, image_shape))
  batch = pipeline_lib.collate(
    examples,
    buckets=buckets,
    max_images=max_images,
    pad_id=tokenizer.pad_id,
    image_shape=image_shape,
  )
  # Qwen2.5-VL's generate computes its M-RoPE positions from the ids and image slots.
  qwen = isinstance(model, qwen25_vl_lib.Qwen25VL)
  generate = qwen25_vl_lib.generate if qwen else internvl_lib.generate
  state = generate(
    model,
    batch["input_ids"],
    batch["pixel_values"],
    max_new_tokens=max_new_tokens,
    attention_mask=batch["attention_mask"],
    stop_token_ids=tokenizer.stop_ids,
    pad_token_id=tokenizer.pad_id,
    method=method,
    rng=rng,
  )
  return [
    tokenizer.decode(tokens, skip_special_tokens=True).strip()
    for tokens in sampling.completions(state)[:real]
  ]


def generate_answers(
  model,
  processor: Processor,
  tokenizer: Tokenizer,
  records: Sequence[Mapping[str, Any]],
  *,
  batch_size: int,
  buckets: Sequence[int],
  max_images: int,
  max_new_tokens: int,
  source_name: str = "test",
) -> list[str]:
  """Greedy answers to the records' questions, in order (`answer_batch` over batches).

  Args:
    model: an `InternVL`.
    processor, tokenizer: as in training.
    records: driving records (question, images, cameras, capability).
    batch_size: prompts per generate call (the last batch is padded).
    buckets: prompt length buckets; max_images: image slots per row.
    max_new_tokens: answer length limit.

  Returns:
    One decoded answer per record (special tokens removed, stripped).
  """
  answers: list[str] = []
  for start in range(0, len(records), batch_size):
    examples = [
      processor.record_example(
        record,
        where=f"{source_name} index {start + offset}, {record_where(record)}",
        prompt_only=True,
      )
      for offset, record in enumerate(records[start : start + batch_size])
    ]
    answers += answer_batch(
      model,
      examples,
      tokenizer,
      image_size=processor.config.image_size,
      batch_size=batch_size,
      buckets=buckets,
      max_images=max_images,
      max_new_tokens=max_new_tokens,
    )
  return answers


def score(records: Sequence[Mapping[str, Any]], answers: Sequence[str]) -> tuple[dict, list]:
  """MCQ accuracy by capability and per-question rows (see the module docstring)."""
  rows = []
  per_cap: dict[str, dict[str, int]] = {}
  for record, answer in zip(records, answers):
    capability = _capability_name(record)
    reference = record_text(record["answer"])
    row = {
      "capability": capability,
      "question_type": record_text(record.get("question_type", "")),
      "frame_token": record_text(record.get("frame_token", "")),
      "question": record_text(record["question"]),
      "reference": reference,
      "prediction": answer,
    }
    counts = per_cap.setdefault(capability, {"questions": 0, "mcq": 0, "mcq_correct": 0})
    counts["questions"] += 1
    gold = mcq_letter(reference)
    if gold is not None:
      predicted = mcq_letter(answer)
      row.update(reference_letter=gold, predicted_letter=predicted, correct=predicted == gold)
      counts["mcq"] += 1
      counts["mcq_correct"] += int(predicted == gold)
    rows.append(row)
  summary = {}
  for capability, counts in sorted(per_cap.items()):
    accuracy = counts["mcq_correct"] / counts["mcq"] if counts["mcq"] else None
    summary[capability] = {**counts, "mcq_accuracy": accuracy}
  total_mcq = sum(c["mcq"] for c in per_cap.values())
  total_correct = sum(c["mcq_correct"] for c in per_cap.values())
  summary["overall"] = {
    "questions": len(rows),
    "mcq": total_mcq,
    "mcq_correct": total_correct,
    "mcq_accuracy": total_correct / total_mcq if total_mcq else None,
  }
  return summary, rows


def evaluate(
  model,
  processor: Processor,
  tokenizer: Tokenizer,
  source: Sequence[Mapping[str, Any]],
  workdir: str,
  *,
  batch_size: int,
  buckets: Sequence[int],
  max_images: int,
  max_new_tokens: int,
  max_examples: int = 0,
  facts: Mapping[str, Any] | None = None,
  source_name: str = "test",
) -> dict:
  """Answers the first `max_examples` records (0: all), scores them, writes the summary files.

  Returns:
    The summary dict (also written to `<workdir>/eval_summary.json`).
  """
  count = len(source) if not max_examples else min(max_examples, len(source))
  records = [source[i] for i in range(count)]
  started = time.perf_counter()
  answers = generate_answers(
    model,
    processor,
    tokenizer,
    records,
    batch_size=batch_size,
    buckets=buckets,
    max_images=max_images,
    max_new_tokens=max_new_tokens,
    source_name=source_name,
  )
  seconds = time.perf_counter() - started
  by_capability, rows = score(records, answers)
  summary = {
    "source": source_name,
    "num_questions": len(rows),
    "generation_seconds": round(seconds, 3),
    "max_new_tokens": max_new_tokens,
    "mcq_scoring": "exact option-letter match at the start of the answer",
    "by_capability": by_capability,
    **dict(facts or {}),
  }
  if jax.process_index() == 0:
    os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
    with open(os.path.join(workdir, "eval", "answers.jsonl"), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
    path = os.path.join(workdir, "eval_summary.json")
    with open(path + ".tmp", "w") as f:
      json.dump(summary, f, indent=2)
    os.replace(path + ".tmp", path)
    overall = by_capability["overall"]
    logging.info(
      "evaluation: %d questions, MCQ accuracy %s (%d/%d); summary in %s",
      len(rows),
      overall["mcq_accuracy"],
      overall["mcq_correct"],
      overall["mcq"],
      path,
    )
  return summary
