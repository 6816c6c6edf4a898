"""Pins the Orbax on-disk layout that jaxlm.checkpoint.param_store reads and writes by
hand with tensorstore (HF import/export): if an Orbax upgrade stores a step differently,
these fail here instead of import/export breaking without an API change."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxlm.checkpoint import param_store
from jaxlm.checkpoint.checkpointer import Checkpointer, abstract_like

CFG = ml_collections.ConfigDict({'keep': 2, 'keep_period': 0, 'async_save': False,
                                 'keep_best': 0})


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _state():
  params = {'embed': {'embedding': jnp.arange(12.0).reshape(4, 3)},
            'layers': {'mlp': {'bias': jnp.zeros((3,))}}}
  return {'params': params, 'step': jnp.int32(5)}


def test_a_training_save_is_one_ocdbt_zarr_array_per_parameter_under_its_dotted_key(tmp_path):
  state = _state()
  with Checkpointer(str(tmp_path), CFG) as ckpt:
    ckpt.save(5, state, {'pos': 1})
    ckpt.wait()
    step_dir = ckpt.step_dir(5)
  meta = json.loads((tmp_path / 'checkpoints' / '5' / 'state' / '_METADATA').read_text())
  # The fields read_layout trusts, written explicitly (its defaults are a guess).
  assert (meta['use_ocdbt'], meta['use_zarr3']) == (True, False), meta.keys()
  assert meta['store_array_data_equal_to_fill_value'] is True
  assert param_store.read_layout(step_dir) == {'use_ocdbt': True, 'use_zarr3': False}
  for path in (('embed', 'embedding'), ('layers', 'mlp', 'bias')):
    array = param_store.open_param(step_dir, path, strict=True)
    want = np.asarray(_get(state['params'], path))
    assert array.read().result().tobytes() == want.tobytes(), path


def test_a_step_param_store_writes_is_one_orbax_restores(tmp_path):
  """save_empty + fill (what `jaxlm convert --from_hf` does) -> Orbax's own restore."""
  params = {'embed': {'embedding': np.arange(12, dtype=np.float32).reshape(4, 3) + 0.5},
            'layers': {'mlp': {'bias': np.zeros(3, np.float32)}}}  # all fill value: stored
  step_dir = str(tmp_path / 'checkpoints' / '0')
  flat = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  param_store.save_empty(step_dir, {p: v.shape for p, v in flat.items()}, np.float32)
  assert param_store.read_layout(step_dir) == {'use_ocdbt': True, 'use_zarr3': True}
  for path, value in flat.items():
    param_store.fill(param_store.open_param(step_dir, path, write=True), value)
  with Checkpointer(str(tmp_path), CFG, read_only=True) as ckpt:
    assert ckpt.steps() == [0] and ckpt.holds_params_only(0)
    restored, _ = ckpt.restore(0, abstract_like(jax.tree.map(jnp.asarray, params)),
                               params_only=True)
  for path, value in flat.items():
    assert np.asarray(_get(restored, path)).tobytes() == value.tobytes(), path
