"""Parallelism on 8 fake CPU devices: every mesh trains the same run as one device."""

import math

import jax
import numpy as np
import pytest

from conftest import load_config, train_and_collect
from jaxlm.core import mesh as mesh_lib
from jaxlm.core.errors import ConfigError
from jaxlm.core.sharding import MESH_AXES
from jaxlm.engine.build import Setup

MESHES = {
    'data=8': dict(data=8),
    'fsdp=8': dict(data=1, fsdp=8),
    'fsdp=4,tensor=2': dict(data=1, fsdp=4, tensor=2),
    'data=2,fsdp=2,tensor=2': dict(data=2, fsdp=2, tensor=2),
    'fsdp=2,sequence=4': dict(data=1, fsdp=2, sequence=4),
}


def _run(cfg, workdir, devices=None):
  cfg.train.log_every = 1
  cfg.eval.every = 0
  cfg.checkpoint.every = 0  # the final checkpoint is still written
  return train_and_collect(cfg, workdir, devices)


def _assert_same_run(got, want):
  assert len(got['loss']) == len(want['loss'])
  np.testing.assert_allclose(got['loss'], want['loss'], rtol=1e-4)
  np.testing.assert_allclose(got['grad_norm'], want['grad_norm'], rtol=1e-3)
  flat = jax.tree_util.tree_flatten_with_path(want['params'])[0]
  assert jax.tree.structure(got['params']) == jax.tree.structure(want['params'])
  for (path, w), g in zip(flat, jax.tree.leaves(got['params'])):
    np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-5, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def single_device_losses(tmp_path_factory):
  from conftest import SHAKESPEARE  # noqa: PLC0415
  path = tmp_path_factory.mktemp('data') / 'text.txt'
  path.write_text(SHAKESPEARE.read_text()[:60_000])
  cfg = load_config('tiny')
  cfg.data.path = str(path)
  _llama(cfg)
  return str(path), _run(cfg, tmp_path_factory.mktemp('one'), jax.devices()[:1])


def _llama(cfg):
  # Llama-style with GQA, so kv-head handling under tensor parallelism is exercised.
  m = cfg.model
  m.position, m.norm, m.activation, m.use_bias, m.tie_embeddings = (
      'rope', 'rmsnorm', 'swiglu', False, False)
  m.n_kv_heads = 2


@pytest.mark.parametrize('name', MESHES)
def test_mesh_matches_single_device(name, single_device_losses, tmp_path):
  path, reference = single_device_losses
  cfg = load_config('tiny')
  cfg.data.path = path
  _llama(cfg)
  for k, v in MESHES[name].items():
    cfg.mesh[k] = v
  got = _run(cfg, tmp_path / 'w')
  assert len(got['loss']) == cfg.train.steps
  _assert_same_run(got, reference)


def test_accelerator_code_path_on_a_mesh_matches_single_device(single_device_losses, tmp_path):
  """fsdp x tensor built as GPUs/TPUs build it (autodiff's Dense backward, no XLA:CPU
  options) trains like the CPU-path reference on one device."""
  from jaxlm.core import platform  # noqa: PLC0415
  path, reference = single_device_losses
  cfg = load_config('tiny')
  cfg.data.path = path
  _llama(cfg)
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
  with platform.accelerator_path():
    _assert_same_run(_run(cfg, tmp_path / 'w'), reference)


def test_chunked_attention_with_context_parallelism_matches_single_device(single_device_losses,
                                                                          tmp_path):
  """The flash kernel (4 key blocks per gathered sequence, remat) on a sequence-split mesh
  trains like the xla reference on one device."""
  path, reference = single_device_losses
  cfg = load_config('tiny')
  cfg.data.path = path
  _llama(cfg)
  cfg.model.attention, cfg.model.attention_chunk, cfg.model.remat = 'chunked', 8, 'full'
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.sequence = 1, 2, 4
  _assert_same_run(_run(cfg, tmp_path / 'w'), reference)


def _setup(**mesh):
  cfg = load_config('tiny')
  cfg.model.d_model, cfg.model.mlp_dim = 128, 512
  for k, v in mesh.items():
    cfg.mesh[k] = v
  return Setup(cfg)


def _bytes(tree, per_device):
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if per_device else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


def test_fsdp_shards_params_and_optimizer_state():
  setup = _setup(data=1, fsdp=8)
  state = setup.init_state()
  per_device = _bytes(state.params, True) + _bytes(state.opt_state, True)
  total = _bytes(state.params, False) + _bytes(state.opt_state, False)
  assert per_device <= total / 7, (per_device, total)
  # Measured on the arrays themselves, not derived from the config:
  kernel = state.params['layers']['mlp']['up']['kernel']  # [layers, embed, mlp]
  assert kernel.addressable_shards[0].data.shape == (2, 128 // 8, 512)


def test_tensor_parallel_splits_mlp_columns_and_rows():
  state = _setup(data=1, fsdp=4, tensor=2).init_state()
  up = state.params['layers']['mlp']['up']['kernel']  # column-parallel: mlp split
  down = state.params['layers']['mlp']['down']['kernel']  # row-parallel: mlp split
  assert up.addressable_shards[0].data.shape == (2, 128 // 4, 512 // 2)
  assert down.addressable_shards[0].data.shape == (2, 512 // 2, 128 // 4)
  q = state.params['layers']['attn']['query']['kernel']  # [layers, embed, heads, head_dim]
  assert q.addressable_shards[0].data.shape[2] == 4 // 2


def test_gqa_kv_heads_fewer_than_tensor_shards_are_replicated():
  cfg = load_config('tiny')
  cfg.model.n_kv_heads = 1
  cfg.mesh.data, cfg.mesh.tensor = 4, 2
  state = Setup(cfg).init_state()
  k = state.params['layers']['attn']['key']['kernel']
  assert k.addressable_shards[0].data.shape[2] == 1  # whole kv head on every tensor shard


def test_mesh_errors_name_the_fields():
  cfg = load_config('tiny')
  cfg.mesh.data, cfg.mesh.fsdp = 3, 2
  with pytest.raises(ConfigError, match='mesh.data=3,mesh.fsdp=2'):
    mesh_lib.make_mesh(cfg.mesh)
  cfg.mesh.data, cfg.mesh.fsdp = -1, -1
  with pytest.raises(ConfigError, match='only one'):
    mesh_lib.make_mesh(cfg.mesh)
  cfg.mesh.fsdp, cfg.mesh.tensor = 1, 3
  with pytest.raises(ConfigError, match='not divisible by 3'):
    mesh_lib.make_mesh(cfg.mesh)


def test_minus_one_takes_the_rest():
  cfg = load_config('tiny')
  cfg.mesh.data, cfg.mesh.tensor = -1, 2
  assert dict(mesh_lib.make_mesh(cfg.mesh).shape) == dict(pipeline=1, data=4, fsdp=1, expert=1,
                                                         tensor=2, sequence=1)


# ---- Mixture of Experts: expert parallelism (jaxlm/model/moe.py) ----------------------

MOE_MESHES = {
    'expert=8': dict(data=1, expert=8),
    'expert=4,fsdp=2': dict(data=1, expert=4, fsdp=2),
    'expert=2,tensor=2,data=2': dict(data=2, expert=2, tensor=2),
}
MOE_METRICS = ('loss', 'moe_aux_loss', 'moe_router_z_loss', 'moe_load_max', 'moe_load_min')


def _moe_steps(devices=None, steps=4, **mesh):
  """tiny_moe trained ``steps`` steps on fixed random batches: (metric curves, final state)."""
  cfg = load_config('tiny_moe')
  for k, v in mesh.items():
    cfg.mesh[k] = v
  setup = Setup(cfg, mesh_lib.make_mesh(cfg.mesh, devices))
  state = setup.init_state()
  rng = np.random.default_rng(0)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  curves = {k: [] for k in MOE_METRICS}
  for _ in range(steps):
    tokens = rng.integers(0, 256, (b, t + 1))
    batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
             'segment_ids': np.ones((b, t), np.int32), 'loss_mask': np.ones((b, t), np.float32),
             'positions': np.broadcast_to(np.arange(t), (b, t))}
    state, m = setup.train_step(state, setup.device_batch(batch))
    for k in MOE_METRICS:
      curves[k].append(float(m[k]))
  return {k: np.array(v) for k, v in curves.items()}, state


@pytest.fixture(scope='module')
def moe_single_device():
  return _moe_steps(jax.devices()[:1])[0]


@pytest.mark.parametrize('name', MOE_MESHES)
def test_expert_parallel_mesh_matches_single_device(name, moe_single_device):
  reference = moe_single_device
  assert reference['loss'][-1] < reference['loss'][0]
  assert np.all(reference['moe_load_max'] > 1.0) and np.all(reference['moe_load_min'] < 1.0)
  curves, state = _moe_steps(**MOE_MESHES[name])
  for k, ref in reference.items():
    np.testing.assert_allclose(curves[k], ref, rtol=1e-4, err_msg=k)
  gate = state.params['layers']['mlp']['gate']  # [layers, experts, embed, mlp]
  ep = MOE_MESHES[name]['expert']
  assert gate.addressable_shards[0].data.shape[1] == 8 // ep  # experts really are split


def _shard(setup, *path):
  x = setup.abstract_state.params
  for k in path:
    x = x[k]
  return x.sharding.shard_shape(x.shape)


def test_mesh_rules_override_the_default_mapping():
  """--config.mesh.rules='mlp=;vocab=;embed=fsdp,tensor' changes how parameters are split."""
  default = _setup(data=1, fsdp=4, tensor=2)
  assert _shard(default, 'layers', 'mlp', 'up', 'kernel') == (2, 128 // 4, 512 // 2)
  assert _shard(default, 'embed', 'embedding') == (320 // 2, 128 // 4)  # [vocab, embed]
  over = _setup(data=1, fsdp=4, tensor=2, rules='mlp=; vocab=; embed=fsdp,tensor')
  assert _shard(over, 'layers', 'mlp', 'up', 'kernel') == (2, 128 // 8, 512)
  assert _shard(over, 'embed', 'embedding') == (320, 128 // 8)
  with pytest.raises(ConfigError, match="unknown mesh axis 'tensr'"):
    _setup(data=1, fsdp=4, tensor=2, rules='mlp=tensr')


def test_dcn_axes_repeat_the_slice_layout_and_fold_on_one_slice():
  cfg = load_config('tiny')
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp = 1, 2, 2, 2
  # Four slices of two devices: fsdp=2 inside each slice, 2 x 2 slices across DCN.
  ici, dcn = mesh_lib.mesh_shape(cfg.mesh, 8, num_slices=4)
  assert dict(zip(MESH_AXES, ici)) == {**dict.fromkeys(MESH_AXES, 1), 'fsdp': 2}
  assert dict(zip(MESH_AXES, dcn)) == {**dict.fromkeys(MESH_AXES, 1), 'data': 2, 'fsdp': 2}
  # One slice (CPU, one GPU host): the DCN axes multiply into data and fsdp.
  shape = dict(mesh_lib.make_mesh(cfg.mesh).shape)
  assert (shape['data'], shape['fsdp']) == (2, 4)
  cfg.mesh.dcn_data = -1  # -1: the slices left over
  dcn = dict(zip(MESH_AXES, mesh_lib.mesh_shape(cfg.mesh, 8, num_slices=4)[1]))
  assert (dcn['data'], dcn['fsdp']) == (2, 2)
  with pytest.raises(ConfigError, match='DCN'):
    mesh_lib.mesh_shape(cfg.mesh, 8, num_slices=3)
  # dcn_pipeline repeats the slice along 'pipeline' (and folds into it on one slice).
  cfg.mesh.data, cfg.mesh.dcn_data, cfg.mesh.dcn_fsdp, cfg.mesh.dcn_pipeline = -1, 1, 1, 2
  dcn = dict(zip(MESH_AXES, mesh_lib.mesh_shape(cfg.mesh, 8, num_slices=2)[1]))
  assert dcn == {**dict.fromkeys(MESH_AXES, 1), 'pipeline': 2}
  shape = dict(mesh_lib.make_mesh(cfg.mesh).shape)
  assert (shape['pipeline'], shape['data'], shape['fsdp']) == (2, 2, 2)


def test_expert_axis_combines_with_dcn():
  cfg = load_config('tiny_moe')
  cfg.mesh.data, cfg.mesh.expert, cfg.mesh.dcn_data = 1, 4, 2  # 2 hosts/slices x 4 experts
  mesh = mesh_lib.make_mesh(cfg.mesh)
  assert dict(mesh.shape) == dict(pipeline=1, data=2, fsdp=1, expert=4, tensor=1, sequence=1)
  assert mesh_lib.data_parallel_size(mesh) == 8  # the batch splits over dcn_data and expert
  ici, dcn = mesh_lib.mesh_shape(cfg.mesh, 8, num_slices=2)  # the multi-slice layout
  assert (ici, dcn) == ([1, 1, 1, 4, 1, 1], [1, 2, 1, 1, 1, 1])
