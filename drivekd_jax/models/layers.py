"""Decoder building blocks: linear layers, embeddings, RMSNorm, RoPE and attention.

Every parameter carries logical axis names in its `out_sharding` metadata (see
`drivekd_jax.models.config` for the vocabulary). Parameters are created unsharded
(`eager_sharding=False`); the trainer maps the names to mesh axes with its rules table and places
them (`jax.eval_shape` -> `nnx.get_partition_spec` -> `jax.jit(init, out_shardings=...)`).

Attention is one function, `attention`, used by every layer. It returns the head-averaged
probability map only when the caller asks for it, so layers that are not asked for never build one.

Activations name their axes the same way (`constrain`): a caller that owns a mesh (the train
step) installs a placement with `activation_sharding`, and the models pin their hidden states to
it at block boundaries; without one, `constrain` does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

LogicalAxes = tuple[str | None, ...]

# A finite "minus infinity": a query row whose keys are all masked (a padding query with nothing
# before it) then gets a uniform distribution instead of NaNs.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


# (shape, logical axes) -> a sharding for an activation, or None to leave it to the compiler.
Placement = Callable[[tuple[int, ...], LogicalAxes], "jax.sharding.Sharding | None"]
_PLACEMENT: contextvars.ContextVar[Placement | None] = contextvars.ContextVar(
  "activation_placement", default=None
)


@contextlib.contextmanager
def activation_sharding(placement: Placement | None) -> Iterator[None]:
  """Within the block, `constrain` pins activations where `placement` says (while tracing)."""
  token = _PLACEMENT.set(placement)
  try:
    yield
  finally:
    _PLACEMENT.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
  """`x` with a sharding constraint from the installed placement (`activation_sharding`), by its
  logical axes; unchanged when none is installed or the placement gives None."""
  placement = _PLACEMENT.get()
  if placement is None:
    return x
  sharding = placement(tuple(x.shape), axes)
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def param(value: jax.Array, axes: LogicalAxes) -> nnx.Param:
  """Wraps an initial value as a parameter carrying logical axis names."""
  if len(axes) != value.ndim:
    raise ValueError(f"axes {axes} do not match a parameter of shape {value.shape}")
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def dense(x: jax.Array, kernel: jax.Array, out_dtype: jnp.dtype | None = None) -> jax.Array:
  """`x @ kernel`, `[..., in] x [in, out] -> [..., out]` (in `out_dtype` when given).

  The gradients are the usual ones; only how the kernel gradient is computed differs from
  `jnp.dot`'s: it contracts the token axis, the leading axis of both operands, a form XLA:CPU runs
  on a slower matmul path than a plain product, so on CPU the activations are transposed in
  memory first (the gain is measured in `docs/benchmarks.md` §4). The product is named "dense"
  for rematerialisation policies (`REMAT_POLICIES["dots"]` keeps it): being a custom-VJP call,
  it is not a `dot_general` that a dot policy would see.
  """
  return checkpoint_name(_dense(x, kernel, out_dtype), "dense")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense(x: jax.Array, kernel: jax.Array, out_dtype: jnp.dtype | None) -> jax.Array:
  return jnp.dot(x, kernel, preferred_element_type=out_dtype)


def _dense_fwd(x, kernel, out_dtype):
  return _dense(x, kernel, out_dtype), (x, kernel)


def _dense_bwd(out_dtype, residuals, d_y):
  del out_dtype
  x, kernel = residuals
  # Products in the cotangent's precision (an fp32 head cotangent meets bf16 operands in fp32,
  # as JAX's own transpose does), rounded to each operand's dtype afterwards.
  d_x = jnp.dot(d_y, kernel.T)
  x_2d = x.reshape(-1, x.shape[-1])
  d_y_2d = d_y.reshape(-1, d_y.shape[-1])
  d_kernel = jax.lax.platform_dependent(
    x_2d,
    d_y_2d,
    cpu=lambda a, b: jnp.dot(jax.lax.optimization_barrier(a.T), b),
    default=lambda a, b: jnp.dot(a.T, b),
  )
  return d_x.astype(x.dtype), d_kernel.astype(kernel.dtype)


_dense.defvjp(_dense_fwd, _dense_bwd)


class Linear(nnx.Module):
  """`y = x @ kernel (+ bias)` with kernel `[in, out]` stored in `param_dtype`, run in `dtype`."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    axes: tuple[str, str],
    use_bias: bool = False,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    init_std: float = 0.02,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    kernel = init_std * jax.random.normal(rngs.params(), (in_features, out_features), param_dtype)
    self.kernel = param(kernel, axes)
    self.bias = param(jnp.zeros((out_features,), param_dtype), (axes[1],)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """`[..., in]` -> `[..., out]` in `dtype`."""
    y = dense(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


class Embed(nnx.Module):
  """Token embedding table `[V, D]`; `attend` is the tied output head."""

  def __init__(
    self,
    num_embeddings: int,
    features: int,
    *,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
    init_std: float = 0.02,
    rngs: nnx.Rngs,
  ):
    self.dtype = dtype
    table = init_std * jax.random.normal(rngs.params(), (num_embeddings, features), param_dtype)
    self.embedding = param(table, ("vocab", "embed"))

  def __call__(self, ids: jax.Array) -> jax.Array:
    """int `[...]` -> `[..., D]` in `dtype`."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """`[..., D]` -> fp32 logits `[..., V]` against the table."""
    table = self.embedding[...].astype(self.dtype)
    return jnp.einsum(
      "...d,vd->...v", x.astype(self.dtype), table, preferred_element_type=jnp.float32
    )


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale; statistics in fp32 (as Qwen2 / LLaMA)."""

  def __init__(
    self,
    features: int,
    *,
    eps: float = 1e-6,
    dtype: jnp.dtype = jnp.float32,
    param_dtype: jnp.dtype = jnp.float32,
  ):
    self.eps = eps
    self.dtype = dtype
    self.scale = param(jnp.ones((features,), param_dtype), ("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    # The reference casts back to the activation dtype before the scale multiply.
    return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


def rope_tables(
  positions: jax.Array,
  head_dim: int,
  theta: float,
  mrope_section: tuple[int, ...] | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Rotary tables in fp32.

  Args:
    positions: int `[B, T]` token positions, or `[B, 3, T]` multimodal (temporal, height, width)
      positions when `mrope_section` is given (batch first, so batches slice along axis 0).
    head_dim: per-head width (even).
    theta: RoPE base.
    mrope_section: M-RoPE (Qwen2.5-VL): consecutive chunks of the head_dim/2 frequencies; chunk i
      rotates by position axis `i % 3`. Summing to head_dim/2 is required.

  Returns:
    `(cos, sin)`, each fp32 `[B, T, head_dim]` (the half-width angles repeated twice, matching the
    non-interleaved `rotate_half` convention). A `[B, 3, T]` position whose three axes are equal
    gives the plain `[B, T]` tables.
  """
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta**exponents)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  if positions.ndim == 3:
    if mrope_section is None or sum(mrope_section) != head_dim // 2:
      raise ValueError(
        f"positions of shape {positions.shape} need an mrope_section summing to head_dim/2 = "
        f"{head_dim // 2}; got {mrope_section}"
      )
    bounds = np.cumsum((0,) + tuple(mrope_section))
    chunks = [angles[:, i % 3, :, bounds[i] : bounds[i + 1]] for i in range(len(mrope_section))]
    angles = jnp.concatenate(chunks, axis=-1)
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates `x` `[B, T, heads, head_dim]` by the tables `[B, T, head_dim]` (in fp32)."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  allowed: jax.Array,
  *,
  want_map: bool = False,
  query_block: int = 0,
  fused: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
  """Grouped-query softmax attention.

  Args:
    q: queries `[B, T, H, Dh]` (already rotated).
    k: keys `[B, K, S, Dh]` (head-major, the cache layout) with `H % K == 0`, already rotated.
    v: values `[B, K, S, Dh]`.
    allowed: bool `[B, T, S]` (or `[B, 1, S]`, the same for every query), True where query t may
      attend key s.
    want_map: also return the head-averaged probabilities.
    query_block: > 0: queries in blocks of this many, one block at a time, each block's
      probabilities recomputed in the backward pass (`blocked_attention`).
    fused: without a map, `jax.nn.dot_product_attention` (`fused_attention`).

  Returns:
    `(out [B, T, H, Dh] in q's dtype, map fp32 [B, T, S] or None)`. Scores and softmax are fp32;
    the probabilities are cast to v's dtype for the weighted sum, as in the reference eager path.
  """
  if fused and not want_map:
    return fused_attention(q, k, v, allowed), None
  if 0 < query_block < q.shape[1]:
    return blocked_attention(q, k, v, allowed, want_map=want_map, query_block=query_block)
  return _softmax_attention(q, k, v, allowed, want_map)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
  """`attention` without a map through `jax.nn.dot_product_attention` (same arguments, `out`
  `[B, T, H, Dh]`): the library picks a fused kernel (cuDNN, Pallas) where one is present."""
  mask = allowed[:, None, :, :]  # [B, 1, T, S], shared by the heads
  to_token_major = lambda x: x.transpose(0, 2, 1, 3)  # [B, K, S, Dh] -> [B, S, K, Dh]
  k, v = to_token_major(k).astype(q.dtype), to_token_major(v).astype(q.dtype)
  return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(q.dtype)


def blocked_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  allowed: jax.Array,
  *,
  want_map: bool,
  query_block: int,
) -> tuple[jax.Array, jax.Array | None]:
  """`attention` over blocks of `query_block` queries in a loop (same arguments and results).

  Each block holds its own `[B, H, block, S]` probabilities only; under `jax.checkpoint` the
  backward pass recomputes them block by block from the block's queries and the keys, so
  neither pass keeps every head's whole `[T, S]` map. Queries are padded to whole blocks with
  rows that attend nothing, dropped afterwards. Blocks are strided (block b holds queries b,
  b + blocks, b + 2 blocks, ...): each query's result does not depend on its company, and a
  query axis split over devices in contiguous ranges then splits every block the same way
  without moving data, so under sequence sharding each device runs its own share of each block.
  """
  batch, length, num_heads, head_dim = q.shape
  blocks = -(-length // query_block)
  pad = blocks * query_block - length
  # [B, blocks * block, ...] -> [blocks, B, block, ...], query j * blocks + b at [b, :, j].
  to_blocks = lambda x: jnp.moveaxis(x.reshape(batch, query_block, blocks, *x.shape[2:]), 2, 0)
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  per_query = allowed.shape[1] != 1
  if per_query:
    allowed = to_blocks(jnp.pad(allowed, ((0, 0), (0, pad), (0, 0))))
    allowed = constrain(allowed, (None, "batch", "activation_length", None))
  q = constrain(to_blocks(q), (None, "batch", "activation_length", "q_heads", None))

  @jax.checkpoint
  def one_block(xs):
    q_block, allowed_block = xs if per_query else (xs, allowed)
    return _softmax_attention(q_block, k, v, allowed_block, want_map)

  out, head_mean = jax.lax.map(one_block, (q, allowed) if per_query else q)
  unblock = lambda x: jnp.moveaxis(x, 0, 2).reshape(batch, blocks * query_block, *x.shape[3:])[
    :, :length
  ]
  return unblock(out), None if head_mean is None else unblock(head_mean)


def _softmax_attention(q, k, v, allowed, want_map):
  """The whole of `attention` in one piece (every head's `[T, S]` probabilities at once)."""
  batch, length, num_heads, head_dim = q.shape
  num_kv_heads = k.shape[1]
  groups = num_heads // num_kv_heads
  q = q.reshape(batch, length, num_kv_heads, groups, head_dim)
  scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (head_dim**-0.5)
  scores = jnp.where(allowed[:, None, None, :, :], scores, _MASK_VALUE)
  probs = softmax(scores)
  out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v.dtype), v)
  out = out.reshape(batch, length, num_heads, head_dim).astype(q.dtype)
  head_mean = None
  if want_map:
    # The mean over heads as a product with a 1/H vector: XLA:CPU lowers the plain reduction
    # over the two head axes several times slower, forward and backward.
    flat = probs.reshape(batch, num_heads, length * probs.shape[-1])
    weights = jnp.full((num_heads,), 1.0 / num_heads, jnp.float32)
    head_mean = jnp.einsum("h,bhx->bx", weights, flat).reshape(batch, length, -1)
  return out, head_mean


@jax.custom_vjp
def softmax(scores: jax.Array) -> jax.Array:
  """Softmax over the last axis (fp32 in, fp32 out), as `jax.nn.softmax`.

  The backward pass `y * (dy - <y, dy>)` takes the row dot product as a contraction: XLA:CPU runs
  the sum of a fused product over the last axis (what autodiff of `jax.nn.softmax` emits)
  several times slower, and attention maps are a large share of a distillation step.
  """
  shifted = scores - jnp.max(scores, axis=-1, keepdims=True)
  exps = jnp.exp(shifted)
  return exps / jnp.sum(exps, axis=-1, keepdims=True)


def _softmax_fwd(scores):
  probs = softmax(scores)
  return probs, probs


def _softmax_bwd(probs, d_probs):
  row_dot = jnp.einsum("...s,...s->...", probs, d_probs)
  return (probs * (d_probs - row_dot[..., None]),)


softmax.defvjp(_softmax_fwd, _softmax_bwd)


# What a rematerialised block keeps from its forward pass for its backward (`jax.checkpoint`
# policies; "none": no rematerialisation, everything is kept). "dots": the products of
# activations with weights (`dense`, and any other product without batch dimensions), so
# attention probabilities, norms and activations are recomputed; "full": nothing but the block's
# input.
REMAT_POLICIES = {
  "none": None,
  "dots": jax.checkpoint_policies.save_from_both_policies(
    jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    jax.checkpoint_policies.save_only_these_names("dense"),
  ),
  "full": jax.checkpoint_policies.nothing_saveable,
}


def run_blocks(blocks, x, apply, *, scan: bool = False, remat: str = "none"):
  """Runs identical blocks one after another: `x, y_i = apply(blocks[i], x)`.

  Args:
    blocks: modules with one structure (graph) each, e.g. a run of decoder layers.
    x: the first block's input (a pytree).
    apply: `(block, x) -> (x, y)`; `y` a pytree (or None) of per-block outputs.
    scan: one `lax.scan` over the blocks' parameters stacked on a new leading axis, so the
      program holds one block whatever their number (compile time does not grow with depth; the
      stacked copy of the parameters costs their size once more). False: a Python loop.
    remat: a `REMAT_POLICIES` name applied to each block.

  Returns:
    `(x, ys)`: the last output and the list of every block's `y`, in order.
  """
  blocks = list(blocks)
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: expected one of {tuple(REMAT_POLICIES)}")
  graphdef = nnx.graphdef(blocks[0])
  if any(nnx.graphdef(b) != graphdef for b in blocks[1:]):
    raise ValueError("run_blocks needs blocks of one structure")

  def body(x, state):
    return apply(nnx.merge(graphdef, state), x)

  if remat != "none":
    body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
  if scan and len(blocks) > 1:
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(b) for b in blocks))
    x, ys = jax.lax.scan(body, x, stacked)
    return x, [jax.tree.map(lambda y, i=i: y[i], ys) for i in range(len(blocks))]
  ys = []
  for block in blocks:
    x, y = body(x, nnx.state(block)) if remat != "none" else apply(block, x)
    ys.append(y)
  return x, ys


def gather_key_columns(maps: jax.Array, key_positions: jax.Array) -> jax.Array:
  """Takes key columns: `[B, T, S]` at int `[B, N]` -> `[B, T, N]`."""
  return jnp.take_along_axis(maps, key_positions[:, None, :].astype(jnp.int32), axis=-1)
