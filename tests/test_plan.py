"""`jaxlm plan`: compiles the real step on a mesh larger than the host (in a child process
with fake CPU devices) and finds the smallest grad_accum that fits a memory budget."""

from conftest import load_config
from jaxlm import cli
from jaxlm import plan as plan_lib

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
