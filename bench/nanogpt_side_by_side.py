"""jaxlm and the real nanoGPT, side by side on one machine, same recipe, alternating runs.

nanoGPT is run from its unmodified files in ``../shared/peers/nanoGPT`` (copied
to a temporary directory with the shared tinyshakespeare text, prepared by its
own ``prepare.py``; nothing of it enters this repository) with its documented
CPU command. jaxlm runs ``jaxlm/configs/shakespeare_char_nanogpt.py``, the same
model and recipe (see that file; only the vocabulary differs: 320 byte rows vs
65 characters; ``--jaxlm_override=--config.data.tokenizer=char
--jaxlm_override=--config.model.vocab_size=65`` runs nanoGPT's exact vocabulary),
through ``bench/shakespeare.py`` (the real Trainer). Runs
alternate nanoGPT / jaxlm ``--repeats`` times; printed are the medians of:

- tokens/s in training steps: nanoGPT's median ``time`` of its iteration lines
  (evaluation iterations, which include the eval, and iteration 0 left out);
  jaxlm's median ``train/tokens_per_sec`` of metrics.jsonl (its window excludes
  eval and checkpoint time in the same way);
- wall time from process start to the first evaluation with val loss <= target
  (both evaluate every 250 iterations on 20 batches of 12 x 64), and to the
  "common" val loss, the highest final val of all runs: the loss every run
  reached, so a wall-clock comparison even when a side never gets to the target;
- startup: process start to the end of the first training step (for nanoGPT
  less its evaluation at iteration 0, which jaxlm does not do; its wall times
  to a val loss keep that extra evaluation).

    .venv/bin/python bench/nanogpt_side_by_side.py                 # 3 x 2000 iterations each
    .venv/bin/python bench/nanogpt_side_by_side.py --iters=300 --repeats=1   # a quick look
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / 'shared'
ITER = re.compile(r'^iter (\d+): loss ([\d.]+), time ([\d.]+)ms')
EVAL = re.compile(r'^step (\d+): train loss ([\d.]+), val loss ([\d.]+)')


def prepare_nanogpt(src: Path, text: Path) -> Path:
  """A runnable copy of nanoGPT with shakespeare_char prepared by its own prepare.py."""
  root = Path(tempfile.mkdtemp(prefix='nanogpt_'))
  shutil.copytree(src, root, dirs_exist_ok=True)
  data = root / 'data' / 'shakespeare_char'
  shutil.copy(text, data / 'input.txt')
  stub = root / 'stub'  # prepare.py imports requests only to download input.txt
  stub.mkdir()
  (stub / 'requests.py').write_text('')
  subprocess.run([sys.executable, 'data/shakespeare_char/prepare.py'], cwd=root, check=True,
                 env={**os.environ, 'PYTHONPATH': str(stub)}, stdout=subprocess.DEVNULL)
  return root


def _stream(cmd, cwd, env, ok=(0,)):
  """Runs ``cmd``; yields (seconds since start, line) as each stdout line arrives.

  Raises if it exits with a status not in ``ok``.
  """
  t0 = time.time()
  proc = subprocess.Popen(cmd, cwd=cwd, env={**env, 'PYTHONUNBUFFERED': '1'}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  for line in proc.stdout:
    yield time.time() - t0, line.rstrip('\n')
  if proc.wait() not in ok:
    raise RuntimeError(f'{cmd[:3]} exited with {proc.returncode}')


def run_nanogpt(root: Path, iters: int, target: float) -> dict:
  cmd = [sys.executable, 'train.py', 'config/train_shakespeare_char.py', '--device=cpu',
         '--compile=False', '--eval_iters=20', '--log_interval=1', '--block_size=64',
         '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128', f'--max_iters={iters}',
         f'--lr_decay_iters={iters}', '--dropout=0.0', '--always_save_checkpoint=False']
  step_ms, eval_ms, evals, first_step = [], [], [], None
  for t, line in _stream(cmd, root, os.environ):
    if m := ITER.match(line):
      it, ms = int(m[1]), float(m[3])
      if first_step is None:
        first_step = t  # iteration 0 is printed when it has finished
      if it % 250 and it:
        step_ms.append(ms)
      elif it:
        eval_ms.append(ms)  # an eval iteration's time includes the eval
    elif m := EVAL.match(line):
      evals.append((t, float(m[3])))
  step = statistics.median(step_ms)
  # nanoGPT also evaluates before its first step, jaxlm does not: that eval (the
  # median eval iteration less a step) is taken out of its startup.
  first_eval = (statistics.median(eval_ms) - step) / 1e3 if eval_ms else 0.0
  return _result(12 * 64 / (step / 1e3), evals, first_step - first_eval, target)


def _result(tokens_per_sec, evals, startup, target) -> dict:
  """One run's figures; `evals` is [(seconds from process start, val loss)] in order."""
  return {'tokens_per_sec': tokens_per_sec, 'wall_to_target': _wall_to(evals, target),
          'startup': startup, 'final_val': evals[-1][1] if evals else None, 'evals': evals}


def _wall_to(evals, target):
  """Seconds from process start to the first eval with val loss <= target (None: never)."""
  return next((t for t, v in evals if v <= target), None)


def run_jaxlm(iters: int, target: float, overrides=()) -> dict:
  workdir = tempfile.mkdtemp(prefix='jaxlm_sbs_')
  cmd = [sys.executable, str(REPO / 'bench' / 'shakespeare.py'),
         '--config=shakespeare_char_nanogpt', f'--target={target}', f'--workdir={workdir}',
         '--keep_going', f'--config.train.steps={iters}', '--config.train.log_every=10',
         f"--config.data.path={SHARED / 'data' / 'tinyshakespeare.txt'}",
         '--config.train.progress=False', *overrides]
  evals, startup, verdict = [], None, None
  # bench/shakespeare.py exits 1 when the target is not reached: a result here
  # (a short or unlucky run), an error only if it printed no verdict.
  for _, line in _stream(cmd, REPO, os.environ, ok=(0, 1)):
    if line.startswith(('REACHED', 'NOT REACHED')):
      verdict = line
    elif m := re.match(r'^first step done: ([\d.]+) s', line):
      startup = float(m[1])
    elif m := re.match(r'^step +(\d+) +([\d.]+) s +val loss ([\d.]+)', line):
      evals.append((float(m[2]), float(m[3])))
  if verdict is None:
    raise RuntimeError(f'{cmd[:3]} failed before training finished')
  rows = [json.loads(l) for l in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  shutil.rmtree(workdir)
  rates = [r['train/tokens_per_sec'] for r in rows if 'train/tokens_per_sec' in r]
  # The first window holds the compile.
  return _result(statistics.median(rates[1:] or rates), evals, startup, target)


def _fmt(key, v) -> str:
  return '-' if v is None else f'{v:.4f}' if key == 'final_val' else f'{v:,.2f}'


def _median(runs, key):
  vals = [r[key] for r in runs if r[key] is not None]
  return statistics.median(vals) if len(vals) == len(runs) else None


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--iters', type=int, default=2000, help='iterations of each run (cosine horizon)')
  ap.add_argument('--repeats', type=int, default=3, help='alternating runs of each')
  ap.add_argument('--target', type=float, default=1.88, help='validation loss to reach')
  ap.add_argument('--nanogpt', default=str(SHARED / 'peers' / 'nanoGPT'))
  ap.add_argument('--jaxlm_override', action='append', default=[],
                  help="a '--config.a.b=v' for the jaxlm runs (repeatable)")
  args = ap.parse_args(argv)
  root = prepare_nanogpt(Path(args.nanogpt), SHARED / 'data' / 'tinyshakespeare.txt')
  runs = {'nanogpt': [], 'jaxlm': []}
  try:
    for r in range(args.repeats):
      runs['nanogpt'].append(run_nanogpt(root, args.iters, args.target))
      runs['jaxlm'].append(run_jaxlm(args.iters, args.target, args.jaxlm_override))
      for name, rs in runs.items():
        print(f'run {r} {name:7s}: ' + ', '.join(
            f'{k} {_fmt(k, v)}' for k, v in rs[-1].items() if k != 'evals'), flush=True)
  finally:
    shutil.rmtree(root)
  # When a side never gets to the target, the fair wall-clock comparison is to the
  # loss every run reached: the highest final val loss of all runs.
  finals = [r['final_val'] for rs in runs.values() for r in rs]
  common = max(finals) if None not in finals else None  # None: a run too short to evaluate
  for rs in runs.values():
    for r in rs:
      r['wall_to_common'] = _wall_to(r.pop('evals'), common) if common else None
  med = {name: {k: _median(rs, k) for k in rs[0]} for name, rs in runs.items()}
  print(f'medians of {args.repeats} alternating runs, {args.iters} iterations each '
        f"(target val {args.target}; common val {_fmt('final_val', common)}, "
        'the highest final val of all runs):')
  for k in ('tokens_per_sec', 'wall_to_target', 'wall_to_common', 'startup', 'final_val'):
    j, n = med['jaxlm'][k], med['nanogpt'][k]
    ratio = f'{j / n:.2f}x' if j and n else 'n/a'
    print(f'  {k:15s} jaxlm {_fmt(k, j):>10s}   nanoGPT {_fmt(k, n):>10s}   jaxlm/nanoGPT {ratio}')
  return med


if __name__ == '__main__':
  main()
