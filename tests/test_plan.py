"""`jaxlm plan`: compiles the real step on a mesh larger than the host (in a child process
with fake CPU devices) and finds the smallest grad_accum that fits a memory budget."""

from conftest import load_config
from jaxlm.cli import main as cli
from jaxlm.cli import plan as plan_lib

# 16 devices: more than the 8 this test process has, so the compile runs in a child.
MESH = ['--config.mesh.data=1', '--config.mesh.fsdp=16', '--config.train.batch_size=64',
        '--config.data.seq_len=64']


def _cfg():
  cfg = load_config('tiny')
  cfg.mesh.data, cfg.mesh.fsdp, cfg.train.batch_size, cfg.data.seq_len = 1, 16, 64, 64
  return cfg


def test_plan_compiles_on_more_devices_than_the_host_and_finds_grad_accum(capsys):
  events = []
  plan_lib.run(_cfg(), plan_lib.mesh_devices(_cfg()), None, events.append)
  first = events[0]
  assert first['devices'] == 16 and first['grad_accum'] == 1 and first['per_device_batch'] == 4
  assert first['args'] > 0 and first['temp'] > 0

  budget_gib = 0.9 * first['total'] / plan_lib.GiB  # the step as configured does not fit
  assert cli.main(['plan', '--config=tiny', *MESH, f'--target={budget_gib / plan_lib.USABLE}']) == 0
  out = capsys.readouterr().out
  assert 'on 16 fake CPU devices in a child process' in out
  compiled = [l for l in out.splitlines() if l.startswith('compiled')]
  assert 'grad_accum 1,' in compiled[0] and compiled[0].endswith('does not fit')
  chosen = [l for l in out.splitlines() if l.startswith('fits')]
  assert chosen and 'with --config.train.grad_accum=' in chosen[0], out
  ga = int(chosen[0].split('grad_accum=')[1].split()[0])
  assert ga in (2, 4)
  fits = {int(l.split('grad_accum ')[1].split(',')[0]): l.endswith('  fits') for l in compiled}
  assert fits[ga] and not fits[{2: 1, 4: 2}[ga]]  # the smallest that fits: the one below did not


def test_plan_names_an_unknown_target():
  assert cli.main(['plan', '--config=tiny', '--target=tpu9000']) == 2


def test_plan_sizes_match_the_initialized_state_and_xla():
  """plan's parameter count and per-device bytes equal what init puts on each device, and
  XLA's argument bytes for the step are those plus one batch."""
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from jaxlm.core import mesh as mesh_lib  # noqa: PLC0415
  from jaxlm.engine.build import Setup  # noqa: PLC0415
  cfg = load_config('tiny')
  cfg.model.d_model, cfg.model.mlp_dim = 128, 512
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
  mesh = mesh_lib.make_mesh(cfg.mesh)
  fig = plan_lib.figures(cfg, mesh, with_sizes=True)
  state = Setup(cfg, mesh).init_state()

  def on_device_0(tree):  # bytes of the shards device 0 really holds
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == jax.devices()[0])

  assert fig['n_params'] == sum(x.size for x in jax.tree.leaves(state.params))
  assert fig['params_per_device'] == on_device_0(state.params)
  assert fig['opt_state_per_device'] == on_device_0(state.opt_state)
  assert fig['params'] == sum(np.asarray(x).nbytes for x in jax.tree.leaves(state.params))
  batch = 5 * cfg.train.batch_size * cfg.data.seq_len * 4 // 4  # 5 int32/f32 arrays, data split 4
  state_bytes = fig['params_per_device'] + fig['opt_state_per_device']
  assert state_bytes <= fig['args'] <= state_bytes + batch + 64, fig


def test_readme_llama_70b_figures():
  """README: llama_70b on fsdp=256 has 70.55B parameters and 2.58 GiB of params + optimizer
  state per device (bf16 Adam first moment); shapes only, nothing is allocated or compiled."""
  import jax  # noqa: PLC0415
  from jaxlm.core.sharding import MESH_AXES  # noqa: PLC0415
  from jaxlm.engine.build import Setup  # noqa: PLC0415
  cfg = load_config('llama_70b')
  cfg.data.path = '/data/train'
  sizes = dict.fromkeys(MESH_AXES, 1)
  sizes['fsdp'] = 256
  cfg.mesh.data, cfg.mesh.fsdp = 1, 256
  mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), MESH_AXES)
  s = plan_lib._sizes(Setup(cfg, mesh).abstract_state)
  assert f"{s['n_params'] / 1e9:.2f}B" == '70.55B'
  assert f"{(s['params_per_device'] + s['opt_state_per_device']) / 2**30:.2f}" == '2.58'
