"""`pip install .` into a fresh venv works without the repository (make test-package; minutes).

The package is installed non-editable, then every command runs from an empty
directory outside the checkout: train with the packaged ``--config=tiny``,
export to Hugging Face, import that back with ``convert --from_hf``, generate.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'

pytestmark = pytest.mark.package


def test_fresh_venv_trains_converts_and_generates_outside_the_repo(tmp_path):
  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True)
  # Build from a copy: setuptools leaves build/ in the source tree, which would go stale.
  src = tmp_path / 'src'
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
      '.git', '.venv', 'build', 'runs', '*.egg-info', '__pycache__', '.pytest_cache'))
  # The CI's pinned versions (.ci/constraints.txt): the same set the other targets run on.
  pip = subprocess.run([str(venv / 'bin' / 'pip'), 'install', '-q', '-c',
                        str(REPO / '.ci' / 'constraints.txt'), str(src)],
                       capture_output=True, text=True, timeout=1200)
  assert pip.returncode == 0, pip.stderr[-3000:]
  work = tmp_path / 'elsewhere'
  work.mkdir()
  data = work / 'corpus.txt'
  data.write_text(SHAKESPEARE.read_text()[:20_000])
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env.update(JAX_PLATFORMS='cpu', PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")

  def jaxlm(*args):
    done = subprocess.run(['jaxlm', *args], cwd=work, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, (args, done.stderr[-3000:])
    return done.stdout

  where = subprocess.run(['python', '-c', 'import jaxlm; print(jaxlm.__file__)'], cwd=work,
                         env=env, capture_output=True, text=True, check=True).stdout
  assert where.startswith(str(venv)), where  # the installed copy, not the checkout
  jaxlm('train', '--config=tiny', '--workdir=run', f'--config.data.path={data}',
        '--config.train.steps=4', '--config.eval.every=0', '--config.checkpoint.every=0')
  jaxlm('convert', '--workdir=run', '--to_hf=hf')
  jaxlm('convert', '--from_hf=hf', '--workdir=imported', f'--data_path={data}')
  assert jaxlm('generate', '--workdir=imported', '--prompt=To be', '--max_new_tokens=4',
               '--temperature=0').startswith('To be')
  assert sorted(os.listdir(work)) == ['corpus.txt', 'hf', 'imported', 'run']
