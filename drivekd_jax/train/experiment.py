"""A Drive-KD experiment, built once from typed settings: data, models, optimizer, state, step.

    settings = RunSettings.from_config(config)
    exp = build_experiment(settings, workdir)   # data -> student, teachers (warmed) -> step
    exp.step_fn(exp.state, batch, rng, exp.distillation.teacher_states)

`assemble_distillation(distill, student, teachers, tx, rng)` is the step's assembly on its own
(split the models, initialise the train state, born sharded when a mesh is given, build the pure
step): the trainer, the evaluation, the benchmark and the tests all go through it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import optax
from absl import logging
from flax import nnx

from drivekd_jax.data import sources
from drivekd_jax.data.processor import (
  QWEN25_VL_IMAGE_SIZE,
  Processor,
  model_family,
  tokenizer_for,
)
from drivekd_jax.data.qwen25_vl_processor import smart_resize
from drivekd_jax.data.tokenizer import Tokenizer, check_same_tokenizer
from drivekd_jax.distill.signals import DistillConfig
from drivekd_jax.models import from_pretrained, presets
from drivekd_jax.models.config import EXECUTION_FIELDS, InternVLConfig
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.models.qwen25_vl import Qwen25VL, Qwen25VLConfig, check_same_image_tokens
from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train import state as state_lib
from drivekd_jax.train import step as step_lib
from drivekd_jax.train import warmup as warmup_lib
from drivekd_jax.train.optimizer import DistillOptimizer, build_distill_optimizer
from drivekd_jax.train.settings import ModelEntry, RunSettings


def shardings_of(tree: Any) -> Any:
  """The sharding of every array of a tree."""
  return jax.tree.map(lambda x: x.sharding, tree)


def family_of(entry: ModelEntry) -> str:
  """The model family of an entry's preset ("internvl" or "qwen2.5-vl")."""
  return model_family(presets.model_config(entry.preset))


def model_config(
  entry: ModelEntry, tokenizer: Tokenizer | None = None
) -> InternVLConfig | Qwen25VLConfig:
  """The config of a preset model entry (`presets.model_config`: InternVL3 or "qwen2.5-vl-*").

  With a tokenizer, the image token id is the tokenizer's (`<IMG_CONTEXT>` / `<|image_pad|>`,
  appended to the tokenizer when missing: `processor.tokenizer_for`) and the vocabulary covers
  every id.
  """
  overrides = dict(entry.text_overrides)
  image_token_id = None
  if tokenizer is not None:
    family = family_of(entry)
    tokenizer = tokenizer_for(tokenizer, family)
    image_token_id = tokenizer.image_token_ids(family)[1]
    overrides.setdefault(
      "vocab_size",
      max(tokenizer.vocab_size, presets.model_config(entry.preset).text.vocab_size),
    )
  return presets.model_config(
    entry.preset,
    dtype=entry.dtype,
    param_dtype=entry.param_dtype or None,
    image_token_id=image_token_id,
    **overrides,
  )


def processor_for(
  settings: RunSettings, tokenizer: Tokenizer, model_cfg: InternVLConfig | Qwen25VLConfig
):
  """The processor that feeds a model of `model_cfg` (image size, tokens per image, its
  family's image tokens and positions).

  Qwen2.5-VL images are squares of one side: on synthetic data `smart_resize` of the rendered
  views (what Qwen2.5-VL's own processor gives them), else 448 px (256 tokens, as InternVL3).
  """
  family = model_family(model_cfg)
  overrides = {}
  if family == "qwen2.5-vl":
    overrides["image_size"] = QWEN25_VL_IMAGE_SIZE
    if settings.data.source == "synthetic":
      side = settings.data.synthetic.image_size
      factor = model_cfg.vision.patch_size * model_cfg.vision.spatial_merge_size
      overrides["image_size"] = smart_resize(side, side, factor)[0]
  return Processor.for_model(
    tokenizer_for(tokenizer, family),
    model_cfg,
    max_tiles=settings.data.max_tiles,
    system_message=settings.data.system_message or None,
    **overrides,
  )


def build_model(entry: ModelEntry, tokenizer: Tokenizer, mesh, rules, seed: int):
  """(model, config): a sharded InternVL / Qwen25VL loaded from `entry.checkpoint`, or born
  sharded from a preset.

  Built outside `jax.set_mesh`: with a mesh in context NNX would read logical names as mesh
  axes; the rules table maps them instead.
  """
  family = family_of(entry)
  if entry.checkpoint:
    model = from_pretrained(
      entry.checkpoint,
      dtype=entry.dtype,
      sharding=sharding_lib.pretrained_sharding(mesh, rules),
      param_dtype=entry.param_dtype or None,
      # Qwen2.5-VL checkpoints carry their `<|image_pad|>` id; `processor_for` checks it.
      image_token_id=tokenizer.img_context_id if family == "internvl" else None,
    )
    options = {k: v for k, v in entry.text_overrides.items() if k in EXECUTION_FIELDS}
    if options:
      model = with_execution_options(model, options)
    return model, model.config
  cfg = model_config(entry, tokenizer)
  network = Qwen25VL if family == "qwen2.5-vl" else InternVL
  model, _ = sharding_lib.create_sharded(lambda: network(cfg, rngs=nnx.Rngs(seed)), mesh, rules)
  return model, cfg


def with_execution_options(model: nnx.Module, options: dict) -> nnx.Module:
  """The model (InternVL or Qwen25VL) rebuilt around its own parameters with decoder fields of
  `models.config.EXECUTION_FIELDS` replaced (how it computes: scans, remat, attention form)."""
  config = model.config
  config = dataclasses.replace(config, text=dataclasses.replace(config.text, **options))
  rebuilt = nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0)))
  nnx.update(rebuilt, nnx.state(model))
  return rebuilt


def restore_student(settings: RunSettings, student: nnx.Module, directory: str):
  """(module with the checkpoint's parameters, step) from the newest checkpoint in `directory`
  that restores (a broken newer one is named in a warning and skipped)."""
  graphdef, params, frozen = state_lib.split_student(student, settings.distill.trainable)
  target = {"params": {"student": params}}
  if jax.tree.leaves(frozen):
    target["frozen"] = frozen
  found = ckpt_lib.restore_partial_latest(directory, target)
  if found is None:
    raise FileNotFoundError(
      f"no checkpoint in {directory}: train first (task drivekd.train), or point "
      "--config.eval.checkpoint_dir at a training run's checkpoints"
    )
  step, restored = found
  model = nnx.merge(graphdef, restored["params"]["student"], restored.get("frozen", frozen))
  return model, step


@dataclasses.dataclass
class Distillation:
  """The assembled distillation: the student's graph and train state, the step, the teachers.

  Attributes:
    student_graphdef: the student's graph (`state.params["student"]` its trainable part).
    state: the initial `TrainState`; state_shardings: its shardings (None without a mesh).
    step_fn: the pure `step(state, batch, rng, teacher_states) -> (state, metrics)`.
    teacher_graphdefs, teacher_states: one per teacher (frozen inputs of the step);
      teacher_shardings: their shardings (None without a mesh).
  """

  student_graphdef: Any
  student_config: InternVLConfig
  state: state_lib.TrainState
  state_shardings: Any
  step_fn: Any
  teacher_graphdefs: tuple
  teacher_configs: tuple
  teacher_states: tuple
  teacher_shardings: Any


def assemble_distillation(
  distill: DistillConfig,
  student: InternVL,
  teachers: Sequence[InternVL],
  tx: DistillOptimizer,
  rng: jax.Array,
  mesh: jax.sharding.Mesh | None = None,
  parallel_samples: int = 1,
  remat: str = "none",
  rules: sharding_lib.Rules | None = None,
) -> Distillation:
  """Splits the models, initialises the train state and builds the pure step.

  Models of `ShapeDtypeStruct`s (with shardings) give an abstract state: what `bench.plan`
  compiles the step from without weights. `parallel_samples` > 1 runs that many single-sample
  micro-steps at once, one per shard of the mesh's "data" axis; `remat` is what the student's
  backward keeps (`step.REMAT_POLICIES`). With a mesh, the models' activations are placed by
  `rules` (default: `sharding.DEFAULT_RULES`), e.g. the sequence over fsdp at micro-batch 1.

  With a mesh the models must already be sharded (`build_model`): the state is then initialised
  by one jitted program straight into the parameters' shardings (optimizer state alike, the
  rest replicated).
  """
  teacher_configs = tuple(t.config for t in teachers)
  teacher_graphdefs, teacher_states = (
    zip(*(nnx.split(t) for t in teachers)) if teachers else ((), ())
  )
  graphdef, params, frozen = state_lib.split_student(student, distill.trainable)

  def init_state(params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    return step_lib.init_train_state(distill, model, tx, rng, teacher_configs)[1]

  state_shardings = teacher_shardings = None
  if mesh is None:
    state = init_state(params, frozen)
  else:
    state_shardings = _train_state_shardings(init_state, params, frozen, tx, mesh)
    init = jax.jit(init_state, out_shardings=state_shardings)
    abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
    state = jax.eval_shape(init, params, frozen) if abstract else init(params, frozen)
    teacher_shardings = tuple(shardings_of(t) for t in teacher_states)
  placement = None
  if mesh is not None:
    rules = rules if rules is not None else sharding_lib.rules_from_config()
    placement = sharding_lib.activation_placement(mesh, rules)
  step_fn = step_lib.make_train_step(
    distill,
    student_graphdef=graphdef,
    student_config=student.config,
    teacher_graphdefs=teacher_graphdefs,
    teacher_configs=teacher_configs,
    tx=tx,
    parallel_samples=parallel_samples,
    mesh=mesh,
    remat=remat,
    activation_placement=placement,
  )
  return Distillation(
    graphdef,
    student.config,
    state,
    state_shardings,
    step_fn,
    tuple(teacher_graphdefs),
    teacher_configs,
    tuple(teacher_states),
    teacher_shardings,
  )


def _train_state_shardings(init_state, params, frozen, tx, mesh) -> state_lib.TrainState:
  abstract = jax.eval_shape(init_state, params, frozen)
  repl = sharding_lib.replicated(mesh)
  param_shardings = {
    "student": shardings_of(params),
    "aux": jax.tree.map(lambda _: repl, abstract.params["aux"]),
  }
  return state_lib.TrainState(
    step=repl,
    params=param_shardings,
    frozen=shardings_of(frozen),
    opt_state=sharding_lib.optimizer_state_shardings(tx, abstract.opt_state, param_shardings, mesh),
    rng=repl,
    reweight=jax.tree.map(lambda _: repl, abstract.reweight),
    skipped=repl,
    consecutive_skips=repl,
  )


@dataclasses.dataclass
class Experiment:
  """Everything a run assembles before its loop.

  Attributes:
    processor: feeds the student (teachers take the same token sequence; `processor_for`
      gives a teacher's own image preprocessing).
    micro_steps: micro-steps of the whole run (the optimizer's schedule counts their windows).
    warmed_teachers: names of the teachers trained by the CE warm-up (or reloaded from it).
  """

  settings: RunSettings
  mesh: jax.sharding.Mesh
  rules: Any
  data: sources.DataBundle
  processor: Processor
  distillation: Distillation
  tx: DistillOptimizer
  schedule: optax.Schedule
  micro_steps: int
  warmed_teachers: tuple[str, ...] = ()

  @property
  def state(self) -> state_lib.TrainState:
    return self.distillation.state

  @property
  def step_fn(self):
    return self.distillation.step_fn

  def student(self, state: state_lib.TrainState) -> InternVL:
    """The student module holding the parameters of `state`."""
    d = self.distillation
    return nnx.merge(d.student_graphdef, state.params["student"], state.frozen)

  def teacher(self, index: int) -> InternVL:
    d = self.distillation
    return nnx.merge(d.teacher_graphdefs[index], d.teacher_states[index])


def micro_steps_of(settings: RunSettings, mesh, rules) -> int:
  """Micro-steps of the run, after checking the global batch splits over the mesh and into
  micro-batches."""
  distill = settings.distill
  examples_per_step = settings.data.batch_size * jax.process_count()
  shards = sharding_lib.batch_size_divisor(mesh, rules)
  if examples_per_step % shards:
    raise ValueError(
      f"the global batch ({examples_per_step} = config.data.batch_size x {jax.process_count()} "
      f"processes) does not split over the {shards} batch shards of mesh {dict(mesh.shape)} "
      "(rule 'batch'); change config.data.batch_size or config.mesh"
    )
  if examples_per_step % distill.microbatch_size:
    raise ValueError(
      f"global batch {examples_per_step} is not a multiple of "
      f"config.distill.microbatch_size={distill.microbatch_size}"
    )
  return settings.num_steps * examples_per_step // distill.microbatch_size


def check_same_image_layout(student: Any, teacher: Any, name: str) -> None:
  """Raises ValueError unless teacher `name` turns images into the student's image tokens
  (one family; Qwen2.5-VL: `check_same_image_tokens`)."""
  families = model_family(student), model_family(teacher)
  if families[0] != families[1]:
    raise ValueError(
      f"teacher {name!r} is a {families[1]} model but the student a {families[0]} one: their "
      "image tokens differ, so their attention maps cannot be compared position by position"
    )
  if families[0] == "qwen2.5-vl":
    try:
      check_same_image_tokens(student, teacher)
    except ValueError as error:
      raise ValueError(f"teacher {name!r}: {error}") from None


def build_teachers(
  settings: RunSettings,
  data: sources.DataBundle,
  mesh,
  rules,
  workdir: str,
  student_config: Any = None,
):
  """(teacher modules, names of the warmed ones): each built (or loaded), checked to cut images
  as the student of `student_config` does (when given), preset-built ones warmed with plain CE
  when `teacher_warmup.steps` > 0."""
  teachers, warmed = [], []
  for i, name in enumerate(settings.teacher_order):
    entry = settings.teachers[name]
    if entry.tokenizer:
      check_same_tokenizer(data.tokenizer, Tokenizer.from_path(entry.tokenizer))
    model, cfg = build_model(entry, data.tokenizer, mesh, rules, settings.seed + 1 + i)
    if student_config is not None:
      check_same_image_layout(student_config, cfg, name)
    if settings.teacher_warmup.steps > 0 and not entry.checkpoint:
      processor = processor_for(settings, data.tokenizer, cfg)
      folder = os.path.join(workdir, "teachers", name)
      model = warmup_lib.warm_up(name, model, settings, data, processor, mesh, rules, folder)
      warmed.append(name)
    teachers.append(model)
  return teachers, tuple(warmed)


def build_experiment(settings: RunSettings, workdir: str) -> Experiment:
  """Mesh, data, student, teachers, optimizer, state and the step of a Drive-KD run."""
  workdir = os.path.abspath(workdir)
  mesh = sharding_lib.make_mesh(settings.mesh)
  rules = sharding_lib.rules_from_config(settings.sharding_rules)
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  micro_steps = micro_steps_of(settings, mesh, rules)
  data = sources.prepare_data(settings.data, workdir)
  student, student_cfg = build_model(settings.student, data.tokenizer, mesh, rules, settings.seed)
  teachers, warmed = build_teachers(settings, data, mesh, rules, workdir, student_cfg)
  distill = settings.distill
  optimizer_settings = dataclasses.replace(
    settings.optimizer, accumulation_steps=distill.grad_accum_steps
  )
  tx, schedule = build_distill_optimizer(
    optimizer_settings, micro_steps, step_lib.gradient_combiner(distill)
  )
  distillation = assemble_distillation(
    distill, student, teachers, tx, jax.random.key(settings.seed), mesh, rules=rules
  )
  return Experiment(
    settings=settings,
    mesh=mesh,
    rules=rules,
    data=data,
    processor=processor_for(settings, data.tokenizer, student_cfg),
    distillation=distillation,
    tx=tx,
    schedule=schedule,
    micro_steps=micro_steps,
    warmed_teachers=warmed,
  )
