"""The Drive-KD trainer: `run(config, workdir)` for `task = "drivekd.train"`.

Phases: mesh and rules -> data (synthetic data generated into the workdir when the config asks)
-> student born sharded, teachers sharded by the same rules, preset-built teachers warmed up with
plain CE when `config.teacher_warmup.steps` > 0 (saved once under `<workdir>/teachers/<name>/`,
reloaded by later launches), then frozen -> optimizer (AGP per micro-step -> window mean ->
clip -> AdamW with warmup-cosine) -> train state -> restore the latest checkpoint ->
jitted, donated, non-finite-guarded step loop with metrics, checkpoints and SIGTERM handling ->
final checkpoint -> evaluation summary (of the teachers too when `config.eval.teachers`).

`train_loop` is the model-agnostic core; `run` wires the Drive-KD pieces into it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from drivekd_jax.train import checkpoint as ckpt_lib
from drivekd_jax.train import metrics as metrics_lib
from drivekd_jax.train import sharding as sharding_lib
from drivekd_jax.train.optimizer import build_distill_optimizer, build_optimizer


class NonFiniteError(RuntimeError):
  """Raised when too many consecutive steps produced a non-finite loss or state."""


# ---------------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------------


def _all_finite(tree: Any) -> jax.Array:
  leaves = [
    x for x in jax.tree.leaves(tree) if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)
  ]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def guard_nonfinite(
  step_fn: Callable[..., tuple[Any, Mapping[str, jax.Array]]],
  loss_key: str = "loss",
  check_state: bool = True,
) -> Callable[..., Any]:
  """Wraps a pure step so a non-finite loss or new state keeps the old state.

  The returned function is `(state, batch, rng, counters, *extra) -> (state, metrics, counters)`
  with counters `{"nonfinite_total", "nonfinite_in_row"}` int32 scalars, and adds
  `metrics["nonfinite"]` (skipped steps or micro-steps). Steps that skip bad micro-batches
  themselves (the Drive-KD step reports `skipped` and `consecutive_skips`) are counted the same
  way; for them `check_state=False` avoids the whole-state check and select (which keeps old and
  new state alive together).
  """

  def guarded(state, batch, rng, counters, *extra):
    new_state, metrics = step_fn(state, batch, rng, *extra)
    finite = jnp.array(True)
    if check_state:
      finite = _all_finite(new_state)
      if loss_key in metrics:
        finite = finite & jnp.all(jnp.isfinite(metrics[loss_key]))
      state = jax.lax.cond(finite, lambda: new_state, lambda: state)
    else:
      state = new_state
    skipped = jnp.logical_not(finite).astype(jnp.int32)
    inner_skipped = jnp.asarray(metrics.get("skipped", 0), jnp.float32).astype(jnp.int32)
    in_row = jnp.where(finite, 0, counters["nonfinite_in_row"] + 1)
    if "consecutive_skips" in metrics:
      in_row = jnp.maximum(in_row, jnp.asarray(metrics["consecutive_skips"]).astype(jnp.int32))
    counters = {
      "nonfinite_total": counters["nonfinite_total"] + skipped + inner_skipped,
      "nonfinite_in_row": in_row,
    }
    metrics = {**metrics, "nonfinite": (skipped + inner_skipped).astype(jnp.float32)}
    return state, metrics, counters

  return guarded


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopResult:
  step: int  # batches consumed when the loop returned
  state: Any
  preempted: bool
  resumed_from: int | None
  nonfinite_total: int


@dataclasses.dataclass
class LoopSettings:
  """What `train_loop` needs to know from the config.

  Attributes:
    num_steps: micro-steps (batches) of the whole run.
    log_every: steps between metric writes.
    checkpoint_every: steps between periodic checkpoints; keep: checkpoints kept.
    async_checkpoints: write checkpoints in the background.
    max_consecutive_nonfinite: stop after this many skipped steps in a row.
    progress_bar: draw the tqdm bar.
    peak_flops_per_device: for MFU; 0 detects from the device kind.
  """

  num_steps: int
  log_every: int = 10
  checkpoint_every: int = 100
  keep: int = 3
  async_checkpoints: bool = True
  max_consecutive_nonfinite: int = 10
  progress_bar: bool = True
  peak_flops_per_device: float = 0.0

  @classmethod
  def from_config(cls, config: Any) -> LoopSettings:
    ck = config.get("checkpoint", {})
    return cls(
      num_steps=int(config.num_steps),
      log_every=int(config.get("log_every", 10)),
      checkpoint_every=int(ck.get("every_steps", 100)),
      keep=int(ck.get("keep", 3)),
      async_checkpoints=bool(ck.get("async_save", True)),
      max_consecutive_nonfinite=int(config.get("max_consecutive_nonfinite", 10)),
      progress_bar=bool(config.get("progress_bar", True)),
      peak_flops_per_device=float(config.get("peak_flops_per_device", 0.0)),
    )


def _step_shardings(mesh, rules, batch: Mapping[str, np.ndarray]) -> dict:
  return {k: sharding_lib.batch_sharding(mesh, rules, np.ndim(v)) for k, v in batch.items()}


def train_loop(
  *,
  settings: LoopSettings,
  workdir: str,
  mesh: jax.sharding.Mesh,
  rules: Mapping[str, tuple[str, ...]],
  state: Any,
  state_shardings: Any,
  step_fn: Callable[..., Any],
  data: Any,
  rng: jax.Array,
  extra: tuple[Any, ...] = (),
  extra_shardings: tuple[Any, ...] = (),
  flops_fn: Callable[[Mapping[str, np.ndarray]], float] | None = None,
  to_global: Callable[[Mapping[str, np.ndarray], Mapping[str, Any]], Any] | None = None,
  metadata: Mapping[str, Any] | None = None,
  guard: ckpt_lib.PreemptionGuard | None = None,
  check_state: bool = True,
  host_scalars: Callable[[int], Mapping[str, float]] | None = None,
) -> LoopResult:
  """Runs (or resumes) training until `settings.num_steps` batches are consumed or SIGTERM.

  Args:
    settings: loop settings.
    workdir: the run folder; checkpoints go to `<workdir>/checkpoints`, events to
      `<workdir>/tensorboard`.
    mesh, rules: the device mesh and logical rules (batches split over the "batch" rule).
    state: the initial train state (sharded); replaced by the latest checkpoint if one exists.
    state_shardings: NamedShardings matching `state`.
    step_fn: pure `(state, batch, rng, *extra) -> (state, metrics)`; metrics are scalars.
    data: an iterator of host batches (dicts of numpy arrays, this process's share) with
      `get_state()` / `set_state(s)` (grain iterators have both).
    rng: the run's base key; step s uses `fold_in(rng, s)`.
    extra: frozen inputs of the step (teachers), never donated nor saved.
    flops_fn: model FLOPs of one (global) step given this process's host batch, for MFU.
    to_global: `(host_batch, shardings) -> global arrays`; default
      `sharding.host_to_global_batch`.
    metadata: JSON-able facts stored in every checkpoint.
    guard: a PreemptionGuard (one is installed when None).
    check_state: check the whole new state for non-finite values and keep the old one if so;
      False for steps that skip bad updates themselves (see `guard_nonfinite`).
    host_scalars: `step -> {name: value}` logged with the metrics (e.g. the learning rate).

  Returns:
    A LoopResult.
  """
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    save_interval_steps=settings.checkpoint_every,
    max_to_keep=settings.keep,
    async_save=settings.async_checkpoints,
  )
  counters = {
    "nonfinite_total": jnp.zeros((), jnp.int32),
    "nonfinite_in_row": jnp.zeros((), jnp.int32),
  }
  repl = sharding_lib.replicated(mesh)
  counters = sharding_lib.replicate(counters, mesh)
  rng = sharding_lib.replicate(rng, mesh)

  # Resume.
  step = 0
  resumed_from = None
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_shardings
  )
  restored = checkpointer.restore_latest(abstract_state, jax.eval_shape(lambda: rng))
  if restored is not None:
    state, rng, step = restored.state, restored.rng, restored.step
    resumed_from = step
    if restored.data_state is not None:
      data.set_state(restored.data_state)
    total = int(restored.metadata.get("nonfinite_total", 0))
    counters = sharding_lib.replicate(
      {"nonfinite_total": np.int32(total), "nonfinite_in_row": np.int32(0)}, mesh
    )
    logging.info("resuming from checkpoint step %d in %s", step, checkpointer.directory)
    print(f"Resuming from step {step} (checkpoint in {checkpointer.directory})", flush=True)
  if step >= settings.num_steps:
    logging.info("step %d >= num_steps %d: nothing to train", step, settings.num_steps)
    checkpointer.close()
    return LoopResult(step, state, False, resumed_from, int(counters["nonfinite_total"]))

  peak = settings.peak_flops_per_device or metrics_lib.detect_peak_flops()
  writer = metrics_lib.MetricsWriter(
    os.path.join(workdir, "tensorboard"),
    total_steps=settings.num_steps,
    start_step=step,
    peak_flops_per_device=peak,
    show_progress=settings.progress_bar,
  )

  guarded = guard_nonfinite(step_fn, check_state=check_state)
  compiled = None
  own_guard = guard is None
  guard = guard or ckpt_lib.PreemptionGuard()
  window: list[Mapping[str, jax.Array]] = []
  tokens_in_window = 0.0
  examples_in_window = 0.0
  flops_in_window = 0.0
  previous_counters = None
  preempted = False
  timer_started = False

  def stop_if_nonfinite(step_counters, through_step):
    in_row = int(step_counters["nonfinite_in_row"])
    if in_row >= settings.max_consecutive_nonfinite:
      raise NonFiniteError(
        f"{in_row} consecutive steps had a non-finite loss or update (through step "
        f"{through_step}); stopping. The newest checkpoint in {checkpointer.directory} (step "
        f"{checkpointer.latest_step()}) holds the last good state."
      )

  def save(at_step, force):
    meta = {**(metadata or {}), "nonfinite_total": int(counters["nonfinite_total"])}
    return checkpointer.save(
      at_step, state, rng=rng, data_state=data.get_state(), metadata=meta, force=force
    )

  if own_guard:
    guard.__enter__()
  try:
    while step < settings.num_steps:
      if guard.should_stop():
        preempted = True
        break
      host_batch = next(data)
      if compiled is None:
        batch_shardings = _step_shardings(mesh, rules, host_batch)
        compiled = jax.jit(
          guarded,
          in_shardings=(
            state_shardings,
            batch_shardings,
            repl,
            {"nonfinite_total": repl, "nonfinite_in_row": repl},
            *extra_shardings,
          ),
          out_shardings=(
            state_shardings,
            repl,
            {"nonfinite_total": repl, "nonfinite_in_row": repl},
          ),
          donate_argnums=(0,),
        )
      if to_global is None:
        batch = sharding_lib.host_to_global_batch(host_batch, mesh, rules)
      else:
        batch = to_global(host_batch, batch_shardings)
      step_rng = jax.random.fold_in(rng, step)
      state, step_metrics, counters = compiled(state, batch, step_rng, counters, *extra)
      step += 1
      window.append(step_metrics)
      if "attention_mask" in host_batch:
        tokens_in_window += float(np.sum(host_batch["attention_mask"])) * jax.process_count()
      if "example_mask" in host_batch:
        examples_in_window += float(np.sum(host_batch["example_mask"])) * jax.process_count()
      if flops_fn is not None:
        flops_in_window += flops_fn(host_batch)

      # The previous step's counters are ready by now; reading them keeps dispatch one ahead.
      if previous_counters is not None:
        stop_if_nonfinite(previous_counters, step - 1)
      previous_counters = counters

      first_of_launch = not timer_started
      if first_of_launch or step % settings.log_every == 0 or step == settings.num_steps:
        jax.block_until_ready(state)
        means = {k: float(np.mean([float(m[k]) for m in window])) for k in window[0]}
        means["nonfinite_total"] = float(counters["nonfinite_total"])
        n = len(window)
        timing = writer.timing(
          step,
          tokens=tokens_in_window / n if tokens_in_window else None,
          examples=examples_in_window / n if examples_in_window else None,
          flops=flops_in_window / n if flops_in_window else None,
        )
        if first_of_launch:
          timing = {}  # the first step of a launch includes compilation
          writer.start_timer(step)
          timer_started = True
        extra_scalars = dict(host_scalars(step)) if host_scalars is not None else {}
        writer.log(step, {**means, **timing, **extra_scalars})
        short = {k: means[k] for k in ("loss", "nonfinite_total") if k in means}
        writer.update_progress(step, short)
        window, tokens_in_window, examples_in_window, flops_in_window = [], 0.0, 0.0, 0.0
      else:
        writer.update_progress(step)
      save(step, force=False)

    stop_if_nonfinite(counters, step)
    save(step, force=True)
    checkpointer.wait()
    if preempted:
      logging.warning("stop requested (%s): saved step %d, exiting", guard.signal_name, step)
      print(f"Preempted ({guard.signal_name}): saved checkpoint at step {step}", flush=True)
    total = int(counters["nonfinite_total"])
    return LoopResult(step, state, preempted, resumed_from, total)
  finally:
    if own_guard:
      guard.__exit__(None, None, None)
    writer.close()
    checkpointer.close()


# ---------------------------------------------------------------------------------------------
# Drive-KD wiring
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DataBundle:
  """The run's data: tokenizer, processor, sources and the pipeline settings."""

  tokenizer: Any
  processor: Any  # set once the student's config is known
  train_source: Any
  test_source: Any
  train_name: str
  test_name: str
  pipeline_config: Any


class _Subset:
  """Random-access view of some indices of a source (capability-filtered splits)."""

  def __init__(self, source, indices: list[int]):
    self._source = source
    self._indices = indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, i: int):
    return self._source[self._indices[i]]


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _on_process_zero_then_barrier(name: str, fn: Callable[[], Any]) -> None:
  if jax.process_index() == 0:
    fn()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def _data_dir(config: Any, workdir: str) -> str:
  return os.path.abspath(config.data.get("tfds_dir", "") or os.path.join(workdir, "data", "tfds"))


def synthetic_root(config: Any, workdir: str) -> str:
  syn = config.data.synthetic
  return os.path.abspath(syn.get("dir", "") or os.path.join(workdir, "data", "synthetic"))


def prepare_synthetic(config: Any, workdir: str) -> str:
  """Writes the synthetic driving files into the workdir once (a marker records completion)."""
  from drivekd_jax.data import synthetic

  syn = config.data.synthetic
  root = synthetic_root(config, workdir)
  marker = os.path.join(root, "COMPLETE.json")
  settings = {
    "num_train_frames": int(syn.num_train_frames),
    "num_test_frames": int(syn.num_test_frames),
    "seed": int(syn.seed),
    "image_size": int(syn.image_size),
  }

  def write():
    if os.path.exists(marker):
      with open(marker) as f:
        if json.load(f) == settings:
          return
      raise ValueError(
        f"{root} holds synthetic data written with other settings ({marker}); "
        "use a new workdir or config.data.synthetic.dir"
      )
    logging.info("writing synthetic driving data to %s (%s)", root, settings)
    synthetic.write_synthetic_driving(root, **settings)
    with open(marker, "w") as f:
      json.dump(settings, f)

  _on_process_zero_then_barrier("drivekd_synthetic_data", write)
  return root


def _open_split(entry: Any, default_dir: str, tfds_dir: str, capabilities: tuple[str, ...]):
  """Builds (once) and opens one split; returns (source, name)."""
  from drivekd_jax.data import records as records_lib

  kind = entry.kind
  manual_dir = os.path.abspath(entry.get("dir", "") or default_dir)
  builder_config = entry.get("config", "") or None
  kwargs = dict(entry.get("builder_kwargs", {}) or {})
  holder = {}

  def build():
    holder["builder"] = records_lib.build_dataset(
      kind, manual_dir, tfds_dir, config=builder_config, **kwargs
    )

  _on_process_zero_then_barrier(f"drivekd_build_{kind}", build)
  builder = holder.get("builder") or records_lib.build_dataset(
    kind, manual_dir, tfds_dir, config=builder_config, **kwargs
  )
  split = entry.get("split", "train")
  source = builder.as_data_source(split)
  name = f"{kind}{'/' + builder_config if builder_config else ''}:{split} ({manual_dir})"
  if capabilities and tuple(capabilities) != ("perception", "reasoning", "planning", "other"):
    cache = os.path.join(
      tfds_dir, f"indices_{kind}_{builder_config}_{split}_{'-'.join(capabilities)}.json"
    )
    if os.path.exists(cache):
      with open(cache) as f:
        indices = json.load(f)
    else:
      indices = [i for i in range(len(source)) if _text(source[i]["capability"]) in capabilities]
      if jax.process_index() == 0:
        with open(cache, "w") as f:
          json.dump(indices, f)
    if not indices:
      raise ValueError(f"{name}: no records of capabilities {capabilities}")
    source = _Subset(source, indices)
    name += f" [{','.join(capabilities)}]"
  return source, name


def load_tokenizer(config: Any, workdir: str, synthetic_dir: str | None):
  """The configured tokenizer.json, or a BPE trained on the synthetic training text."""
  from drivekd_jax.data.tokenizer import Tokenizer, train_bpe_tokenizer

  path = config.data.get("tokenizer", "")
  if path:
    return Tokenizer.from_path(path)
  if synthetic_dir is None:
    raise ValueError("config.data.tokenizer is required unless config.data.source='synthetic'")
  out = os.path.join(workdir, "data", "tokenizer", "tokenizer.json")

  def train():
    if os.path.exists(out):
      return  # a resumed run keeps the tokenizer its checkpoints were trained with
    os.makedirs(os.path.dirname(out), exist_ok=True)
    texts = []
    with open(os.path.join(synthetic_dir, "drivekd_train.json")) as f:
      for item in json.load(f):
        texts.extend(m["content"] for m in item["messages"])
    train_bpe_tokenizer(texts, int(config.data.vocab_size), out)

  _on_process_zero_then_barrier("drivekd_tokenizer", train)
  return Tokenizer.from_path(out)


def prepare_data(config: Any, workdir: str) -> DataBundle:
  """Synthetic files (if asked) -> TFDS builders -> sources, tokenizer and processor."""
  from drivekd_jax.data import pipeline as pipeline_lib

  data = config.data
  synthetic_dir = prepare_synthetic(config, workdir) if data.source == "synthetic" else None
  if data.source not in ("synthetic", "files"):
    raise ValueError(f"config.data.source={data.source!r}: expected 'synthetic' or 'files'")
  tfds_dir = _data_dir(config, workdir)
  capabilities = tuple(data.get("capabilities", ()) or ())
  default_dir = synthetic_dir or ""
  train_source, train_name = _open_split(data.train, default_dir, tfds_dir, capabilities)
  test_source, test_name = _open_split(data.test, default_dir, tfds_dir, capabilities)
  tokenizer = load_tokenizer(config, workdir, synthetic_dir)
  pipeline_config = pipeline_lib.PipelineConfig(
    batch_size=int(data.batch_size),
    buckets=tuple(int(b) for b in data.buckets),
    max_images=int(data.max_images),
    seed=int(data.get("shuffle_seed", config.seed)),
    overlong=data.get("overlong", "error"),
    num_threads=int(data.get("num_threads", 0)),
  )
  return DataBundle(
    tokenizer, None, train_source, test_source, train_name, test_name, pipeline_config
  )


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def model_config(entry: Any, tokenizer: Any = None):
  """The InternVLConfig of a preset model entry (`preset`, `dtype`, `text_overrides`).

  With a tokenizer, the image-context id is the tokenizer's and the vocabulary covers it.
  """
  from drivekd_jax.models import presets

  overrides = dict(entry.get("text_overrides", {}) or {})
  image_token_id = None
  if tokenizer is not None:
    image_token_id = tokenizer.img_context_id
    overrides.setdefault(
      "vocab_size", max(tokenizer.vocab_size, presets.internvl3(entry.preset).text.vocab_size)
    )
  return presets.internvl3(
    entry.preset,
    dtype=entry.get("dtype", "float32"),
    param_dtype=entry.get("param_dtype", "") or None,
    image_token_id=image_token_id,
    **overrides,
  )


def processor_for(config: Any, tokenizer: Any, model_cfg: Any):
  """The processor that feeds a model of `model_cfg` (image size, tokens per image)."""
  from drivekd_jax.data.processor import Processor

  return Processor.for_model(
    tokenizer,
    model_cfg,
    max_tiles=int(config.data.get("max_tiles", 1)),
    system_message=config.data.get("system_message", "") or None,
  )


def build_model(entry: Any, tokenizer: Any, mesh, rules, seed: int):
  """A sharded InternVL: loaded from `entry.checkpoint`, or born sharded from a preset."""
  from flax import nnx

  from drivekd_jax.models.internvl import InternVL

  if entry.get("checkpoint", ""):
    from drivekd_jax.models import from_pretrained

    model = from_pretrained(
      entry.checkpoint,
      dtype=entry.get("dtype", "bfloat16"),
      sharding=sharding_lib.pretrained_sharding(mesh, rules),
      param_dtype=entry.get("param_dtype", "") or None,
      image_token_id=tokenizer.img_context_id,
    )
    return model, model.config
  cfg = model_config(entry, tokenizer)
  model, _ = sharding_lib.create_sharded(lambda: InternVL(cfg, rngs=nnx.Rngs(seed)), mesh, rules)
  return model, cfg


def _shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


# ---------------------------------------------------------------------------------------------
# Teacher warm-up
# ---------------------------------------------------------------------------------------------


def _warmup_settings(config: Any, entry: Any) -> dict:
  """What determines a warmed teacher (stored beside it; a mismatch refuses to reuse it)."""
  warm = config.teacher_warmup
  return {
    "steps": int(warm.steps),
    "learning_rate": float(warm.learning_rate),
    "warmup_steps": int(warm.get("warmup_steps", 0)),
    "grad_clip_norm": float(warm.get("grad_clip_norm", 0.0)),
    "batch_size": int(warm.get("batch_size", 0) or config.data.batch_size),
    "seed": int(config.seed),
    "shuffle_seed": int(config.data.get("shuffle_seed", config.seed)),
    "preset": entry.preset,
    "text_overrides": dict(entry.get("text_overrides", {}) or {}),
    "dtype": entry.get("dtype", "float32"),
  }


def make_ce_step(graphdef: Any, tx: optax.GradientTransformation) -> Callable:
  """Pure `(params, frozen, opt_state, batch) -> (params, opt_state, loss)`: one CE update.

  `params` / `frozen` are the `nnx.Param` / remaining states of a model of `graphdef`; the batch
  is a training batch (`[B, L]` fields, `pixel_values [B, M, H, W, 3]`, `example_mask [B]`).
  """
  from flax import nnx

  from drivekd_jax.distill import losses

  def loss_fn(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    attention = batch["attention_mask"].astype(bool)
    out = model(
      batch["input_ids"],
      batch["pixel_values"],
      attention_mask=attention,
      positions=batch["positions"],
    )
    return losses.cross_entropy(
      out.logits, batch["labels"], attention, batch["example_mask"].astype(bool)
    )

  def step(params, frozen, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def warm_up_teacher(
  name: str,
  model: Any,
  config: Any,
  data: DataBundle,
  processor: Any,
  mesh,
  rules,
  workdir: str,
  compiled_steps: dict | None = None,
) -> Any:
  """Trains a preset-built teacher with plain CE on the training split, or reloads that result.

  The warmed parameters are saved once to `<workdir>/teachers/<name>/` (Orbax, with a
  `warmup.json` holding the settings and the loss curve); a relaunch with the same settings
  restores them instead of training again, so resumed runs distil from identical teachers.

  `compiled_steps` (graphdef -> jitted step) lets teachers of one architecture share a
  compilation (their warm-up settings are the same, so their steps are the same function).

  Returns:
    The (possibly restored) teacher module; the caller freezes it by passing its state as a
    step input.
  """
  import orbax.checkpoint as ocp
  from flax import nnx
  from ml_collections import ConfigDict

  from drivekd_jax.data import pipeline as pipeline_lib

  settings = _warmup_settings(config, config.teachers[name])
  folder = os.path.join(os.path.abspath(workdir), "teachers", name)
  marker = os.path.join(folder, "warmup.json")
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  shardings = _shardings_of(params)
  if os.path.exists(marker):
    with open(marker) as f:
      stored = json.load(f)
    if stored["settings"] != json.loads(json.dumps(settings)):
      raise ValueError(
        f"{marker} holds teacher {name!r} warmed with other settings ({stored['settings']}, now "
        f"{settings}); use a new workdir or delete {folder}"
      )
    target = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
    )
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(os.path.join(folder, "params"), target)
    print(
      f"Teacher {name}: reusing its warm-up ({settings['steps']} steps, final CE "
      f"{stored['loss'][-1][1]:.3f}) from {folder}",
      flush=True,
    )
    return nnx.merge(graphdef, params, frozen)

  steps = settings["steps"]
  tx, _ = build_optimizer(
    ConfigDict(
      dict(
        learning_rate=settings["learning_rate"],
        warmup_steps=settings["warmup_steps"],
        grad_clip_norm=settings["grad_clip_norm"],
      )
    ),
    steps,
  )
  repl = sharding_lib.replicated(mesh)
  opt_shardings = sharding_lib.optimizer_state_shardings(
    tx, jax.eval_shape(tx.init, params), shardings, mesh
  )
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  pipeline_config = dataclasses.replace(
    data.pipeline_config, batch_size=settings["batch_size"], seed=settings["shuffle_seed"]
  )
  iterator = pipeline_lib.TrainingPipeline(
    data.train_source, processor, pipeline_config, source_name=data.train_name
  ).iterator()
  compiled_steps = {} if compiled_steps is None else compiled_steps
  compiled = compiled_steps.get(graphdef)
  frozen_shardings = _shardings_of(frozen)
  log_every = max(1, int(config.teacher_warmup.get("log_every", 50)))
  curve, window = [], []
  started = time.time()
  for step in range(1, steps + 1):
    host_batch = next(iterator)
    if compiled is None:
      batch_shardings = _step_shardings(mesh, rules, host_batch)
      compiled = jax.jit(
        make_ce_step(graphdef, tx),
        in_shardings=(shardings, frozen_shardings, opt_shardings, batch_shardings),
        out_shardings=(shardings, opt_shardings, repl),
        donate_argnums=(0, 2),
      )
      compiled_steps[graphdef] = compiled
    batch = pipeline_lib.make_global_batch(
      host_batch, _step_shardings(mesh, rules, host_batch), pad_id=data.tokenizer.pad_id
    )
    params, opt_state, loss = compiled(params, frozen, opt_state, batch)
    window.append(loss)
    if step == 1 or step % log_every == 0 or step == steps:
      mean = float(np.mean([float(x) for x in window]))
      if not np.isfinite(mean):
        raise NonFiniteError(f"teacher {name!r} warm-up: non-finite CE at step {step}")
      curve.append((step, mean))
      window = []
      logging.info("teacher %s warm-up step %d/%d: CE %.4f", name, step, steps, mean)
      print(f"Teacher {name} warm-up step {step}/{steps}: CE {mean:.4f}", flush=True)
  seconds = time.time() - started
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(folder, "params"), params, force=True)
    checkpointer.wait_until_finished()

  def write_marker():
    with open(marker + ".tmp", "w") as f:
      json.dump({"settings": settings, "loss": curve, "seconds": round(seconds, 1)}, f, indent=2)
    os.replace(marker + ".tmp", marker)

  _on_process_zero_then_barrier(f"drivekd_teacher_{name}", write_marker)
  return nnx.merge(graphdef, params, frozen)


@dataclasses.dataclass
class Experiment:
  """Everything `run` assembles before the loop."""

  mesh: Any
  rules: Any
  data: DataBundle
  student_config: Any
  teacher_configs: tuple
  student_graphdef: Any
  teacher_states: tuple
  teacher_shardings: tuple
  distill: Any
  tx: Any
  schedule: Any
  state: Any
  state_shardings: Any
  step_fn: Any
  teacher_graphdefs: tuple = ()
  warmed_teachers: tuple[str, ...] = ()  # teachers trained by the warm-up (or reloaded from it)


def teacher_names(config: Any) -> tuple[str, ...]:
  names = config.get("teacher_names", "")
  names = (
    tuple(n.strip() for n in names.split(",") if n.strip())
    if isinstance(names, str)
    else tuple(names)
  )
  for name in names:
    if name not in config.teachers:
      raise ValueError(
        f"config.teacher_names lists {name!r} but config.teachers has no entry "
        f"for it (entries: {sorted(config.teachers.keys())})"
      )
  return names


def build_experiment(config: Any, workdir: str) -> Experiment:
  """Mesh, data, student, teachers, optimizer, state and the step of a Drive-KD run."""
  from flax import nnx

  from drivekd_jax.data.tokenizer import check_same_tokenizer
  from drivekd_jax.distill.signals import DistillConfig
  from drivekd_jax.train import state as state_lib
  from drivekd_jax.train import step as step_lib

  mesh = sharding_lib.make_mesh(config.get("mesh", None))
  rules = sharding_lib.rules_from_config(config.get("sharding_rules", None))
  logging.info("mesh %s over %d devices", dict(mesh.shape), mesh.size)
  data = prepare_data(config, workdir)
  for name in teacher_names(config):
    path = config.teachers[name].get("tokenizer", "")
    if path:
      from drivekd_jax.data.tokenizer import Tokenizer

      check_same_tokenizer(data.tokenizer, Tokenizer.from_path(path))

  # Built outside `jax.set_mesh`: with a mesh in context NNX would read logical names as mesh
  # axes; the rules table maps them instead.
  student, student_cfg = build_model(config.student, data.tokenizer, mesh, rules, config.seed)
  data.processor = processor_for(config, data.tokenizer, student_cfg)
  teachers, warmed, compiled_warmup = [], [], {}
  warmup_steps = int(config.get("teacher_warmup", {}).get("steps", 0))
  for i, name in enumerate(teacher_names(config)):
    entry = config.teachers[name]
    model, cfg = build_model(entry, data.tokenizer, mesh, rules, config.seed + 1 + i)
    if warmup_steps > 0 and not entry.get("checkpoint", ""):
      processor = processor_for(config, data.tokenizer, cfg)
      model = warm_up_teacher(
        name, model, config, data, processor, mesh, rules, workdir, compiled_warmup
      )
      warmed.append(name)
    teachers.append((model, cfg))
  teacher_cfgs = tuple(cfg for _, cfg in teachers)
  teacher_graphdefs, teacher_states = [], []
  for model, _ in teachers:
    graphdef, teacher_state = nnx.split(model)
    teacher_graphdefs.append(graphdef)
    teacher_states.append(teacher_state)
  teacher_states = tuple(teacher_states)

  distill = DistillConfig.from_config(config.distill)
  examples_per_step = data.pipeline_config.batch_size * jax.process_count()
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
  micro_steps = int(config.num_steps) * examples_per_step // distill.microbatch_size
  opt_config = config.optimizer
  combiner = step_lib.gradient_combiner(distill)
  opt = dict(opt_config.items() if hasattr(opt_config, "items") else opt_config)
  opt["accumulation_steps"] = distill.grad_accum_steps
  from ml_collections import ConfigDict

  tx, schedule = build_distill_optimizer(ConfigDict(opt), micro_steps, combiner)

  rng = jax.random.key(int(config.seed))
  graphdef, params, frozen = state_lib.split_student(student, distill.trainable)
  param_shardings = {"student": _shardings_of(params), "aux": None}

  def init_state(params, frozen):
    model = nnx.merge(graphdef, params, frozen)
    return step_lib.init_train_state(distill, model, tx, rng, teacher_cfgs)[1]

  abstract = jax.eval_shape(init_state, params, frozen)
  repl = sharding_lib.replicated(mesh)
  aux_shardings = jax.tree.map(lambda _: repl, abstract.params["aux"])
  param_shardings["aux"] = aux_shardings
  state_shardings = state_lib.TrainState(
    step=repl,
    params=param_shardings,
    frozen=_shardings_of(frozen),
    opt_state=sharding_lib.optimizer_state_shardings(tx, abstract.opt_state, param_shardings, mesh),
    rng=repl,
    reweight=jax.tree.map(lambda _: repl, abstract.reweight),
    skipped=repl,
    consecutive_skips=repl,
  )
  state = jax.jit(init_state, out_shardings=state_shardings)(params, frozen)
  step_fn = step_lib.make_train_step(
    distill,
    student_graphdef=graphdef,
    student_config=student_cfg,
    teacher_graphdefs=teacher_graphdefs,
    teacher_configs=teacher_cfgs,
    tx=tx,
  )
  return Experiment(
    mesh,
    rules,
    data,
    student_cfg,
    teacher_cfgs,
    graphdef,
    teacher_states,
    tuple(_shardings_of(t) for t in teacher_states),
    distill,
    tx,
    schedule,
    state,
    state_shardings,
    step_fn,
    tuple(teacher_graphdefs),
    tuple(warmed),
  )


def _config_json(config: Any) -> str:
  return (
    config.to_json_best_effort(indent=2) if hasattr(config, "to_json_best_effort") else str(config)
  )


def evaluate_model(
  config: Any,
  out_dir: str,
  exp: Experiment,
  model: Any,
  processor: Any,
  facts: Mapping[str, Any] | None = None,
) -> dict:
  """Answers and scores the test split with `model`; writes the summary files into `out_dir`."""
  from drivekd_jax.train import evaluate as evaluate_lib

  ev = config.eval
  return evaluate_lib.evaluate(
    model,
    processor,
    exp.data.tokenizer,
    exp.data.test_source,
    out_dir,
    batch_size=int(ev.batch_size),
    buckets=tuple(int(b) for b in exp.data.pipeline_config.buckets),
    max_images=exp.data.pipeline_config.max_images,
    max_new_tokens=int(ev.max_new_tokens),
    max_examples=int(ev.get("max_examples", 0)),
    source_name=exp.data.test_name,
    facts=facts,
  )


def evaluate_student(
  config: Any, workdir: str, exp: Experiment, state: Any, facts: Mapping[str, Any] | None = None
) -> dict:
  """Answers and scores the test split with the student held in `state`."""
  from flax import nnx

  model = nnx.merge(exp.student_graphdef, state.params["student"], state.frozen)
  return evaluate_model(config, workdir, exp, model, exp.data.processor, facts)


def evaluate_teachers(config: Any, workdir: str, exp: Experiment) -> dict:
  """Scores every teacher like the student; summaries go to `<workdir>/teachers/<name>/`.

  Returns:
    {teacher name: its "overall" scores}.
  """
  from flax import nnx

  out = {}
  for i, name in enumerate(teacher_names(config)):
    model = nnx.merge(exp.teacher_graphdefs[i], exp.teacher_states[i])
    processor = processor_for(config, exp.data.tokenizer, exp.teacher_configs[i])
    facts = {"teacher": name, "warmed_up": name in exp.warmed_teachers}
    summary = evaluate_model(
      config, os.path.join(workdir, "teachers", name), exp, model, processor, facts
    )
    out[name] = summary["by_capability"]["overall"]
  return out


def run(config: Any, workdir: str) -> dict:
  """Trains (or resumes) the configured Drive-KD student, then evaluates it.

  Returns:
    {"step", "preempted", "resumed_from", "nonfinite_total", "eval" (summary or None)}.
  """
  from drivekd_jax.data import pipeline as pipeline_lib

  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  ckpt_lib.quiet_orbax_info_logs()
  started = time.time()
  exp = build_experiment(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(_config_json(config))
  data = exp.data
  pipeline = pipeline_lib.TrainingPipeline(
    data.train_source, data.processor, data.pipeline_config, source_name=data.train_name
  )
  pad_id = data.tokenizer.pad_id
  num_losses = 1 + len(exp.distill.active)

  def flops_fn(host_batch):
    batch, length = host_batch["input_ids"].shape
    return metrics_lib.train_step_flops(
      exp.student_config,
      exp.teacher_configs,
      batch_size=batch * jax.process_count(),
      seq_len=length,
      images_per_example=host_batch["pixel_values"].shape[1],
      num_cotangents=num_losses,
    )

  def to_global(host_batch, shardings):
    return pipeline_lib.make_global_batch(host_batch, shardings, pad_id=pad_id)

  micro_per_step = data.pipeline_config.batch_size * jax.process_count()
  micro_per_step //= exp.distill.microbatch_size

  def host_scalars(step):
    # The learning rate of the most recent optimizer update (updates every grad_accum_steps).
    updates = max(0, step * micro_per_step // exp.distill.grad_accum_steps - 1)
    return {"learning_rate": float(exp.schedule(updates))}

  settings = LoopSettings.from_config(config)
  logging.info(
    "training: %d steps of %d examples from %s; %d teachers; capabilities %s",
    settings.num_steps,
    data.pipeline_config.batch_size * jax.process_count(),
    data.train_name,
    len(exp.teacher_configs),
    exp.distill.active,
  )
  result = train_loop(
    settings=settings,
    workdir=workdir,
    mesh=exp.mesh,
    rules=exp.rules,
    state=exp.state,
    state_shardings=exp.state_shardings,
    step_fn=exp.step_fn,
    data=pipeline.iterator(),
    rng=jax.random.key(int(config.seed) + 7),
    extra=(exp.teacher_states,),
    extra_shardings=(exp.teacher_shardings,),
    flops_fn=flops_fn,
    to_global=to_global,
    metadata={"train_source": data.train_name},
    check_state=False,  # the Drive-KD step skips non-finite micro-steps itself
    host_scalars=host_scalars,
  )
  out = {
    "step": result.step,
    "preempted": result.preempted,
    "resumed_from": result.resumed_from,
    "nonfinite_total": result.nonfinite_total,
    "eval": None,
  }
  if result.preempted or not config.eval.get("after_training", True):
    return out
  teacher_scores = {}
  if config.eval.get("teachers", False):
    teacher_scores = {"teachers": evaluate_teachers(config, workdir, exp)}
  out["eval"] = evaluate_student(
    config,
    workdir,
    exp,
    result.state,
    facts={
      **teacher_scores,
      "checkpoint_step": result.step,
      "train_source": data.train_name,
      "student": config.student.get("checkpoint", "") or config.student.preset,
      "nonfinite_total": result.nonfinite_total,
      "wall_seconds_before_eval": round(time.time() - started, 1),
    },
  )
  return out


def teacher_config(
  preset: str = "tiny",
  *,
  checkpoint: str = "",
  dtype: str = "float32",
  param_dtype: str = "",
  tokenizer: str = "",
  **text_overrides,
):
  """One entry of `config.teachers`: a preset (random init, optionally CE warm-up) or a local
  checkpoint, with decoder fields (`hidden_size=...`, `num_layers=...`) overriding the preset."""
  import ml_collections

  return ml_collections.ConfigDict(
    dict(
      preset=preset,
      checkpoint=checkpoint,
      dtype=dtype,
      param_dtype=param_dtype,
      tokenizer=tokenizer,
      text_overrides=dict(text_overrides),
    )
  )


def default_config():
  """Every key `run` reads, with the official Drive-KD defaults where they exist.

  The official defaults are listed in docs/drivekd_method.md §3.5.

  Config files start from this and change what their experiment needs.
  """
  import ml_collections

  c = ml_collections.ConfigDict()
  c.task = "drivekd.train"
  c.seed = 42
  c.num_steps = 1000
  c.log_every = 10
  c.progress_bar = True
  c.max_consecutive_nonfinite = 10
  c.peak_flops_per_device = 0.0  # 0: detect from the device kind (none on CPU: no MFU).

  # Multi-process start-up (see drivekd_jax/train/distributed.py).
  c.jax_distributed = False
  c.coordinator_address = ""
  c.num_processes = ml_collections.FieldReference(None, field_type=int)
  c.process_id = ml_collections.FieldReference(None, field_type=int)

  # Mesh (-1: the remaining devices) and logical-axis rules overriding sharding.DEFAULT_RULES,
  # e.g. [("embed", None)] to stop FSDP on the model width.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  c.sharding_rules = ()

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # "synthetic" (written into the workdir) or "files".
  c.data.synthetic = ml_collections.ConfigDict(
    dict(dir="", num_train_frames=200, num_test_frames=20, seed=0, image_size=64)
  )
  # Each split: a TFDS builder kind over a folder of released files (its manual dir).
  c.data.train = ml_collections.ConfigDict(
    dict(kind="drivekd_qa", dir="", config="", split="train", builder_kwargs={})
  )
  c.data.test = ml_collections.ConfigDict(
    dict(kind="drivekd_qa", dir="", config="", split="test", builder_kwargs={})
  )
  c.data.tfds_dir = ""  # "": <workdir>/data/tfds.
  c.data.capabilities = ()  # e.g. ("planning",): train and test on that capability only.
  c.data.tokenizer = ""  # tokenizer.json (or its folder); "": BPE trained on synthetic text.
  c.data.vocab_size = 512  # BPE size when training one.
  c.data.batch_size = 4  # examples per process per step.
  c.data.buckets = (256, 512, 1024)
  c.data.max_images = 6
  c.data.max_tiles = 1
  c.data.system_message = ""
  c.data.shuffle_seed = 42
  c.data.overlong = "error"
  c.data.num_threads = 0

  # Models: a preset (drivekd_jax.models.presets) or a local HF checkpoint folder.
  c.student = ml_collections.ConfigDict(
    dict(preset="1B", checkpoint="", dtype="float32", param_dtype="", text_overrides={})
  )
  c.teacher_names = "shared"
  c.teachers = ml_collections.ConfigDict()
  c.teachers.shared = ml_collections.ConfigDict(
    dict(
      preset="8B", checkpoint="", dtype="bfloat16", param_dtype="", text_overrides={}, tokenizer=""
    )
  )

  # The distillation step (drivekd_jax.distill.signals.DistillConfig fields).
  c.distill = ml_collections.ConfigDict(
    dict(
      capabilities=("perception", "reasoning", "planning"),
      teacher_for=(0, 0, 0),
      agp_mode="agp",
      agp_seed=42,
      microbatch_size=1,
      grad_accum_steps=4,
      dynamic_weights=True,
      trainable="all",
    )
  )

  c.optimizer = ml_collections.ConfigDict(
    dict(
      learning_rate=5e-5,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      schedule="cosine",
      warmup_steps=0,
      decay_steps=0,
      lr_floor_ratio=0.01,
      grad_clip_norm=0.0,
    )
  )

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))

  # teachers: also score every teacher with the same evaluator (`eval_summary.json` "teachers").
  c.eval = ml_collections.ConfigDict(
    dict(after_training=True, batch_size=8, max_new_tokens=64, max_examples=0, teachers=False)
  )

  # Plain-CE training of preset-built teachers before distillation (0 steps: none; teachers
  # loaded from checkpoints are never warmed). batch_size 0: config.data.batch_size.
  c.teacher_warmup = ml_collections.ConfigDict(
    dict(
      steps=0, learning_rate=3e-3, warmup_steps=10, grad_clip_norm=1.0, batch_size=0, log_every=50
    )
  )
  return c
