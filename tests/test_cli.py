"""Bad input gets one clear line and a non-zero exit, never a traceback."""

import subprocess
import sys

import pytest

from jaxlm.cli import main as cli
from jaxlm.cli.main import main
from jaxlm.configs import tiny
from jaxlm.core.errors import ConfigError

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


def test_config_by_shipped_name_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # no configs/ here: names resolve to the packaged files
  for arg in ('tiny', 'tiny.py', 'configs/tiny.py'):
    fv = cli.parse('plan', [f'--config={arg}', '--config.train.steps=7'])
    assert fv.config.name == 'tiny' and fv.config.train.steps == 7
  (tmp_path / 'tiny.py').write_text(  # a local file of that name wins over the shipped one
      'from jaxlm.configs import tiny\n\ndef get_config():\n'
      '  c = tiny.get_config()\n  c.name = "mine"\n  return c\n')
  assert cli.parse('plan', ['--config=tiny.py']).config.name == 'mine'


def test_override_parser_is_shared_with_scripts():
  cfg = cli.override(tiny.get_config(), ['--config.train.steps=7', '--config.optim.lr=0.5'])
  assert (cfg.train.steps, cfg.optim.lr) == (7, 0.5)
  with pytest.raises(ConfigError, match="unknown config key 'train.stepz'.*did you mean 'steps'"):
    cli.override(tiny.get_config(), ['--config.train.stepz=7'])


def test_train_help_lists_the_exit_codes(capsys):
  assert main(['train', '--help']) == 0
  out = capsys.readouterr().out
  for line in ('0   reached train.steps', '75  stopped early by SIGTERM', '2   bad input',
               '3   diverged', '4   storage fault'):
    assert line in out, out


@pytest.mark.parametrize('error, code', [('DivergedError', 3), ('StorageError', 4),
                                         ('CheckpointError', 2)])
def test_each_error_kind_has_its_exit_code(capsys, monkeypatch, tmp_path, error, code):
  from jaxlm.cli import commands  # noqa: PLC0415
  from jaxlm.core import errors  # noqa: PLC0415

  def train(fv):
    raise getattr(errors, error)('what went wrong')
  monkeypatch.setattr(commands, 'train', train)
  assert main(['train', f'--config={TINY}', f'--workdir={tmp_path}']) == code
  assert capsys.readouterr().err == 'jaxlm: error: what went wrong\n'


def test_plugin_help_names_its_subcommand(capsys):
  assert main(['tokenizer', '--help']) == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: jaxlm tokenizer train --input=') and '  train   ' in out, out


def test_user_hook_that_is_not_importable_hints_at_pythonpath():
  from jaxlm.evals.hooks import load_user_hook  # noqa: PLC0415
  with pytest.raises(ConfigError, match=r"No module named 'my_hooks_nowhere'.*PYTHONPATH=\."):
    load_user_hook('my_hooks_nowhere:fn', 10)
  with pytest.raises(ConfigError, match="has no attribute") as e:  # found, but no such function
    load_user_hook('json:no_such_fn', 10)
  assert 'PYTHONPATH' not in str(e.value)


def test_readme_first_train_command_runs_outside_the_checkout(repo, tmp_path, monkeypatch):
  import re  # noqa: PLC0415
  import shlex  # noqa: PLC0415
  commands = (repo / 'README.md').read_text().split('## Commands', 1)[1]
  first = re.search(r'^jaxlm train .*$', commands, re.M).group(0)
  assert '../' not in first and 'configs/' not in first, first  # nothing only a checkout has
  monkeypatch.chdir(tmp_path)  # as from an installed package: no repository around
  argv = shlex.split(first.split('#')[0])[1:]
  assert main([*argv, '--config.train.steps=2', '--config.eval.batches=1',
               '--config.data.max_docs=200']) == 0  # a slice of the corpus: fast
  assert (tmp_path / 'runs' / 'demo' / 'checkpoints' / '2').is_dir()


def test_negative_peer_timeout_is_refused_before_anything_runs(capsys, tmp_path):
  work = tmp_path / 'w'
  line = _err(capsys, ['train', '--config=tiny', f'--workdir={work}', '--peer_timeout=-1'])
  assert '--peer_timeout=-1' in line and 'non-negative' in line, line
  assert not work.exists()
