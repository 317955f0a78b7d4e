"""Asymmetric Gradient Projection (AGP) as an optax gradient transformation.

Input updates: a pytree whose every leaf has a leading axis of size 1+K — index 0 is the
hard-label (anchor) gradient, 1..K the weighted capability gradients (perception, reasoning,
planning). Output: one update pytree without that axis, ready for
`optax.chain(agp, ..., optax.adamw(...))`.

Official algorithm (`docs/drivekd_method.md` §3.4), with proj(f, a) = f − (f·a /
max(a·a, 1e-20)) a applied only when f·a < 0:
  Stage 1: c_k = g_0 + proj(g_k, g_0) for each active capability k (g_0 never changes).
  Stage 2: in a shuffled order, for i in perm, for j in perm, i ≠ j:
           c̃_i ← proj(c̃_i, c_j)   (against the ORIGINAL merged c_j).
  Update: Σ_k c̃_k  (so g_0 enters once per active capability); g_0 alone when K = 0 or no
  capability is active.

Dot products are global over all leaves. They are computed as a (1+K)×(1+K) Gram matrix,
accumulated leaf by leaf in fp32; the projections run as algebra on coefficient vectors over
the original gradients; the final coefficients are applied once per leaf (`einsum('k,k...')`),
so nothing is ravelled and every leaf keeps its sharding.

The "None gradient" rule of the official PyTorch code: a parameter that a loss never reaches has
`grad is None` there, and `proj` leaves such entries None (no correction), while the dot products
simply skip them. In JAX such a leaf is all zeros. We reproduce the rule exactly: each leaf is
put in a class by which of the 1+K gradients are non-zero on it (2^(1+K) classes), one Gram
matrix is kept per class, and a projection of f changes f only on the classes f reaches (f's
reach is the union of the reaches of the gradients it is built from). E.g. the perception loss
(first layer only) applies no stage-1 correction of the anchor on any layer above the first.

Per-sample AGP then accumulation (the official code: microbatch 1, grads scaled by 1/k and
summed, AdamW every k samples) is `optax.chain(agp, optax.MultiSteps(adamw, k))`: MultiSteps
averages the k per-sample AGP outputs, and AGP is positively homogeneous (AGP(g/k) = AGP(g)/k).
The Drive-KD train step runs that chain as `train.optimizer.DistillOptimizer`, which computes
AdamW once per window instead of on every micro-step.

Modes:
  "agp"     the official algorithm above.
  "sum"     no projection: Σ_{m=0..K} g_m (the official `--no-agp`; g_0 counted once).
  "pcgrad"  symmetric PCGrad over all 1+K gradients (anchor included), shuffled order, each
            projected against the original others; summed.
  "stage1"  ablation: stage 1 only; Σ_k c_k.
  "stage2"  ablation: no stage 1 (c_k = g_0 + g_k), then stage 2; Σ_k c̃_k.
(The paper's G1/G2 are undefined; these are our names.)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

MODES = ("agp", "sum", "pcgrad", "stage1", "stage2")
_EPS_DENOM = 1e-20
# fp32 products at full precision everywhere (GPUs default to TF32 for fp32 matmuls): conflicts
# are signs of sums that may nearly cancel.
_EXACT = jax.lax.Precision.HIGHEST


class AGPState(NamedTuple):
  """State of `asymmetric_gradient_projection`.

  Attributes:
    key: PRNG key; split on every update to draw the shuffled order.
    cosine: `[1+K, 1+K]` pairwise cosines of the last input gradients (diagnostics).
    sq_norms: fp32 `[1+K]`, squared global norms of the last input gradients (the Gram
      diagonal; non-finite when an input was).
    stage1_conflicts: int32, projections applied in stage 1 at the last update.
    stage2_conflicts: int32, projections applied in stage 2 (or PCGrad) at the last update.
    order: int32 `[K]` (`[1+K]` for pcgrad) order used at the last update.
  """

  key: jax.Array
  cosine: jax.Array
  sq_norms: jax.Array
  stage1_conflicts: jax.Array
  stage2_conflicts: jax.Array
  order: jax.Array


def _class_bits(n: int) -> np.ndarray:
  """bits[s, m] = whether gradient m is non-zero on leaves of class s; `[2^n, n]` bool."""
  s = np.arange(2**n)[:, None]
  return ((s >> np.arange(n)[None, :]) & 1).astype(bool)


def _reach(bits: np.ndarray, support: Sequence[int]) -> np.ndarray:
  """Classes on which a combination of the gradients in `support` can be non-zero; `[S]`."""
  return np.any(bits[:, list(support)], axis=1)


def leafwise_class_gram(stacked_updates) -> tuple[jax.Array, list[jax.Array]]:
  """Per-class Gram matrices `[2^(1+K), 1+K, 1+K]` (fp32) and each leaf's class index.

  A leaf's class encodes which of its 1+K slices are non-zero (bit m set = gradient m reaches
  it). The sum over classes is the ordinary global Gram matrix.
  """
  leaves = jax.tree.leaves(stacked_updates)
  if not leaves:
    raise ValueError("AGP got an empty update pytree")
  n = leaves[0].shape[0]
  pairs = [(i, j) for i in range(n) for j in range(i, n)]
  pair_to_gram = np.zeros((len(pairs), n, n), np.float32)
  for p, (i, j) in enumerate(pairs):
    pair_to_gram[p, i, j] = pair_to_gram[p, j, i] = 1.0
  pair_sums, classes = [], []
  for leaf in leaves:
    if leaf.ndim == 0 or leaf.shape[0] != n:
      raise ValueError(f"every AGP update leaf needs a leading axis of {n}, got {leaf.shape}")
    # Dot products of the row slices rather than one contraction over the stacked leaf: a slice
    # of a stack is its operand, so a caller that stacks its rows only for this call never
    # materialises the stack.
    rows = [leaf[m].astype(jnp.float32).reshape(-1) for m in range(n)]
    pair_sums.append(jnp.stack([jnp.dot(rows[i], rows[j], precision=_EXACT) for i, j in pairs]))
    # A sum of magnitudes is zero exactly when every entry is (it cannot underflow, unlike a
    # sum of squares); a row with a NaN reads as unreached, and its micro-step is skipped.
    reached = jnp.stack([jnp.sum(jnp.abs(row)) > 0 for row in rows])
    classes.append(jnp.sum(reached.astype(jnp.int32) * (2 ** np.arange(n))))
  leaf_class = jax.nn.one_hot(jnp.stack(classes), 2**n, dtype=jnp.float32)
  gram = jnp.einsum(
    "ls,lp,pab->sab", leaf_class, jnp.stack(pair_sums), pair_to_gram, precision=_EXACT
  )
  return gram, classes


class _Coefficients:
  """Coefficient algebra: a vector v = Σ_m C[s, m] g_m on leaves of class s; C is `[S, n]`."""

  def __init__(self, gram, bits):
    self.gram = gram
    self.bits = bits

  def base(self, m):
    n = self.gram.shape[-1]
    return jnp.broadcast_to(jax.nn.one_hot(m, n, dtype=jnp.float32), (self.gram.shape[0], n))

  def dot(self, u, v):
    return jnp.einsum("sa,sab,sb->", u, self.gram, v)

  def project(self, f, f_reach, a, enabled=True):
    """proj(f, a) when `enabled` and f·a < 0, changing f only on the classes f reaches."""
    d = self.dot(f, a)
    conflict = (d < 0) & enabled
    alpha = jnp.where(conflict, d / jnp.maximum(self.dot(a, a), _EPS_DENOM), 0.0)
    return f - alpha * f_reach.astype(jnp.float32)[:, None] * a, conflict.astype(jnp.int32)


def _pairwise_projection(algebra, vecs, reaches, originals, active, order):
  """c̃_i ← proj(c̃_i, original_j) for i in order, j in order, i ≠ j (both active)."""
  count = len(vecs)
  tilde = jnp.stack(vecs)
  orig = jnp.stack(originals)
  reach = jnp.asarray(np.stack(reaches))
  conflicts = jnp.zeros((), jnp.int32)
  for p, q in itertools.product(range(count), range(count)):
    if p == q:
      continue
    i, j = order[p], order[q]
    new, hit = algebra.project(tilde[i], reach[i], orig[j], active[i] & active[j])
    tilde = tilde.at[i].set(new)
    conflicts = conflicts + hit
  return tilde, conflicts


def _combine_coefficients(mode, gram, bits, active, order):
  """Final per-class coefficients `[S, 1+K]` and conflict counts for one update."""
  n = gram.shape[-1]
  k = n - 1
  algebra = _Coefficients(gram, bits)
  anchor = algebra.base(0)
  zero = jnp.zeros((), jnp.int32)
  if mode == "sum" or k == 0:
    total = sum(algebra.base(m) for m in range(n)) if mode == "sum" else anchor
    return total, zero, zero
  if mode == "pcgrad":
    vecs = [algebra.base(m) for m in range(n)]
    reaches = [_reach(bits, [m]) for m in range(n)]
    full_active = jnp.concatenate([jnp.ones((1,), bool), active])
    tilde, hits = _pairwise_projection(algebra, vecs, reaches, vecs, full_active, order)
    return jnp.einsum("m,msa->sa", full_active.astype(jnp.float32), tilde), zero, hits

  merged, stage1 = [], zero
  for c in range(k):
    follower = algebra.base(c + 1)
    if mode == "stage2":
      merged.append(anchor + follower)
      continue
    projected, hit = algebra.project(follower, _reach(bits, [c + 1]), anchor, active[c])
    merged.append(anchor + projected)
    stage1 = stage1 + hit
  if mode == "stage1":
    tilde, stage2 = jnp.stack(merged), zero
  else:
    reaches = [_reach(bits, [0, c + 1]) for c in range(k)]
    tilde, stage2 = _pairwise_projection(algebra, merged, reaches, merged, active, order)
  total = jnp.einsum("c,csa->sa", active.astype(jnp.float32), tilde)
  total = jnp.where(jnp.any(active), total, anchor)
  return total, stage1, stage2


def asymmetric_gradient_projection(
  *,
  mode: str = "agp",
  order: Sequence[int] | None = None,
  seed: int = 0,
  num_capabilities: int = 3,
) -> optax.GradientTransformationExtraArgs:
  """AGP over stacked `[1+K, ...]` updates (see the module docstring).

  Args:
    mode: "agp" (official), "sum", "pcgrad", "stage1" or "stage2".
    order: fixed order instead of a shuffled one: a permutation of 0..K−1 (capability i is leading
      index i+1) for agp/stage2, of 0..K for pcgrad. None draws a new permutation every update.
    seed: seed of the PRNG key carried in the state.
    num_capabilities: K (fixes the shapes of the diagnostics in the state).

  The update accepts optional extra arguments (e.g. through `optax.chain`):
    capability_active: bool `[K]`; capabilities switched off for this sample (official: mixing
      weight 0 or static weight 0) take no part in either stage and are not summed. By default a
      capability is active iff its gradient is not identically zero.
    agp_order: int `[K]` (`[1+K]` for pcgrad), an order for this update only (traced, so one
      compiled update serves every order); the state key still advances.

  Returns:
    An `optax.GradientTransformationExtraArgs` with `AGPState`.
  """
  if mode not in MODES:
    raise ValueError(f"unknown AGP mode {mode!r}; expected one of {MODES}")
  k = int(num_capabilities)
  n_order = k + 1 if mode == "pcgrad" else k
  if order is not None:
    order = tuple(int(i) for i in order)
    if sorted(order) != list(range(n_order)):
      raise ValueError(f"order {order} is not a permutation of 0..{n_order - 1} (mode {mode})")

  def init_fn(params):
    del params
    return AGPState(
      key=jax.random.key(seed),
      cosine=jnp.zeros((k + 1, k + 1), jnp.float32),
      sq_norms=jnp.zeros((k + 1,), jnp.float32),
      stage1_conflicts=jnp.zeros((), jnp.int32),
      stage2_conflicts=jnp.zeros((), jnp.int32),
      order=jnp.arange(n_order, dtype=jnp.int32),
    )

  def update_fn(
    updates, state, params=None, *, capability_active=None, agp_order=None, **extra_args
  ):
    del params, extra_args
    gram, classes = leafwise_class_gram(updates)
    n = gram.shape[-1]
    if n != k + 1:
      raise ValueError(f"AGP was built for K={k} capabilities but got {n - 1} (leading axis {n})")
    total_gram = jnp.sum(gram, axis=0)
    if capability_active is None:
      active = jnp.diagonal(total_gram)[1:] > 0
    else:
      active = jnp.asarray(capability_active, bool).reshape((k,))
    key, sub = jax.random.split(state.key)
    if agp_order is not None:
      perm = jnp.asarray(agp_order, jnp.int32).reshape((n_order,))
    elif order is None:
      perm = jax.random.permutation(sub, n_order).astype(jnp.int32)
    else:
      perm = jnp.asarray(order, jnp.int32)
    coeffs, stage1, stage2 = _combine_coefficients(mode, gram, _class_bits(n), active, perm)

    def apply(leaf, cls):
      w = coeffs[cls]
      # An unrolled weighted sum fuses into one pass over the slices (a contraction does not).
      out = sum(w[m] * leaf[m].astype(jnp.float32) for m in range(leaf.shape[0]))
      return out.astype(leaf.dtype)

    leaves, treedef = jax.tree.flatten(updates)
    new_updates = jax.tree.unflatten(treedef, [apply(x, c) for x, c in zip(leaves, classes)])
    sq_norms = jnp.diagonal(total_gram)
    diag = jnp.sqrt(jnp.maximum(sq_norms, 0.0))
    cosine = total_gram / jnp.maximum(diag[:, None] * diag[None, :], 1e-30)
    new_state = AGPState(key, cosine, sq_norms, stage1, stage2, perm)
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def agp_diagnostics(
  state: AGPState, labels: Sequence[str] | None = None, prefix: str = "agp/"
) -> dict[str, jax.Array]:
  """Scalars for logging: pairwise cosines of the last input gradients and conflict counts.

  `labels` names the 1+K gradients (default: sup, p, r, pl for K = 3, else sup, c1, c2, ...).
  """
  n = state.cosine.shape[0]
  if labels is None:
    labels = ("sup", "p", "r", "pl") if n == 4 else ("sup",) + tuple(f"c{i}" for i in range(1, n))
  out = {
    f"{prefix}stage1_conflicts": state.stage1_conflicts.astype(jnp.float32),
    f"{prefix}stage2_conflicts": state.stage2_conflicts.astype(jnp.float32),
  }
  for i in range(n):
    for j in range(i + 1, n):
      out[f"{prefix}cos_{labels[i]}_{labels[j]}"] = state.cosine[i, j]
  return out
