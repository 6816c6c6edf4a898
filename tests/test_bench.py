"""The benchmark scripts measure what they say (tiny configs, a few steps)."""

import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / 'bench'))


def test_throughput_reports_consistent_figures(capsys):
  import throughput  # noqa: PLC0415
  r = throughput.main(['--config', str(REPO / 'configs' / 'tiny.py'), '--steps', '2',
                       '--repeats', '2', '--warmup', '1', '--config.train.batch_size=16'])
  assert r['devices'] == 8 and r['tokens_per_step'] == 16 * 32
  assert r['tokens_per_sec'] > 0
  assert r['tokens_per_sec_per_device'] == pytest.approx(r['tokens_per_sec'] / 8)
  assert r['step_ms'] == pytest.approx(r['tokens_per_step'] / r['tokens_per_sec'] * 1e3)
  assert 0 < r['mfu'] < 1
  assert r['peak_memory_gib'] > 0
  out = capsys.readouterr().out
  assert 'tokens/s/device' in out and 'MFU' in out
