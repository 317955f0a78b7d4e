r"""InternVL3 generation on a rendered driving scene (task "drivekd.generate").

    python launch.py --config=configs/drivekd/generate.py --workdir=/tmp/drivekd_generate

Default: a tiny randomly initialised InternVL3 (preset "tiny") and an in-process BPE tokenizer,
about 30 s on 2 CPU cores. For a real model, point at a local checkpoint directory
(`OpenGVLab/InternVL3-*` or `-hf` layout, with its tokenizer files):

    python launch.py --config=configs/drivekd/generate.py --workdir=/tmp/g \
      --config.checkpoint=/path/to/InternVL3-1B --config.dtype=bfloat16

Writes `<workdir>/generation.json` (prompt, ids, answer, timings), `scene.png` and, without a
checkpoint, `tokenizer.json`.
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.task = "drivekd.generate"
  c.seed = 0
  c.checkpoint = ""  # local HF directory; empty: random tiny model
  c.preset = "tiny"  # used without a checkpoint
  c.vocab_size = 400  # demo BPE size (special + byte tokens + merges)
  c.dtype = "float32"
  c.render_size = 448  # rendered scene, resized to the model's image size by the processor
  c.question = "<image>\nWhat should the ego vehicle do next? Answer with a short sentence."
  c.system_message = ""  # empty: no system block (Drive-KD style)
  c.max_new_tokens = 24
  c.temperature = 0.0  # greedy
  c.top_p = 1.0
  return c
