"""Drive-KD losses: hard-label CE, attention-map distillation and the ablation signals.

Every distillation loss returns one value per sample, `[B]`; the train step reduces over the
batch (example mask, mixing matrix). Reference formulas: `docs/drivekd_method.md`
§2.3 (the official PyTorch code runs one sample per forward, batch 1).

How padding enters (the faithful formulas are the batch-1, unpadded special case):
  * Token padding (`attention_mask` False) is never a query row or a key column of any attention
    loss, and never a supervised token of CE / KL. For unpadded input every token is real, so the
    counts equal the official ones (text→vision denominator counts every text query, including
    those before the first image; full-map MSE divides by all L·L entries incl. causal zeros).
  * Example padding (`example_mask` False) is handled by `masked_batch_mean` / the train step:
    such rows add nothing and are not counted in the batch mean.

Map inputs: a text→vision loss takes either the full map `[B, L, L]` (then `key_mask` is the
image mask `[B, L]`) or the gathered block `[B, L, N]` that the decoder returns for
`MapRequest.text_to_image_layers` (then `key_mask` is the `[B, N]` validity of the gathered image
key slots). The formula is the same: keys outside `key_mask` never count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

IGNORE_INDEX = -100

# Capability order everywhere: the loss vector is [L_sup, L_p, L_r, L_pl].
CAPABILITIES = ("perception", "reasoning", "planning")
OFFICIAL_MIXING = ((0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8))


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def shifted_label_mask(labels, attention_mask=None):
  """Next-token targets and their mask, HF convention (labels unshifted, -100 ignored).

  Args:
    labels: int `[B, L]`.
    attention_mask: optional bool `[B, L]`; padded positions never count.

  Returns:
    (targets `[B, L-1]` int32 with ignored positions set to 0, mask `[B, L-1]` bool).
  """
  targets = labels[:, 1:]
  mask = targets != IGNORE_INDEX
  if attention_mask is not None:
    mask = mask & attention_mask[:, 1:].astype(bool)
  return jnp.where(mask, targets, 0).astype(jnp.int32), mask


def cross_entropy(logits, labels, attention_mask=None, example_mask=None):
  """Next-token cross-entropy, mean over supervised tokens of the (valid) batch.

  This is HF `ForCausalLMLoss` (shift by one, -100 ignored, token-level mean). With no supervised
  token it returns 0 (HF would return NaN).

  Args:
    logits: `[B, L, V]` (any float dtype; computed in fp32).
    labels: int `[B, L]`, unshifted, -100 where unsupervised.
    attention_mask: optional bool `[B, L]`.
    example_mask: optional bool `[B]`; False rows never count.

  Returns:
    Scalar fp32.
  """
  targets, mask = shifted_label_mask(labels, attention_mask)
  if example_mask is not None:
    mask = mask & example_mask[:, None]
  z = _f32(logits[:, :-1])
  # The target logit by a one-hot contraction rather than a gather: under the vmapped pullback
  # of the train step a gather's transpose is a scatter, which XLA CPU runs ~1.5x slower.
  picked = jnp.sum(z * jax.nn.one_hot(targets, z.shape[-1], dtype=z.dtype), axis=-1)
  nll = jax.nn.logsumexp(z, axis=-1) - picked
  maskf = mask.astype(jnp.float32)
  return jnp.sum(nll * maskf) / jnp.maximum(1.0, jnp.sum(maskf))


def text_query_mask(image_mask, attention_mask=None):
  """Rows of the text→vision block: real text tokens (`[B, L]` bool)."""
  rows = ~image_mask.astype(bool)
  if attention_mask is not None:
    rows = rows & attention_mask.astype(bool)
  return rows


def image_key_valid(image_mask, num_slots: int):
  """Validity `[B, N]` of gathered image key slots (image positions taken in order).

  The decoder gathers the first `num_slots` image positions of each row in order of appearance;
  slot n is real iff the row has more than n image positions.
  """
  count = jnp.sum(image_mask.astype(jnp.int32), axis=-1)
  return jnp.arange(num_slots)[None, :] < count[:, None]


def text_to_image_mse(student_map, teacher_map, query_mask, key_mask):
  """Masked MSE of a text→vision attention block, one value per sample.

  loss[b] = Σ_{i,j} M[b,i,j] (S - T)² / max(1, Σ_{i,j} M[b,i,j]),  M = query_mask ⊗ key_mask.

  Args:
    student_map: `[B, L, K]` head-averaged probabilities (K = L for a full map, or N gathered
      image keys).
    teacher_map: `[B, L, K]`, same layout (treated as a constant).
    query_mask: bool `[B, L]` (real text tokens).
    key_mask: bool `[B, K]` (image keys).

  Returns:
    `[B]` fp32.
  """
  teacher_map = jax.lax.stop_gradient(_f32(teacher_map))
  q = query_mask.astype(jnp.float32)
  k = key_mask.astype(jnp.float32)
  sq = jnp.square(_f32(student_map) - teacher_map)
  num = jnp.einsum("bij,bi,bj->b", sq, q, k)
  den = jnp.sum(q, -1) * jnp.sum(k, -1)
  return num / jnp.maximum(1.0, den)


def text_to_image_cosine(student_map, teacher_map, query_mask, key_mask, eps: float = 1e-8):
  """Cosine variant (ablation): 1 − cos(S⊙M, T⊙M) over the flattened masked block, per sample."""
  teacher_map = jax.lax.stop_gradient(_f32(teacher_map))
  m = query_mask.astype(jnp.float32)[:, :, None] * key_mask.astype(jnp.float32)[:, None, :]
  return _one_minus_cos(_f32(student_map) * m, teacher_map * m, eps)


def _one_minus_cos(a, b, eps):
  dot = jnp.sum(a * b, axis=(-2, -1))
  na = jnp.sqrt(jnp.sum(a * a, axis=(-2, -1)))
  nb = jnp.sqrt(jnp.sum(b * b, axis=(-2, -1)))
  return 1.0 - dot / jnp.maximum(na * nb, eps)


def resolve_layer_range(start: int, end: int, num_layers: int) -> tuple[int, ...]:
  """Inclusive layer range [start..end], negative indices counted from the end (official)."""

  def fix(spec):
    idx = spec + num_layers if spec < 0 else spec
    if not 0 <= idx < num_layers:
      raise ValueError(f"layer index {spec} is out of range for {num_layers} layers")
    return idx

  s, e = fix(int(start)), fix(int(end))
  if s > e:
    raise ValueError(f"empty layer range: start {start} -> {s} > end {end} -> {e}")
  return tuple(range(s, e + 1))


def grouped_layer_windows(
  student_layers: Sequence[int], teacher_layers: Sequence[int]
) -> tuple[tuple[int, tuple[int, ...]], ...]:
  """Grouped matching: student layer i ↔ a window of g consecutive teacher layers.

  g = max(1, m − k + 1); window(i) = T[min(i, m−g) : min(i, m−g) + g].

  Returns:
    ((student_layer, (teacher_layer, ...)), ...) in student order.
  """
  k, m = len(student_layers), len(teacher_layers)
  if k == 0 or m == 0:
    return ()
  g = max(1, m - k + 1)
  out = []
  for i, s in enumerate(student_layers):
    lo = min(i, m - g)
    out.append((int(s), tuple(int(t) for t in teacher_layers[lo : lo + g])))
  return tuple(out)


def grouped_full_map_loss(
  student_maps: Mapping[int, jax.Array],
  teacher_maps: Mapping[int, jax.Array],
  windows: Sequence[tuple[int, Sequence[int]]],
  token_mask=None,
  metric: str = "mse",
  eps: float = 1e-8,
):
  """Reasoning loss: full-map distance with grouped layer matching, per sample.

  MSE (official): loss[b] = (1/k) Σ_i mean_{q,k'} (S_i − mean_{t∈G(i)} T_t)² over the real×real
  entries (all L·L entries, causal zeros included, when unpadded).
  Cosine (ablation): (1/k) Σ_i (1 − cos) over the flattened real×real block.

  Args:
    student_maps: layer -> `[B, L, L]`.
    teacher_maps: layer -> `[B, L, L]` (only the layers named in `windows` are read).
    windows: from `grouped_layer_windows`.
    token_mask: optional bool `[B, L]` (attention_mask); padding rows/columns never count.
    metric: "mse" or "cosine".

  Returns:
    `[B]` fp32.
  """
  if not windows:
    raise ValueError("grouped_full_map_loss needs at least one (student, teacher window) pair")
  first = student_maps[windows[0][0]]
  b, l = first.shape[0], first.shape[1]
  if token_mask is None:
    token_mask = jnp.ones((b, l), bool)
  tm = token_mask.astype(jnp.float32)
  pair = tm[:, :, None] * tm[:, None, :]
  count = jnp.maximum(1.0, jnp.sum(pair, axis=(-2, -1)))
  total = jnp.zeros((b,), jnp.float32)
  for s_layer, t_layers in windows:
    target = sum(_f32(teacher_maps[t]) for t in t_layers) / float(len(t_layers))
    target = jax.lax.stop_gradient(target)
    student = _f32(student_maps[s_layer])
    if metric == "mse":
      total = total + jnp.sum(jnp.square(student - target) * pair, axis=(-2, -1)) / count
    elif metric == "cosine":
      total = total + _one_minus_cos(student * pair, target * pair, eps)
    else:
      raise ValueError(f"unknown map metric {metric!r} (expected 'mse' or 'cosine')")
  return total / float(len(windows))


def logit_kl(student_logits, teacher_logits, labels, attention_mask=None, temperature=1.0):
  """Logit KD (ablation): T² · KL(p_T^teacher ‖ p_T^student) per supervised token, per sample.

  Uses the same shifted supervised positions as `cross_entropy`; per sample the mean over its
  supervised tokens (0 when it has none).

  Returns:
    `[B]` fp32.
  """
  _, mask = shifted_label_mask(labels, attention_mask)
  t = float(temperature)
  s_logp = jax.nn.log_softmax(_f32(student_logits[:, :-1]) / t, axis=-1)
  t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(_f32(teacher_logits[:, :-1])) / t, axis=-1)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1) * (t * t)
  maskf = mask.astype(jnp.float32)
  return jnp.sum(kl * maskf, -1) / jnp.maximum(1.0, jnp.sum(maskf, -1))


def hidden_mse(student_hidden, teacher_hidden, token_mask=None, projection=None):
  """Hidden-state MSE (ablation), per sample: mean over real tokens of mean_d (h_S W − h_T)².

  Args:
    student_hidden: `[B, L, Ds]`.
    teacher_hidden: `[B, L, Dt]`.
    token_mask: optional bool `[B, L]`.
    projection: `[Ds, Dt]` learned map (required when Ds != Dt).

  Returns:
    `[B]` fp32.
  """
  s = _f32(student_hidden)
  t = jax.lax.stop_gradient(_f32(teacher_hidden))
  if projection is not None:
    s = s @ _f32(projection)
  if s.shape[-1] != t.shape[-1]:
    raise ValueError(
      f"hidden widths differ ({s.shape[-1]} vs {t.shape[-1]}); a projection is required"
    )
  per_token = jnp.mean(jnp.square(s - t), axis=-1)
  if token_mask is None:
    token_mask = jnp.ones(per_token.shape, bool)
  m = token_mask.astype(jnp.float32)
  return jnp.sum(per_token * m, -1) / jnp.maximum(1.0, jnp.sum(m, -1))


def mixing_matrix(rows=OFFICIAL_MIXING, other_row=(0.0, 0.0, 0.0)):
  """Capability-aware mixing matrix `[4, 3]`: rows perception/reasoning/planning/other.

  Rows are normalised to sum 1 (negative entries clipped to 0, an all-zero row stays zero), as
  the official trainer does. The "other" row (capability id 3, not in the official data) defaults
  to zero: such samples get CE only.
  """
  table = jnp.asarray(list(rows) + [other_row], jnp.float32)
  if table.shape != (4, 3):
    raise ValueError(f"mixing rows must be 3 rows of 3 (+ other row), got {table.shape}")
  table = jnp.maximum(table, 0.0)
  total = jnp.sum(table, axis=-1, keepdims=True)
  return jnp.where(total > 0, table / jnp.where(total > 0, total, 1.0), 0.0)


def masked_batch_mean(per_sample, weights=None, example_mask=None):
  """Σ_b ex[b]·w[b]·x[b] / max(1, Σ_b ex[b]) — the batch mean over real examples.

  Args:
    per_sample: `[B]`.
    weights: optional `[B]` (e.g. the mixing coefficient of each sample's capability).
    example_mask: optional bool `[B]`.
  """
  x = _f32(per_sample)
  ex = jnp.ones_like(x) if example_mask is None else example_mask.astype(jnp.float32)
  w = ex if weights is None else ex * _f32(weights)
  return jnp.sum(w * x) / jnp.maximum(1.0, jnp.sum(ex))
