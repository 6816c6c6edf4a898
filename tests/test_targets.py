"""jaxlm.cli.targets: Cloud TPU and NVIDIA target names -> device counts, topologies, HBM; the
XLA:CPU fallback says which compiler is missing (the compilers themselves: tests/aot)."""

import pytest

from jaxlm.cli import main as cli, targets
from jaxlm.core.errors import ConfigError


@pytest.mark.parametrize('name,devices,slices,chips,topology', [
    ('v5p-8', 0, 1, 4, 'v5p:2x2x1'),
    ('v5p-16', 0, 1, 8, 'v5p:2x2x2'),
    ('v5p-512', 0, 1, 256, 'v5p:4x8x8'),
    ('v5e-8', 0, 1, 8, 'v5e:2x4'),
    ('v6e-256', 0, 1, 256, 'v6e:16x16'),
    ('v5e-16', 0, 2, 32, 'v5e:4x4'),  # two slices of 16 chips over DCN
    ('v5p', 64, 1, 64, 'v5p:4x4x4'),  # a bare kind takes --devices
    ('h100-80g', 8, 1, 8, '1x1x8'),
    ('h200', 64, 1, 64, '1x8x8'),  # hosts of 8 GPUs
    ('b200', 4, 1, 4, '1x1x4'),
])
def test_target_names_give_chips_and_topology(name, devices, slices, chips, topology):
  t = targets.parse(name, devices, slices)
  assert (t.devices, t.topology, t.slices) == (chips, topology, slices)
  assert t.hbm > 15 * 2**30


def test_bad_targets_name_the_problem():
  for args in [('v5p-12',), ('v5p-8', 8), ('tpu9000',), ('h100-80g', 12), ('v5p',),
               ('h100-80g', 8, 2)]:
    with pytest.raises(ConfigError):
      targets.parse(*args)


def test_gpu_target_configs_ship_for_every_nvidia_target():
  for kind in targets.GPU_KINDS:
    text = targets.gpu_config_text(kind)
    assert 'cuda_compute_capability' in text and 'device_memory_size' in text


def test_plan_without_the_target_compiler_falls_back_to_xla_cpu_and_says_how(capsys):
  if targets.compiler_version('tpu') is not None:
    pytest.skip('libtpu is installed here (tests/aot covers the TPU compiler)')
  assert cli.main(['plan', '--config=tiny', '--target=v5p-8']) == 0
  out = capsys.readouterr().out
  stand_in = [l for l in out.splitlines() if 'stand-in' in l]
  assert len(stand_in) == 1 and "pip install 'jaxlm[aot-tpu]'" in stand_in[0], out
  assert 'compiler    XLA:CPU' in out and '(XLA:CPU)' in out
