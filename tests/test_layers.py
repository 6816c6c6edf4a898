"""jaxlm's layers (pyproject.toml's import-linter contracts) hold, and the linter catches each
way of breaking them: a lower layer importing a higher one (inside a function too), a cycle
inside a layer, siblings importing each other, a folder no layer names."""

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).with_name('lint-imports'))


def lint(root: Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=str(root))  # grimp must find this copy's jaxlm
  return subprocess.run([LINT, '--config', str(root / 'pyproject.toml'), '--no-cache'], cwd=root,
                        env=env, capture_output=True, text=True, timeout=120)


def test_the_layers_hold():
  out = lint(ROOT)
  assert out.returncode == 0, out.stdout + out.stderr
  assert 'Contracts: 2 kept, 0 broken.' in out.stdout


@pytest.fixture
def copy(tmp_path) -> Path:
  shutil.copytree(ROOT / 'jaxlm', tmp_path / 'jaxlm', ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(ROOT / 'pyproject.toml', tmp_path)
  return tmp_path


def add_line(path: Path, line: str) -> None:
  path.write_text(path.read_text() + '\n' + line + '\n')


@pytest.mark.parametrize('module, line, expect', [
    # core reaching up to the train loop, from inside a function (a lazy import counts)
    ('core/storage.py', 'def _f():\n  from jaxlm.run import loop', 'jaxlm.core is not allowed to import jaxlm.run'),
    ('model/loss.py', 'from jaxlm.optim import step', 'jaxlm.model is not allowed to import jaxlm.optim'),
    # independent siblings
    ('checkpoint/param_store.py', 'import jaxlm.hf.weights', 'jaxlm.checkpoint is not allowed to import jaxlm.hf'),
    ('data/packing.py', 'from jaxlm.model import layers', 'jaxlm.data is not allowed to import jaxlm.model'),
    # a cycle between two modules of one layer
    ('run/runtime.py', 'def _f():\n  from jaxlm.run import loop', 'package BROKEN'),  # loop imports runtime
])
def test_a_broken_layer_is_caught(copy, module, line, expect):
  add_line(copy / 'jaxlm' / module, line)
  out = lint(copy)
  assert out.returncode != 0
  assert 'BROKEN' in out.stdout and expect in ' '.join(out.stdout.split()), out.stdout


def test_a_folder_without_a_layer_is_caught(copy):
  (copy / 'jaxlm' / 'extras').mkdir()
  (copy / 'jaxlm' / 'extras' / '__init__.py').write_text('')
  out = lint(copy)
  assert out.returncode != 0 and 'extras' in out.stdout, out.stdout


@pytest.mark.parametrize('module', ['jaxlm.engine.build', 'jaxlm.engine.generate', 'jaxlm.cli.convert',
                                    'jaxlm.run.loop', 'jaxlm.run.finetune', 'jaxlm.cli.commands'])
def test_modules_import(module):
  importlib.import_module(module)
