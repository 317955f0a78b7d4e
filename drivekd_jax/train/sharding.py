"""Device mesh, the logical-axis rules table, and shardings for parameters, states and batches.

Models name their parameter and cache axes logically (see `drivekd_jax.models.config`); one
rules table maps each logical name to zero or more mesh axes of a `("data", "fsdp", "tensor")`
mesh. Parameters are born sharded: `jax.eval_shape` gives the abstract state, the rules give a
`NamedSharding` per leaf, and the initialiser is jitted with those `out_shardings`.

A mesh axis is used at most once per array (later dimensions that would reuse it stay
unsharded), and a dimension whose size the mesh axes do not divide is left unsharded, so tiny
test models and odd head counts work on any mesh.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. Batch-like axes split over data and fsdp; weights keep one large
# dimension on fsdp (ZeRO-3 style) and the head/mlp/vocab dimension on tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
  # activations and batches
  ("batch", ("data", "fsdp")),
  ("length", ()),
  # Hidden states pinned inside the models (`layers.constrain`). With micro-batch 1 the batch
  # axis cannot be split, and the sequence goes on fsdp instead (sequence parallelism): every
  # device then computes its share of the tokens rather than all of them.
  ("activation_length", ("fsdp",)),
  ("activation_embed", ()),
  # The vision tower's tokens (1 + 32 x 32 = 1025 per image in InternVL3): split unevenly.
  ("vit_tokens", ("fsdp",)),
  # decoder
  ("vocab", ("tensor",)),
  ("embed", ("fsdp",)),
  ("mlp", ("tensor",)),
  ("q_heads", ("tensor",)),
  ("kv_heads", ("tensor",)),
  ("head_dim", ()),
  ("norm", ()),
  # vision tower and projector
  ("vit_embed", ("fsdp",)),
  ("vit_mlp", ("tensor",)),
  ("vit_qkv", ("tensor",)),
  ("vit_heads", ("tensor",)),
  ("vit_pos", ()),
  ("patch", ()),
  ("channels", ()),
  ("proj_in", ("fsdp",)),
  # KV caches
  ("cache_layers", ()),
  ("cache_batch", ("data", "fsdp")),
  ("cache_seq", ()),
  ("cache_kv_heads", ("tensor",)),
)

Rules = Mapping[str, tuple[str, ...]]


def rules_from_config(rules: Any = None) -> dict[str, tuple[str, ...]]:
  """Merges config rules over the defaults.

  Args:
    rules: None, a mapping, or a sequence of `(logical_name, mesh_axes)` pairs where mesh_axes
      is None, one axis name or a sequence of names (ConfigDict lists are accepted).

  Returns:
    A dict logical name -> tuple of mesh axis names.
  """
  merged = {name: tuple(axes) for name, axes in DEFAULT_RULES}
  if rules is None:
    return merged
  items = rules.items() if hasattr(rules, "items") else rules
  for item in items:
    name, axes = item
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    axes = tuple(axes)
    for axis in axes:
      if axis not in MESH_AXES:
        raise ValueError(
          f"sharding rule {name!r} -> {axes}: unknown mesh axis {axis!r}; mesh axes are {MESH_AXES}"
        )
    merged[str(name)] = axes
  return merged


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves `{"data": d, "fsdp": f, "tensor": t}` (one entry may be -1) to a mesh shape."""
  get = (
    (lambda k: mesh_config.get(k, 1))
    if mesh_config is not None
    else (lambda k: -1 if k == "data" else 1)
  )
  sizes = [int(get(axis)) for axis in MESH_AXES]
  unknown = [i for i, s in enumerate(sizes) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices")
  if unknown:
    sizes[unknown[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
      f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
      f"but {num_devices} are present"
    )
  return tuple(sizes)


def make_mesh(
  mesh_config: Any = None, devices: Sequence[jax.Device] | None = None
) -> jax.sharding.Mesh:
  """Builds the `("data", "fsdp", "tensor")` mesh (Auto axis types) over all or given devices."""
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def logical_to_spec(
  logical_names: Sequence[str | None] | None,
  shape: Sequence[int],
  mesh: jax.sharding.Mesh,
  rules: Rules,
  uneven: bool = False,
) -> P:
  """Maps logical axis names of one array to a PartitionSpec.

  Args:
    logical_names: one logical name (or None) per dimension; None means fully replicated.
    shape: the array shape, used to drop mesh axes that do not divide a dimension.
    mesh: the device mesh.
    rules: logical name -> mesh axes.
    uneven: split a dimension the mesh axes do not divide (the compiler pads the last shard)
      when it has at least one element per shard; for activations inside a program only, not
      for arrays that cross its boundary.

  Returns:
    A PartitionSpec with one entry per dimension.
  """
  if logical_names is None:
    return P()
  if len(logical_names) != len(shape):
    raise ValueError(f"logical axes {tuple(logical_names)} do not match shape {tuple(shape)}")
  used: set[str] = set()
  spec = []
  for name, size in zip(logical_names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rules:
      raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    axes = []
    for axis in rules[name]:
      if axis in used or mesh.shape[axis] == 1:
        continue
      shards = math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]
      if (size < shards) if uneven else (size % shards):
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return P(*spec)


def activation_placement(mesh: jax.sharding.Mesh, rules: Rules) -> Callable:
  """The placement `models.layers.activation_sharding` takes: activations by the rules table,
  uneven splits allowed (`logical_to_spec`), e.g. a vision tower's 1025 tokens over 4 devices.

  Gives None (no constraint) when the rules shard nothing, so a one-device mesh adds nothing to
  the program.
  """

  def place(shape: tuple[int, ...], logical_names) -> NamedSharding | None:
    spec = logical_to_spec(logical_names, shape, mesh, rules, uneven=True)
    return NamedSharding(mesh, spec) if any(a is not None for a in spec) else None

  return place


def _variable_logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
  metadata = variable.get_metadata()
  for key in ("out_sharding", "sharding", "sharding_names"):
    names = metadata.get(key)
    if names is not None:
      return tuple(names)
  return None


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, rules: Rules) -> Any:
  """NamedShardings for an (abstract) NNX state, read from each Variable's logical axes.

  Variables without logical names are replicated.
  """

  def one(variable):
    if not isinstance(variable, nnx.Variable):
      return NamedSharding(mesh, P())
    value = variable.get_value()
    spec = logical_to_spec(_variable_logical_names(variable), np.shape(value), mesh, rules)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def abstract_module(constructor: Callable[[], nnx.Module]) -> tuple[nnx.GraphDef, nnx.State]:
  """Abstract (shape-only) graphdef and state of a module, without allocating parameters."""
  with nnx.use_eager_sharding(False):
    module = nnx.eval_shape(constructor)
  return nnx.split(module)


def create_sharded(
  constructor: Callable[[], nnx.Module], mesh: jax.sharding.Mesh, rules: Rules
) -> tuple[nnx.Module, Any]:
  """Builds a module whose parameters are born sharded.

  Args:
    constructor: builds the module (random init inside, from its own nnx.Rngs).
    mesh: the device mesh.
    rules: logical name -> mesh axes.

  Returns:
    `(module, shardings)`, shardings being the NNX state of NamedShardings.
  """
  graphdef, abstract = abstract_module(constructor)
  shardings = state_shardings(abstract, mesh, rules)

  def init():
    with nnx.use_eager_sharding(False):
      return nnx.state(constructor())

  state = jax.jit(init, out_shardings=shardings)()
  return nnx.merge(graphdef, state), shardings


def shard_module_state(module: nnx.Module, mesh: jax.sharding.Mesh, rules: Rules) -> nnx.Module:
  """Moves an existing module (e.g. loaded from disk on the host) onto the mesh by the rules."""
  graphdef, state = nnx.split(module)
  shardings = state_shardings(state, mesh, rules)
  return nnx.merge(graphdef, jax.device_put(state, shardings))


def pretrained_sharding(
  mesh: jax.sharding.Mesh, rules: Rules
) -> Callable[[str, Any, tuple[int, ...]], NamedSharding]:
  """The `sharding=` callback of `models.from_pretrained`: (path, logical axes, shape) -> sharding.

  Loaded checkpoints land on the mesh by the same rules as parameters born in `create_sharded`.
  """

  def placement(path: str, logical_axes: Any, shape: tuple[int, ...]) -> NamedSharding:
    del path
    names = tuple(logical_axes) if logical_axes is not None else None
    return NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules))

  return placement


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
  """Host values (or single-device arrays, typed PRNG keys included) as replicated global arrays.

  Every process must pass the same values; works with one or many processes.
  """
  sharding = replicated(mesh)

  def one(x):
    if hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      data = np.asarray(jax.random.key_data(x))
      return jax.random.wrap_key_data(
        jax.make_array_from_callback(data.shape, sharding, lambda index: data[index]), impl=impl
      )
    value = np.asarray(x)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return jax.tree.map(one, tree)


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Leading (batch) dimension over the rule for "batch"; the rest replicated."""
  axes = tuple(a for a in rules["batch"] if mesh.shape[a] > 1)
  lead = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(lead, *([None] * (ndim - 1)))) if ndim else NamedSharding(mesh, P())


def batch_size_divisor(mesh: jax.sharding.Mesh, rules: Rules) -> int:
  """The number of shards the batch dimension is split into."""
  return math.prod(mesh.shape[a] for a in rules["batch"])


def optimizer_state_shardings(
  tx: Any, abstract_opt_state: Any, param_shardings: Any, mesh: jax.sharding.Mesh
) -> Any:
  """Shardings for an optax state: param-shaped subtrees follow the params; the rest replicate.

  Uses `optax.tree_map_params`, which knows which parts of a state mirror the parameters.
  """
  import optax

  repl = replicated(mesh)
  return optax.tree_map_params(
    tx,
    lambda _, sharding: sharding,
    abstract_opt_state,
    param_shardings,
    transform_non_params=lambda _: repl,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
