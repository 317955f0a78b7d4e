"""The training batch contract shared by the input pipeline (producer) and the train step.

A batch is a dict of arrays with exactly `BATCH_KEYS` (shapes in `drivekd_jax.train.step`). This
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
