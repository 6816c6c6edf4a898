"""bench/gpu_check.sh, the GPU proof script, is sound before a GPU is ever lent (dry run on CPU)."""

import shlex
import subprocess

from conftest import REPO

from jaxlm import configs
from jaxlm.cli import main as cli
from jaxlm.core import config as config_lib


def _dry_run(tmp_path) -> list[list[str]]:
  out = subprocess.run(['bash', 'bench/gpu_check.sh', '--dry-run', '--out', str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, check=True).stdout
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith('$ ')]


def test_script_parses():
  subprocess.run(['bash', '-n', 'bench/gpu_check.sh'], cwd=REPO, check=True)


def test_dry_run_runs_the_kernel_tests_and_two_valid_throughput_configs(tmp_path):
  cmds = _dry_run(tmp_path)
  assert any('tests/model/test_attention.py' in c for c in cmds)
  runs = [c for c in cmds if any(a.endswith('bench/throughput.py') for a in c)]
  assert len(runs) == 2
  for cmd in runs:
    name = next(a.split('=', 1)[1] for a in cmd if a.startswith('--config='))
    overrides = [a for a in cmd if a.startswith('--config.')]
    # Every override names a real field with a valid value, and the result validates:
    # a typo here would cost a GPU session.
    cfg = cli.override(configs.load(name), overrides)
    config_lib.validate(cfg, need_data=False)
    assert cfg.model.dtype == 'bfloat16'
  assert (tmp_path / 'gpu_report.txt').read_text().count('bench/throughput.py') == 2
