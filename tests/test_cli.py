"""Bad input gets one clear line and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest

from jaxlm.cli import main

TINY = 'configs/tiny.py'


@pytest.fixture(autouse=True)
def _in_repo(repo, monkeypatch):
  monkeypatch.chdir(repo)


def _err(capsys, argv) -> str:
  code = main(argv)
  err = capsys.readouterr().err
  assert code == 2, err
  lines = [l for l in err.splitlines() if l.startswith('jaxlm: error:')]
  assert len(lines) == 1 and 'Traceback' not in err, err
  return lines[0]


def test_missing_data_path(capsys, tmp_path):
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      '--config.data.path=/no/such/file.txt'])
  assert "data.path '/no/such/file.txt' does not exist" in msg


def test_empty_data_file(capsys, tmp_path):
  (tmp_path / 'empty.txt').write_text('')
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      f'--config.data.path={tmp_path}/empty.txt'])
  assert 'empty.txt' in msg


def test_config_file_missing(capsys, tmp_path):
  msg = _err(capsys, ['train', '--config=configs/nope.py', f'--workdir={tmp_path}/w'])
  assert "config file 'configs/nope.py' does not exist" in msg


def test_unknown_key_is_named(capsys, tmp_path):
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      '--config.train.stepz=3'])
  assert "'train.stepz'" in msg and "'steps'" in msg


def test_wrong_type_is_named(capsys, tmp_path):
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      '--config.train.steps=many'])
  assert 'train.steps' in msg


def test_seq_len_above_model_maximum(capsys, tiny_cfg, tmp_path):
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      f'--config.data.path={tiny_cfg.data.path}', '--config.data.seq_len=1000'])
  assert 'data.seq_len=1000 is above model.max_seq_len=64' in msg


def test_batch_not_divisible_over_devices(capsys, tiny_cfg, tmp_path):
  # The test process has 8 fake devices, all data-parallel by default.
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      f'--config.data.path={tiny_cfg.data.path}', '--config.train.batch_size=12'])
  assert 'train.batch_size=12' in msg and '8 data-parallel devices' in msg


def test_mesh_product_must_match_devices(capsys, tiny_cfg, tmp_path):
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      f'--config.data.path={tiny_cfg.data.path}', '--config.mesh.data=3'])
  assert 'mesh.data=3' in msg and '8 devices' in msg


def test_workdir_with_conflicting_config(capsys, tiny_cfg, tmp_path):
  (tmp_path / 'w').mkdir()
  (tmp_path / 'w' / 'config.json').write_text(tiny_cfg.to_json())
  msg = _err(capsys, ['train', f'--config={TINY}', f'--workdir={tmp_path}/w',
                      f'--config.data.path={tiny_cfg.data.path}', '--config.model.d_model=64',
                      '--config.model.n_layers=3'])
  assert 'model.d_model (32 -> 64)' in msg and 'model.n_layers (2 -> 3)' in msg


def test_generate_without_checkpoint(capsys, tmp_path):
  msg = _err(capsys, ['generate', f'--workdir={tmp_path}/nothing', '--prompt=x'])
  assert 'config.json' in msg


def test_subprocess_exit_code_and_single_line(repo, tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'jaxlm', 'train', f'--config={TINY}',
                         f'--workdir={tmp_path}/w', '--config.model.norm=batchnorm'],
                        cwd=repo, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert "model.norm='batchnorm' is not one of 'layernorm', 'rmsnorm'" in proc.stderr
