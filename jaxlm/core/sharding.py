"""The one place where logical axis names meet mesh axes.

Layers annotate parameters and activations with logical names only
(``('embed', 'mlp')``, ``('batch', 'length', 'embed')``); the rules below decide
which mesh axes each name is split over. Change parallelism here or through
``mesh.rules`` in the config, never inside a layer.
"""

import contextlib
from collections.abc import Sequence

import jax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxlm.core.errors import ConfigError
from jaxlm.core.tree import key_name

# Mesh axes, outermost first. DCN (across slices/hosts) axes are folded into
# 'pipeline', 'data' and 'fsdp' by jaxlm.core.mesh, so rules only ever name these six.
# 'pipeline' splits the scanned layer stack into stages (jaxlm.model.pipeline); it is
# outermost because stages exchange one micro-batch of activations per iteration,
# the least traffic of any axis. 'expert' splits MoE experts (and, like data
# parallelism, the batch); it sits inside fsdp so its all-to-alls stay on the
# fastest links after 'tensor'.
MESH_AXES = ('pipeline', 'data', 'fsdp', 'expert', 'tensor', 'sequence')

# Every logical axis a layer may name.
LOGICAL_AXES = ('batch', 'length', 'embed', 'mlp', 'heads', 'kv_heads',
                'head_dim', 'vocab', 'layers', 'norm', 'expert', 'stage')

# Default rules. A logical axis maps to a mesh axis, a tuple of them, or None
# (replicated). Flax uses the first rule whose mesh axes are still free in the
# spec being built, so order matters only for repeated names.
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ('batch', ('data', 'fsdp', 'expert')),  # activations: batch over every DP-like axis
    ('length', 'sequence'),        # context parallelism splits the sequence
    ('embed', 'fsdp'),             # ZeRO-3: params sharded on the model dim
    ('mlp', 'tensor'),             # Megatron column/row-parallel MLP
    ('heads', 'tensor'),           # attention heads split over tensor
    ('kv_heads', 'tensor'),        # see rules_for(): dropped if kv_heads < tensor
    ('head_dim', None),
    ('vocab', 'tensor'),
    ('layers', 'pipeline'),        # scanned layer stack: contiguous blocks per pipeline stage
    ('stage', 'pipeline'),         # the [stages] axis of the pipeline's staged view
    ('norm', None),
    ('expert', 'expert'),          # MoE: each expert shard holds experts / mesh.expert
)

# Activation-only names: in activations 'embed' must not be sharded over fsdp
# (the batch already is), so activations use 'act_embed' etc.
ACTIVATION_RULES: tuple[tuple[str, object], ...] = (
    ('act_batch', ('data', 'fsdp', 'expert')),
    ('act_length', 'sequence'),
    ('act_embed', None),
    ('act_mlp', 'tensor'),
    ('act_heads', 'tensor'),
    ('act_kv_heads', 'tensor'),
    ('act_vocab', 'tensor'),
)


def parse_rule_overrides(text: str) -> dict[str, object]:
  """Parses ``'mlp=tensor;embed=fsdp,tensor;vocab='`` into a dict.

  An empty right-hand side means replicated; a comma list means several axes.
  """
  out: dict[str, object] = {}
  for item in filter(None, (s.strip() for s in text.split(';'))):
    if '=' not in item:
      raise ConfigError(f"mesh.rules entry '{item}' is not 'logical=mesh_axes'")
    name, axes = (s.strip() for s in item.split('=', 1))
    known = LOGICAL_AXES + tuple(r[0] for r in ACTIVATION_RULES)
    if name not in known:
      raise ConfigError(f"mesh.rules names unknown logical axis '{name}' "
                        f"(known: {', '.join(known)})")
    parts = tuple(a.strip() for a in axes.split(',') if a.strip())
    for a in parts:
      if a not in MESH_AXES:
        raise ConfigError(f"mesh.rules maps '{name}' to unknown mesh axis '{a}' "
                          f"(known: {', '.join(MESH_AXES)})")
    out[name] = parts[0] if len(parts) == 1 else (parts or None)
  return out


def rules_for(model_cfg, mesh_cfg, mesh: Mesh | None = None) -> tuple:
  """Returns the logical-axis rules for this model on this mesh.

  GQA: when there are fewer kv heads than tensor shards, kv heads cannot be
  split, so they are replicated across the tensor axis (each shard keeps all
  kv heads, as Megatron does).
  """
  rules = dict(DEFAULT_RULES + ACTIVATION_RULES)
  tensor = mesh.shape['tensor'] if mesh is not None else int(mesh_cfg.tensor)
  if model_cfg.n_kv_heads % max(tensor, 1):
    rules['kv_heads'] = None
    rules['act_kv_heads'] = None
  rules.update(parse_rule_overrides(mesh_cfg.rules))
  if mesh is not None:  # a mesh built without some axes (e.g. by hand) just lacks their splits
    rules = {k: _only(v, mesh.axis_names) for k, v in rules.items()}
  return tuple(rules.items())


def _only(axes, names):
  if axes is None or isinstance(axes, str):
    return axes if axes in names else None
  kept = tuple(a for a in axes if a in names)
  return kept or None


def logical_sharding(mesh: Mesh, rules, logical: Sequence[str | None]) -> NamedSharding:
  """NamedSharding for an array whose axes have these logical names."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(logical, rules))


def tree_shardings(mesh: Mesh, rules, logical_tree):
  """Maps a pytree of PartitionSpecs-of-logical-names to NamedShardings."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, rules)


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [batch, length] input batch."""
  return logical_sharding(mesh, rules, ('act_batch', 'act_length'))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
  """Pins an activation's layout at a block boundary (no-op outside a mesh)."""
  return nn.with_logical_constraint(x, logical)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Makes ``constrain`` live: layers traced inside see this mesh and these rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def indivisible(tree) -> str | None:
  """Names the first array in ``tree`` (ShapeDtypeStructs or arrays with NamedShardings)
  whose shape does not split over its mesh axes: parameter, shape, dimension, axes."""
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    s = getattr(x, 'sharding', None)
    if not isinstance(s, NamedSharding):
      continue
    for dim, (n, axes) in enumerate(zip(x.shape, s.spec)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      size = 1
      for a in axes:
        size *= s.mesh.shape[a]
      if size > 1 and n % size:
        where = ' x '.join(f"mesh.{a}={s.mesh.shape[a]}" for a in axes)
        return (f'parameter {key_name(path)} of shape {tuple(x.shape)}: dimension {dim} ({n}) '
                f'does not divide over {where}')
  return None
