"""`make demo` end to end, shortened: the Makefile's own two commands (train on this
Python's stdlib, then generate), with fewer steps (make test-demo; about a minute)."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 40  # of demo.py's 500

pytestmark = pytest.mark.demo


def _demo_recipe() -> list[list[str]]:
  """The `demo:` target's commands, as argv lists."""
  lines = (REPO / 'Makefile').read_text().splitlines()
  start = lines.index(next(l for l in lines if l.startswith('demo:')))
  recipe = []
  for line in lines[start + 1:]:
    if not line.startswith('\t'):
      break
    recipe.append(shlex.split(line.strip()))
  return recipe


def test_make_demo_trains_then_samples_code(tmp_path):
  train, generate = _demo_recipe()
  assert train[0] == generate[0] == '$(BIN)/jaxlm' and train[1] == 'train' and generate[1] == 'generate'
  work = str(tmp_path / 'demo')

  def argv(cmd, *extra):
    args = [a.replace('runs/demo', work) for a in cmd[1:]]
    return [sys.executable, '-m', 'jaxlm', *args, *extra]

  done = subprocess.run(argv(train, f'--config.train.steps={STEPS}', '--config.train.log_every=10'),
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  # No terminal here, so no bar: a log line every log_every steps (and step 1, the compile step).
  assert re.search(r'jaxlm: step 10/40 \| loss \d+\.\d+ \| lr ', done.stderr), done.stderr[-3000:]
  rows = [json.loads(l) for l in (tmp_path / 'demo' / 'metrics.jsonl').read_text().splitlines()]
  logged = [r['step'] for r in rows if 'train/loss' in r]
  assert logged == [1, 10, 20, 30, 40], logged
  losses = [r['train/loss'] for r in rows if 'train/loss' in r and r['step'] % 10 == 0]
  # 4.92 at step 10 -> 2.91 at step 40 when written
  assert len(losses) == STEPS // 10 and losses[-1] < min(losses[0] - 0.5, 3.5), losses
  assert (tmp_path / 'demo' / 'samples.txt').read_text().count('--- step 40') == 3

  out = subprocess.run(argv(generate), cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('def ') and len(out.stdout) > 100, out.stdout
