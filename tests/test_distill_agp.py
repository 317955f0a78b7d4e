"""AGP against an independent loop-based NumPy implementation of the official algorithm."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from drivekd_jax.distill import agp as agp_lib

# ---------------------------------------------------------------- NumPy reference (official).
# A gradient is a list of per-parameter arrays, None where the loss does not reach the parameter.


def _dot(fa, fb):
  total = 0.0
  for a, b in zip(fa, fb):
    if a is None or b is None:
      continue
    total += float(np.sum(a.astype(np.float64) * b.astype(np.float64)))
  return total


def _proj(follower, anchor):
  d = _dot(follower, anchor)
  if d >= 0.0:
    return follower, 0
  coef = d / max(_dot(anchor, anchor), 1e-20)
  out = []
  for f, a in zip(follower, anchor):
    if f is None:
      out.append(None)
    elif a is None:
      out.append(f)
    else:
      out.append(f - coef * a)
  return out, 1


def _add(*grads):
  out = []
  for parts in zip(*grads):
    acc = None
    for p in parts:
      if p is None:
        continue
      acc = p if acc is None else acc + p
    out.append(acc)
  return out


def reference(grads, mode, perm, active=None):
  """grads[0] anchor, grads[1..K] capabilities; perm: order (capability ids 0..K-1)."""
  k = len(grads) - 1
  active = [True] * k if active is None else active
  caps = [c for c in range(k) if active[c]]
  counts = [0, 0]
  if mode == "sum":
    return _add(*grads)
  if mode == "pcgrad":
    order = [m for m in perm if m == 0 or active[m - 1]]
    tilde = {m: grads[m] for m in order}
    for i in order:
      for j in order:
        if i != j:
          tilde[i], _ = _proj(tilde[i], grads[j])
    return _add(*[tilde[m] for m in order])
  g_sup = grads[0]
  merged = {}
  for c in caps:
    if mode == "stage2":
      merged[c] = _add(g_sup, grads[c + 1])
    else:
      projected, hit = _proj(grads[c + 1], g_sup)
      merged[c] = _add(g_sup, projected)
      counts[0] += hit
  if not merged:
    return g_sup
  if mode == "stage1":
    return _add(*merged.values())
  order = [c for c in perm if c in merged]
  tilde = dict(merged)
  for i in order:
    for j in order:
      if i != j:
        tilde[i], hit = _proj(tilde[i], merged[j])
        counts[1] += hit
  reference.counts = tuple(counts)
  return _add(*[tilde[c] for c in order])


# ---------------------------------------------------------------- helpers

SHAPES = [(3, 4), (5,), (2, 3, 2), (7,)]


def _random_grads(rng, k, *, conflict, zero_leaves=(), scale_caps=1.0):
  """List of 1+K gradients (lists of arrays or None)."""
  anchor = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
  grads = [anchor]
  for c in range(k):
    g = [scale_caps * rng.normal(size=s).astype(np.float32) for s in SHAPES]
    if conflict:
      # Pull each capability against the anchor and against the previous capability.
      g = [x - 2.0 * scale_caps * a for x, a in zip(g, anchor)]
      if c > 0:
        g = [x - 1.5 * p for x, p in zip(g, grads[-1])]
    else:
      g = [np.abs(x) * np.sign(a) for x, a in zip(g, anchor)]
    grads.append(g)
  for m, leaf in zero_leaves:
    grads[m][leaf] = None
  return grads


def _stack(grads):
  leaves = []
  for i, s in enumerate(SHAPES):
    leaves.append(
      np.stack([np.zeros(s, np.float32) if g[i] is None else g[i] for g in grads]).astype(
        np.float32
      )
    )
  return {"a": leaves[0], "b": {"c": leaves[1], "d": leaves[2]}, "e": leaves[3]}


def _unstack_ref(ref):
  z = [np.zeros(s, np.float32) if x is None else x for x, s in zip(ref, SHAPES)]
  return {"a": z[0], "b": {"c": z[1], "d": z[2]}, "e": z[3]}


_COMPILED = {}


def _run(grads, mode, order, k, active=None):
  """One compiled update per (mode, K, active given); the order is a traced argument."""
  key = (mode, k, active is None)
  if key not in _COMPILED:
    tx = agp_lib.asymmetric_gradient_projection(mode=mode, num_capabilities=k)

    def update(u, s, perm, act):
      extra = {} if act is None else {"capability_active": act}
      return tx.update(u, s, agp_order=perm, **extra)

    _COMPILED[key] = (tx.init(None), jax.jit(update))
  state, update = _COMPILED[key]
  n = k + 1 if mode == "pcgrad" else k
  perm = jnp.arange(n) if order is None else jnp.asarray(order)
  act = None if active is None else jnp.asarray(active)
  return update(_stack(grads), state, perm, act)


def _assert_tree_close(out, expected, rtol=2e-5, atol=2e-5):
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol), out, expected)


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("mode", ["agp", "stage1", "stage2"])
def test_agp_matches_reference_every_order(mode, conflict):
  rng = np.random.default_rng(0)
  k = 3
  grads = _random_grads(rng, k, conflict=conflict, scale_caps=4.0 if conflict else 1.0)
  hits = 0
  for perm in itertools.permutations(range(k)):
    out, state = _run(grads, mode, perm, k)
    _assert_tree_close(out, _unstack_ref(reference(grads, mode, perm)))
    hits += int(state.stage2_conflicts)
    if mode != "stage1":
      assert (int(state.stage1_conflicts), int(state.stage2_conflicts)) == reference.counts
    if conflict and mode != "stage2":
      assert int(state.stage1_conflicts) > 0
    if not conflict:
      assert int(state.stage1_conflicts) == 0 and int(state.stage2_conflicts) == 0
  if conflict and mode != "stage1":
    assert hits > 0, "stage 2 was never exercised"


def test_no_conflict_is_plain_merge():
  rng = np.random.default_rng(1)
  grads = _random_grads(rng, 3, conflict=False)
  out, _ = _run(grads, "agp", (0, 1, 2), 3)
  expected = _add(grads[0], grads[0], grads[0], grads[1], grads[2], grads[3])
  _assert_tree_close(out, _unstack_ref(expected))


def test_zero_leaves_follow_the_none_rule():
  rng = np.random.default_rng(2)
  k = 3
  # Perception reaches only leaf 0; reasoning misses leaf 3; the anchor misses leaf 2.
  zero = [(1, 1), (1, 2), (1, 3), (2, 3), (0, 2)]
  grads = _random_grads(rng, k, conflict=True, zero_leaves=zero, scale_caps=3.0)
  for perm in itertools.permutations(range(k)):
    for mode in ("agp", "stage1", "stage2", "pcgrad"):
      p = perm if mode != "pcgrad" else (0, *[c + 1 for c in perm])
      out, _ = _run(grads, mode, p, k)
      _assert_tree_close(out, _unstack_ref(reference(grads, mode, p)))
  # The rule matters: ignoring it (treating zeros as reached) gives a different answer.
  dense = [[np.zeros(s, np.float32) if x is None else x for x, s in zip(g, SHAPES)] for g in grads]
  ref_none = reference(grads, "agp", (0, 1, 2))
  ref_dense = reference(dense, "agp", (0, 1, 2))
  assert not np.allclose(ref_none[1], ref_dense[1])


def test_pcgrad_and_sum_match_reference():
  rng = np.random.default_rng(3)
  k = 3
  grads = _random_grads(rng, k, conflict=True, scale_caps=4.0)
  for perm in itertools.permutations(range(k + 1)):
    out, state = _run(grads, "pcgrad", perm, k)
    _assert_tree_close(out, _unstack_ref(reference(grads, "pcgrad", perm)))
  assert int(state.stage2_conflicts) > 0
  out, _ = _run(grads, "sum", None, k)
  _assert_tree_close(out, _unstack_ref(reference(grads, "sum", None)))


def test_inactive_capabilities_are_left_out():
  rng = np.random.default_rng(4)
  grads = _random_grads(rng, 3, conflict=True, scale_caps=4.0)
  active = [True, False, True]
  for perm in itertools.permutations(range(3)):
    out, _ = _run(grads, "agp", perm, 3, active=active)
    _assert_tree_close(out, _unstack_ref(reference(grads, "agp", perm, active)))
  # Default: a capability whose gradient is identically zero is inactive.
  grads[2] = [None] * len(SHAPES)
  out, _ = _run(grads, "agp", (2, 0, 1), 3)
  _assert_tree_close(out, _unstack_ref(reference(grads, "agp", (2, 0, 1), [True, False, True])))
  out, _ = _run(grads, "agp", (2, 0, 1), 3, active=[False, False, False])
  _assert_tree_close(out, _unstack_ref(grads[0]))


def test_k0_returns_anchor():
  rng = np.random.default_rng(5)
  grads = _random_grads(rng, 0, conflict=False)
  for mode in ("agp", "stage1", "stage2", "pcgrad"):
    out, _ = _run(grads, mode, None, 0)
    _assert_tree_close(out, _unstack_ref(grads[0]))


def test_random_order_comes_from_state_key():
  rng = np.random.default_rng(6)
  grads = _random_grads(rng, 3, conflict=True, scale_caps=4.0)
  tx = agp_lib.asymmetric_gradient_projection(seed=7)
  state = tx.init(None)
  update = jax.jit(tx.update)
  orders = set()
  for _ in range(12):
    out, state = update(_stack(grads), state)
    perm = tuple(int(i) for i in state.order)
    orders.add(perm)
    _assert_tree_close(out, _unstack_ref(reference(grads, "agp", perm)))
  assert len(orders) > 1
  squares = [sum(float(np.sum(np.square(x))) for x in g if x is not None) for g in grads]
  np.testing.assert_allclose(state.sq_norms, squares, rtol=1e-5)
  diag = agp_lib.agp_diagnostics(state)
  assert set(diag) >= {"agp/stage1_conflicts", "agp/cos_sup_p", "agp/cos_r_pl"}
  assert float(diag["agp/cos_sup_p"]) < 0


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="mode"):
    agp_lib.asymmetric_gradient_projection(mode="nope")
  with pytest.raises(ValueError, match="permutation"):
    agp_lib.asymmetric_gradient_projection(order=(0, 0, 1))
  tx = agp_lib.asymmetric_gradient_projection(num_capabilities=3)
  with pytest.raises(ValueError, match="K=3"):
    tx.update({"a": jnp.ones((3, 2))}, tx.init(None))


def test_multisteps_equals_per_sample_agp_then_accumulation():
  """chain(agp, MultiSteps(adamw, k)) == AdamW on Σ_i AGP(g_i / k) (official per-sample AGP)."""
  rng = np.random.default_rng(8)
  k_acc = 4
  order = (1, 0, 2)
  samples = [_random_grads(rng, 3, conflict=True, scale_caps=3.0) for _ in range(k_acc)]
  adamw = optax.adamw(0.1, weight_decay=0.01)
  tx = optax.chain(
    agp_lib.asymmetric_gradient_projection(order=order),
    optax.MultiSteps(adamw, k_acc).gradient_transformation(),
  )
  params = _unstack_ref([rng.normal(size=s).astype(np.float32) for s in SHAPES])
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i, g in enumerate(samples):
    out, state = update(_stack(g), state, params)
    if i < k_acc - 1:
      jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0), out)
  scaled = [[[None if x is None else x / k_acc for x in grad] for grad in g] for g in samples]
  accumulated = _unstack_ref(_add(*[reference(g, "agp", order) for g in scaled]))
  expected, _ = adamw.update(accumulated, adamw.init(params), params)
  _assert_tree_close(out, expected, rtol=1e-4, atol=1e-5)


def test_output_keeps_leaf_shardings_on_8_devices():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  P = jax.sharding.PartitionSpec
  specs = {"w": P(None, "data", "model"), "v": P(None, "model"), "u": P(None, None, "data")}
  shapes = {"w": (4, 8, 6), "v": (4, 10), "u": (4, 3, 16)}
  rng = np.random.default_rng(9)
  updates = {
    n: jax.device_put(
      rng.normal(size=shapes[n]).astype(np.float32), jax.NamedSharding(mesh, specs[n])
    )
    for n in shapes
  }
  tx = agp_lib.asymmetric_gradient_projection()
  state = tx.init(None)
  with jax.set_mesh(mesh):
    out, _ = jax.jit(tx.update)(updates, state)
  for n in shapes:
    expected = jax.NamedSharding(mesh, P(*specs[n][1:]))
    assert out[n].sharding.is_equivalent_to(expected, out[n].ndim), (n, out[n].sharding)
