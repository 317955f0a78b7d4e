"""The training batch contract shared by the input pipeline (producer) and the train step.

A batch is a dict of arrays with exactly `BATCH_KEYS` (shapes in `drivekd_jax.train.step`).
`positions` is int32 `[B, L]` for InternVL and the M-RoPE positions `[B, 3, L]` (batch first, so
slicing micro-batches along the first axis keeps them aligned) for Qwen2.5-VL; the pipeline
computes them (`Processor.batch_positions`), the step passes them to the model as they are. This
module imports nothing heavy, so the train step does not pull in the pipeline's dependencies.
"""

BATCH_KEYS = (
  "input_ids",
  "labels",
  "attention_mask",
  "image_mask",
  "positions",
  "pixel_values",
  "capability",
  "example_mask",
)
