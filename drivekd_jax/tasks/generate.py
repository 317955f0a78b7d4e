"""Task "drivekd.generate": one end-to-end InternVL3 generation on a rendered driving scene.

Steps (each one real, none skipped):
  1. Render a front-camera driving scene (`data.synthetic`) and save it as `scene.png`.
  2. Tokenizer: with `config.checkpoint` set, the checkpoint's own (`Tokenizer.from_path`);
     otherwise a small byte-level BPE trained in-process on driving text, saved as
     `tokenizer.json` (nothing is downloaded).
  3. Model: `from_pretrained(config.checkpoint)` for a local HF checkpoint, else a randomly
     initialised InternVL3 preset (`config.preset`, vocabulary sized to the tokenizer).
  4. Preprocess the image (bicubic resize, ImageNet normalisation), build the InternVL3 chat
     prompt with `<img><IMG_CONTEXT>*T</img>`, tokenise.
  5. Embed text + image once, prefill the jitted sampler from those embeddings, decode greedily
     (or with temperature / top-p) until `<|im_end|>` or `max_new_tokens`.
  6. Write `generation.json`: prompt, token ids, answer text, model summary and timings (the first
     call includes compilation; a second identical call measures the compiled program).

With random weights the answer is meaningless text; the run demonstrates the pipeline, not
driving knowledge. Point `config.checkpoint` at a local InternVL3 directory for a real answer.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
from absl import logging
from flax import nnx

from drivekd_jax.data import processor, synthetic
from drivekd_jax.data.tokenizer import Tokenizer, train_bpe_tokenizer
from drivekd_jax.models import presets
from drivekd_jax.models.hf_import import from_pretrained
from drivekd_jax.models.internvl import InternVL, generate
from drivekd_jax.models.sampling import SamplingMethod, completions


def driving_corpus(rng: np.random.Generator, num_scenes: int) -> list[str]:
  """Text to train the demo tokenizer on: scene descriptions, questions and answers."""
  texts = []
  for index in range(num_scenes):
    scene = synthetic.sample_scene(rng, f"scene{index}", f"frame{index}")
    for obj in scene.objects:
      where = "left" if obj.x < 0.5 else "right"
      texts.append(
        f"There is a {obj.description} on the {where} of the {obj.camera} view; "
        f"its status is {obj.status.lower()}."
      )
    texts.append("What should the ego vehicle do next? Answer with a short sentence.")
    texts.append("The ego vehicle should keep its lane, slow down and yield if needed.")
  return texts


def run(config, workdir: str) -> dict:
  """Runs the generation; returns (and writes to `<workdir>/generation.json`) what it did."""
  os.makedirs(workdir, exist_ok=True)
  timings = {}
  rng = np.random.default_rng(config.seed)

  # 1. A rendered driving scene.
  scene = synthetic.sample_scene(rng, "demo_scene", "demo_frame")
  pixels_uint8 = synthetic.render_view(scene, "CAM_FRONT", config.render_size)
  image_path = os.path.join(workdir, "scene.png")
  PIL.Image.fromarray(pixels_uint8).save(image_path)

  # 2-3. Tokenizer and model.
  start = time.perf_counter()
  if config.checkpoint:
    tokenizer = Tokenizer.from_path(config.checkpoint)
    model = from_pretrained(config.checkpoint, dtype=config.dtype)
    if not isinstance(model, InternVL):
      raise ValueError(f"{config.checkpoint}: the demo needs an InternVL checkpoint")
    source = f"checkpoint {config.checkpoint}"
  else:
    tokenizer = train_bpe_tokenizer(
      driving_corpus(rng, 64), config.vocab_size, os.path.join(workdir, "tokenizer.json")
    )
    model_config = presets.internvl3(
      config.preset,
      dtype=config.dtype,
      vocab_size=tokenizer.vocab_size,
      image_token_id=tokenizer.img_context_id,
    )
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: InternVL(model_config, rngs=nnx.Rngs(0))))
    seed = int(config.seed)
    init = jax.jit(lambda: nnx.state(InternVL(model_config, rngs=nnx.Rngs(seed))))
    model = nnx.merge(graphdef, init())
    source = f"random init of preset {config.preset!r} (seed {seed})"
  if tokenizer.img_context_id != model.config.image_token_id:
    raise ValueError(
      f"tokenizer <IMG_CONTEXT> id {tokenizer.img_context_id} != model image_token_id "
      f"{model.config.image_token_id}"
    )
  timings["tokenizer_and_model_s"] = time.perf_counter() - start

  # 4. Inputs.
  image_size = model.config.vision.image_size
  pixel_values = processor.preprocess_image(pixels_uint8, image_size=image_size, max_tiles=1)
  prompt = processor.internvl_chat_prompt(
    config.question,
    tiles_per_image=(1,),
    tokens_per_image=model.config.tokens_per_image,
    system_message=config.system_message or None,
  )
  input_ids = tokenizer.encode(prompt)[None]

  # 5. Generation: first call compiles, the second reuses the compiled programs.
  method = SamplingMethod(temperature=config.temperature, top_p=config.top_p)
  kwargs = dict(
    max_new_tokens=config.max_new_tokens,
    stop_token_ids=tokenizer.stop_ids,
    pad_token_id=tokenizer.pad_id,
    method=method,
    rng=jax.random.key(config.seed),
  )
  pixels = jnp.asarray(pixel_values)
  start = time.perf_counter()
  state = generate(model, jnp.asarray(input_ids), pixels, **kwargs)
  answer_ids = completions(state)[0]
  timings["first_generate_s"] = time.perf_counter() - start
  start = time.perf_counter()
  again = completions(generate(model, jnp.asarray(input_ids), pixels, **kwargs))[0]
  timings["second_generate_s"] = time.perf_counter() - start
  if again != answer_ids:
    raise AssertionError("the same generation call gave different tokens")
  timings["decode_tokens_per_s"] = len(answer_ids) / timings["second_generate_s"]

  # 6. Report.
  stopped = bool(answer_ids) and answer_ids[-1] in tokenizer.stop_ids
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  result = {
    "model": source,
    "num_parameters": num_params,
    "image": image_path,
    "image_objects": [f"{o.description} ({o.camera}, {o.status})" for o in scene.objects],
    "question": config.question,
    "prompt": prompt,
    "input_ids": input_ids[0].tolist(),
    "num_image_tokens": int(np.sum(input_ids == model.config.image_token_id)),
    "answer_ids": answer_ids,
    "answer": tokenizer.decode(answer_ids, skip_special_tokens=True),
    "stopped_at_im_end": stopped,
    "sampling": {"temperature": config.temperature, "top_p": config.top_p},
    "timings": timings,
    "device": str(jax.devices()[0]),
  }
  path = os.path.join(workdir, "generation.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=2, ensure_ascii=False)
  logging.info("Q: %s\nA: %s", config.question, result["answer"])
  logging.info("wrote %s (%.1f s to first answer)", path, timings["first_generate_s"])
  return result
