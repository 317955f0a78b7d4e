"""The distillation step against losses written here from the method's formulas.

The oracle shares no loss code with the step: the attention maps come from the JAX model (checked
against transformers elsewhere), asked for every layer's full map; the losses (CE, the masked
text→vision MSE, grouped full-map MSE, the mixing matrix, the loss weights) are written below from
the method notes, once for NumPy and JAX arrays alike (`xp`), with the layer windows spelled out
as literals. The step's per-row gradients are read through the public API: a recording combiner
in the `DistillOptimizer` keeps the stacked `[1+K, ...]` rows the step hands it.

The student has five blocks so that every signal reads its own depth: perception block 0,
reasoning blocks 1..2 (grouped matching onto teacher blocks 1..3, windows of two), planning
block 3 (the penultimate), and block 4 feeds only CE.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_distill_reweight import TorchReweight

from drivekd_jax.distill.signals import DistillConfig
from drivekd_jax.models import presets
from drivekd_jax.models.config import MapRequest
from drivekd_jax.models.internvl import InternVL
from drivekd_jax.train import optimizer as optimizer_lib
from drivekd_jax.train import step as step_lib

pytestmark = pytest.mark.usefixtures("fast_compiles")

IMAGE_ID = presets.TINY_IMAGE_TOKEN_ID
STUDENT = presets.internvl3("tiny", num_layers=5)
TEACHER = presets.internvl3("tiny", num_layers=6, hidden_size=96, intermediate_size=192)
BATCH, LENGTH = 3, 14
IMAGE_SLOTS = slice(3, 7)  # one 4-token image after three text tokens
# Reasoning on the student's blocks 1..2 (start 1, end -3), the teacher's 1..3.
REASONING = {"kind": "attention", "map": "full", "start": 1, "end": -3}
# The layers each signal reads, resolved by hand: (student block, teacher blocks averaged).
PERCEPTION_PAIR = (0, (0,))
REASONING_WINDOWS = ((1, (1, 2)), (2, (2, 3)))  # g = m - k + 1 = 3 - 2 + 1 = 2
PLANNING_PAIR = (3, (4,))  # the penultimate block of each model
DEEPEST = {"sup": None, "perception": 0, "reasoning": 2, "planning": 3}
NAMES = tuple(DEEPEST)
# The official rows, written out (docs/drivekd_method.md §3.2), and an asymmetric matrix whose
# transpose differs, both with rows summing to 1.
OFFICIAL_MIXING = np.array([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
ASYMMETRIC_MIXING = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.05, 0.15, 0.8]])
LOSS_WEIGHTS = np.array([0.7, 1.3, 2.0, 0.5])  # w_ce, w_p, w_r, w_pl: distinct, so a mix-up shows


def make_batch(seed=0):
  """Unpadded rows: text, one image, text; the last five tokens supervised; types 0, 1, 2."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 400, size=(BATCH, LENGTH)).astype(np.int32)
  ids[:, IMAGE_SLOTS] = IMAGE_ID
  labels = np.full((BATCH, LENGTH), -100, np.int32)
  labels[:, -5:] = ids[:, -5:]
  return {
    "input_ids": ids,
    "labels": labels,
    "attention_mask": np.ones((BATCH, LENGTH), bool),
    "image_mask": ids == IMAGE_ID,
    "positions": np.tile(np.arange(LENGTH, dtype=np.int32), (BATCH, 1)),
    "pixel_values": rng.normal(size=(BATCH, 1, 56, 56, 3)).astype(np.float32),
    "capability": np.arange(BATCH, dtype=np.int32),
    "example_mask": np.ones(BATCH, bool),
  }


def distill_config(mixing=None, weights=LOSS_WEIGHTS, **overrides) -> DistillConfig:
  """The test's signals and loss weights on one micro-batch of the whole batch; `mixing=None`
  keeps the config's default (the official matrix)."""
  fields = dict(
    signals={"reasoning": REASONING},
    weight_ce=float(weights[0]),
    weights=tuple(float(w) for w in weights[1:]),
    microbatch_size=BATCH,
    grad_accum_steps=1,
    dynamic_weights=False,
  )
  if mixing is not None:
    fields["mixing"] = tuple(map(tuple, np.asarray(mixing).tolist()))
  fields.update(overrides)
  return DistillConfig.from_config(fields)


def recording_combiner(num_rows: int) -> optax.GradientTransformationExtraArgs:
  """A combiner that sums the rows and keeps the last stacked `[num_rows, ...]` gradients."""

  def init(params):
    return jax.tree.map(lambda p: jnp.zeros((num_rows,) + p.shape, p.dtype), params)

  def update(stacked, state, params=None, **extra):
    del state, params, extra
    return jax.tree.map(lambda g: jnp.sum(g, axis=0), stacked), stacked

  return optax.GradientTransformationExtraArgs(init, update)


def build(config: DistillConfig, *, combiner=None, inner=None, lr=1e-3):
  """The only place that builds the step: (jitted step, state, teacher states, models).

  `combiner`/`inner` replace AGP/AdamW in the `DistillOptimizer` when given. `models` is
  (student graphdef, teacher module) for the oracle.
  """
  student = InternVL(STUDENT, rngs=nnx.Rngs(0))
  teacher = InternVL(TEACHER, rngs=nnx.Rngs(1))
  if combiner is None and inner is None:
    tx = step_lib.make_optimizer(config, lr)
  else:
    tx = optimizer_lib.DistillOptimizer(
      combiner or step_lib.gradient_combiner(config),
      inner or optax.sgd(lr),
      config.grad_accum_steps,
    )
  graphdef, state = step_lib.init_train_state(
    config, student, tx, jax.random.key(0), teacher_configs=[TEACHER]
  )
  step = step_lib.make_train_step(
    config,
    student_graphdef=graphdef,
    student_config=STUDENT,
    teacher_graphdefs=[nnx.split(teacher)[0]],
    teacher_configs=[TEACHER],
    tx=tx,
  )
  teachers = (nnx.split(teacher)[1],)
  return step_lib.jit_train_step(step, donate=False), state, teachers, (graphdef, teacher)


# ---- The oracle: the formulas of docs/drivekd_method.md §2.3 / §3.2 on every-layer full maps. ----


def _all_maps(model, batch):
  out = model(
    jnp.asarray(batch["input_ids"]),
    jnp.asarray(batch["pixel_values"]),
    attention_mask=jnp.asarray(batch["attention_mask"]),
    positions=jnp.asarray(batch["positions"]),
    maps=MapRequest(full_layers=tuple(range(model.config.text.num_layers))),
  )
  return out.logits, out.full_maps


def oracle_cross_entropy(xp, logits, labels):
  """Next-token NLL averaged over every supervised token of the batch."""
  z, target = logits[:, :-1], labels[:, 1:]
  supervised = target != -100
  top = xp.max(z, axis=-1, keepdims=True)
  log_norm = top[..., 0] + xp.log(xp.sum(xp.exp(z - top), axis=-1))
  onehot = np.arange(z.shape[-1])[None, None, :] == np.where(supervised, target, 0)[..., None]
  picked = xp.sum(z * onehot, axis=-1)
  return xp.sum((log_norm - picked) * supervised) / np.sum(supervised)


def oracle_text_to_image(xp, student_map, teacher_map, is_image):
  """Per sample Σ M (Ā_S − Ā_T)² / max(1, Σ M), M[b,i,j] = (1 − img[b,i]) · img[b,j]."""
  img = is_image.astype(np.float64)
  mask = (1.0 - img)[:, :, None] * img[:, None, :]
  return xp.sum(mask * (student_map - teacher_map) ** 2, axis=(1, 2)) / np.maximum(
    1.0, mask.sum(axis=(1, 2))
  )


def oracle_grouped_full(xp, student_maps, teacher_maps, windows):
  """Per sample (1/k) Σ_i mean_{q,k'} (Ā_S^{s_i} − mean_{t∈G(i)} Ā_T^t)²."""
  per_window = []
  for s, group in windows:
    target = sum(teacher_maps[t] for t in group) / len(group)
    per_window.append(xp.mean((student_maps[s] - target) ** 2, axis=(1, 2)))
  return sum(per_window) / len(per_window)


def oracle_per_sample(xp, student_maps, teacher_maps, is_image):
  """{capability: per-sample loss `[B]`} on the hand-resolved layers."""
  pair_loss = lambda pair: oracle_text_to_image(
    xp, student_maps[pair[0]], sum(teacher_maps[t] for t in pair[1]) / len(pair[1]), is_image
  )
  return {
    "perception": pair_loss(PERCEPTION_PAIR),
    "reasoning": oracle_grouped_full(xp, student_maps, teacher_maps, REASONING_WINDOWS),
    "planning": pair_loss(PLANNING_PAIR),
  }


def mixed_rows(per_sample, capability, mixing):
  """The loss vector's capability entries: L_k = (1/B) Σ_b mix[type_b, k] · l_k[b]."""
  return [
    sum(mixing[capability[b], k] * per_sample[name][b] for b in range(BATCH)) / BATCH
    for k, name in enumerate(NAMES[1:])
  ]


class Oracle:
  """Teacher maps once; per-sample losses and their gradients at given student parameters."""

  def __init__(self, models, frozen, batch):
    graphdef, teacher = models
    self.graphdef, self.frozen, self.batch = graphdef, frozen, batch
    self.is_image = batch["input_ids"] == IMAGE_ID
    _, maps = _all_maps(teacher, batch)
    self.teacher_maps = {k: np.asarray(v, np.float64) for k, v in maps.items()}

  def student_maps(self, student_params):
    model = nnx.merge(self.graphdef, student_params, self.frozen)
    return _all_maps(model, self.batch)

  def values(self, student_params):
    """NumPy float64: {"sup": batch CE, "sup_per_sample": `[B]`, capability: `[B]`}."""
    logits, maps = self.student_maps(student_params)
    maps = {k: np.asarray(v, np.float64) for k, v in maps.items()}
    return self._losses(np, np.asarray(logits, np.float64), maps, self.teacher_maps)

  def _losses(self, xp, logits, maps, teacher_maps):
    labels = self.batch["labels"]
    out = oracle_per_sample(xp, maps, teacher_maps, self.is_image)
    out["sup"] = oracle_cross_entropy(xp, logits, labels)
    out["sup_per_sample"] = xp.stack(
      [oracle_cross_entropy(xp, logits[b : b + 1], labels[b : b + 1]) for b in range(BATCH)]
    )
    return out

  def gradients(self, student_params):
    """The same keys, each loss entry's gradient (a list over samples for `[B]` entries), by
    `jax.grad` of the oracle losses through the model."""
    teacher = {k: jnp.asarray(v, jnp.float32) for k, v in self.teacher_maps.items()}

    def losses(p):
      logits, maps = self.student_maps(p)
      return self._losses(jnp, logits, maps, teacher)

    jac = jax.device_get(jax.jit(jax.jacrev(losses))(student_params))
    out = {}
    for name, tree in jac.items():
      tree = jax.tree.map(lambda g: np.asarray(g, np.float64), tree, is_leaf=lambda x: x is None)
      if name == "sup":
        out[name] = tree
      else:
        out[name] = [jax.tree.map(lambda g, b=b: g[b], tree) for b in range(BATCH)]
    return out


def expected_rows(grads, capability, mixing, weights):
  """Row i of the step's stack: w_i · d(L_i); L_k mixed by hand over the batch."""
  rows = [jax.tree.map(lambda g: weights[0] * g, grads["sup"])]
  for k, name in enumerate(NAMES[1:]):
    coeff = [weights[1 + k] * mixing[capability[b], k] / BATCH for b in range(BATCH)]
    rows.append(jax.tree.map(lambda *g, c=coeff: sum(a * x for a, x in zip(c, g)), *grads[name]))
  return rows


def _global_norm(tree):
  return float(np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree))))


def _leaves_by_path(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), v) for path, v in flat]


def reaches(path, deepest) -> bool:
  """Whether a language-model parameter feeds the attention map of block `deepest` (None: the
  logits, i.e. every parameter). The map of block d reads blocks < d whole, and of block d only
  the input norm and the query/key projections."""
  if deepest is None:
    return True
  if "layers" not in path:
    return "embed_tokens" in path  # the final norm and the LM head only feed the logits
  layer = path[path.index("layers") + 1]
  if layer < deepest:
    return True
  return layer == deepest and any(n in path for n in ("input_layernorm", "q_proj", "k_proj"))


@pytest.fixture(scope="module")
def recorded():
  """The official-mixing and asymmetric-mixing steps' recorded rows and metrics, and the oracle
  at the initial parameters (shared by the tests below)."""
  batch = make_batch()
  out = {}
  for label, mixing in (("official", None), ("asymmetric", ASYMMETRIC_MIXING)):
    config = distill_config(mixing)
    step, state, teachers, models = build(config, combiner=recording_combiner(4))
    new_state, metrics = step(state, batch, jax.random.key(0), teachers)
    out[label] = (new_state.opt_state.combiner["student"], jax.device_get(metrics))
  oracle = Oracle(models, state.frozen, batch)
  params = state.params["student"]
  return out, batch, oracle.values(params), oracle.gradients(params)


def _assert_tree_close(got, want, what):
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(want))
  for (path, g), (_, w) in zip(_leaves_by_path(got), _leaves_by_path(want)):
    np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-5 * scale, err_msg=f"{what} {path}")


@pytest.mark.slow
@pytest.mark.parametrize("label", ["official", "asymmetric"])
def test_step_rows_equal_the_oracle_gradients(recorded, label):
  runs, batch, _, grads = recorded
  rows, _ = runs[label]
  mixing = OFFICIAL_MIXING if label == "official" else ASYMMETRIC_MIXING
  want = expected_rows(grads, batch["capability"], mixing, LOSS_WEIGHTS)
  for i, name in enumerate(NAMES):
    got = jax.tree.map(lambda r, i=i: np.asarray(r[i], np.float64), rows)
    assert _global_norm(want[i]) > 0, name
    _assert_tree_close(got, want[i], f"{label} row {name}")


@pytest.mark.slow
def test_each_row_is_nonzero_exactly_where_its_layers_reach(recorded):
  runs, *_ = recorded
  rows, _ = runs["official"]
  for i, name in enumerate(NAMES):
    decoder = jax.tree.map(lambda r, i=i: np.asarray(r[i]), rows["language_model"])
    for path, leaf in _leaves_by_path(decoder):
      assert bool(np.any(leaf != 0)) == reaches(path, DEEPEST[name]), (name, path)
    vision = jax.tree.map(lambda r, i=i: np.asarray(r[i]), rows["vision_model"])
    assert _global_norm(vision) > 0, name  # every signal reads the image embeddings


@pytest.mark.slow
@pytest.mark.parametrize("label", ["official", "asymmetric"])
def test_step_losses_equal_the_formulas(recorded, label):
  """Raw per-capability losses, CE, and the weighted mixed total summed by hand."""
  runs, batch, per_sample, _ = recorded
  ce = per_sample["sup"]
  _, metrics = runs[label]
  mixing = OFFICIAL_MIXING if label == "official" else ASYMMETRIC_MIXING
  np.testing.assert_allclose(metrics["loss/sup"], ce, rtol=1e-5)
  for name in NAMES[1:]:
    assert np.all(per_sample[name] > 0)
    np.testing.assert_allclose(metrics[f"loss/{name}"], per_sample[name].mean(), rtol=1e-4)
  vector = [ce] + mixed_rows(per_sample, batch["capability"], mixing)
  np.testing.assert_allclose(metrics["loss"], np.dot(LOSS_WEIGHTS, vector), rtol=1e-5)


@pytest.mark.slow
def test_a_perception_step_moves_the_first_layer_map_toward_the_teacher(recorded):
  """CE weighted 0 and perception the only capability, through AGP and AdamW: the first-layer
  text→vision distance drops and no block above the first moves."""
  batch = make_batch()
  config = distill_config(weights=(0.0, 1.0, 1.0, 1.0), capabilities=("perception",))
  step, state, teachers, models = build(config, lr=1e-4)
  oracle = Oracle(models, state.frozen, batch)
  before = oracle.values(state.params["student"])
  new_state, metrics = step(state, batch, jax.random.key(0), teachers)
  after = oracle.values(new_state.params["student"])
  assert float(metrics["applied_microsteps"]) == 1
  assert after["perception"].mean() < 0.9 * before["perception"].mean(), (before, after)
  old = _leaves_by_path(state.params["student"]["language_model"])
  new = _leaves_by_path(new_state.params["student"]["language_model"])
  for (path, a), (_, b) in zip(old, new):
    moved = not np.array_equal(np.asarray(a), np.asarray(b))
    assert moved == reaches(path, DEEPEST["perception"]), path


# Distinct static weights (w · n is then not n, so an input not divided by the weights moves the
# trajectory) under the ~88 where softplus⁻¹ (log expm1) overflows in fp32, and a reweighting step
# large enough that every window moves the weights by several percent: a wrong input shifts them
# by 0.3% or more, a tolerance of 2e-4 does not hide it.
REWEIGHT_STATIC = np.array([1.0, 3.0, 0.5, 20.0])


@pytest.mark.slow
def test_dynamic_weights_in_the_step_follow_the_torch_reference(recorded):
  """One sample per micro-step, windows of two micro-steps spanning calls; the parameters are
  held still (a zero inner update) so the oracle's per-sample losses and gradient norms at the
  initial parameters are the reference's input: raw (unweighted, unmixed) losses, and norms of
  the unweighted, unmixed gradients scaled by 1/accumulation."""
  _, batch, values, grads = recorded
  accum = 2
  config = distill_config(
    weights=REWEIGHT_STATIC,
    microbatch_size=1,
    grad_accum_steps=accum,
    dynamic_weights=True,
    reweight_lr=0.5,
  )
  step, state, teachers, _ = build(config, inner=optax.set_to_zero())
  per_sample_losses = np.stack([values[k] for k in ("sup_per_sample",) + NAMES[1:]], axis=1)
  per_sample_norms = np.array(
    [[_global_norm(grads[k][b]) for k in ("sup_per_sample",) + NAMES[1:]] for b in range(BATCH)]
  )
  reference = TorchReweight(REWEIGHT_STATIC.tolist(), lr=0.5)
  order = [b for _ in range(3) for b in range(BATCH)]  # micro-steps of three calls
  window_after_call = []
  for call in range(3):
    state, metrics = step(state, batch, jax.random.key(call), teachers)
    # The last micro-step of the call ran on the weights after every window closed before it.
    done = (BATCH * (call + 1) - 1) // accum
    while len(window_after_call) < done:
      members = order[accum * len(window_after_call) : accum * (len(window_after_call) + 1)]
      reference.update(
        per_sample_losses[members].mean(0),
        per_sample_norms[members].mean(0) / accum,
        [0, 1, 2, 3],
      )
      window_after_call.append([float(w.detach()) for w in reference.weights()])
    got = np.array([float(metrics[f"weight/{name}"]) for name in NAMES])
    np.testing.assert_allclose(got, window_after_call[-1], rtol=2e-4, err_msg=f"call {call}")
  assert not np.allclose(got, REWEIGHT_STATIC, rtol=1e-3)  # the weights did move
