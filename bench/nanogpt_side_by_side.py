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
- final val loss on the whole validation split (nanoGPT's last 10% of the
  text, all 1,740 windows of 64 in batches of 12), the same windows for both
  final models, evaluated after all runs: each side's own eval sees a
  different 15,360-token sample (nanoGPT: random windows; jaxlm: the split's
  first 240 windows), which can differ from the whole split by ~0.02;
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

import numpy as np

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


def run_nanogpt(root: Path, iters: int, target: float, keep: Path | None = None,
                eval_every: int = 250) -> dict:
  """One run of nanoGPT's documented command; its final model is copied to ``keep``.

  ``iters`` must be a multiple of ``eval_every`` (nanoGPT's eval_interval) for
  the final model to be saved.
  """
  cmd = [sys.executable, 'train.py', 'config/train_shakespeare_char.py', '--device=cpu',
         '--compile=False', '--eval_iters=20', '--log_interval=1', '--block_size=64',
         '--batch_size=12', '--n_layer=4', '--n_head=4', '--n_embd=128', f'--max_iters={iters}',
         f'--lr_decay_iters={iters}', '--dropout=0.0', f'--eval_interval={eval_every}',
         f'--always_save_checkpoint={keep is not None}']
  step_ms, eval_ms, evals, first_step = [], [], [], None
  for t, line in _stream(cmd, root, os.environ):
    if m := ITER.match(line):
      it, ms = int(m[1]), float(m[3])
      if first_step is None:
        first_step = t  # iteration 0 is printed when it has finished
      if it % eval_every and it:
        step_ms.append(ms)
      elif it:
        eval_ms.append(ms)  # an eval iteration's time includes the eval
    elif m := EVAL.match(line):
      evals.append((t, float(m[3])))
  step = statistics.median(step_ms)
  # nanoGPT also evaluates before its first step, jaxlm does not: that eval (the
  # median eval iteration less a step) is taken out of its startup.
  first_eval = (statistics.median(eval_ms) - step) / 1e3 if eval_ms else 0.0
  if keep is not None:  # saved at its last eval (iteration `iters`)
    shutil.copy(root / 'out-shakespeare-char' / 'ckpt.pt', keep)
  return _result(12 * 64 / (step / 1e3), evals, first_step - first_eval, target)


def _result(tokens_per_sec, evals, startup, target) -> dict:
  """One run's figures; `evals` is [(seconds from process start, val loss)] in order."""
  return {'tokens_per_sec': tokens_per_sec, 'wall_to_target': _wall_to(evals, target),
          'startup': startup, 'final_val': evals[-1][1] if evals else None, 'evals': evals}


def _wall_to(evals, target):
  """Seconds from process start to the first eval with val loss <= target (None: never)."""
  return next((t for t, v in evals if v <= target), None)


def run_jaxlm(iters: int, target: float, overrides=(), workdir: str = '') -> dict:
  """One run through bench/shakespeare.py; its workdir is deleted unless given."""
  keep = bool(workdir)
  workdir = workdir or tempfile.mkdtemp(prefix='jaxlm_sbs_')
  cmd = [sys.executable, str(REPO / 'bench' / 'shakespeare.py'),
         '--config=shakespeare_char_nanogpt', f'--target={target}', f'--workdir={workdir}',
         '--keep_going', f'--config.train.steps={iters}', '--config.train.log_every=10',
         f"--config.data.path={SHARED / 'data' / 'tinyshakespeare.txt'}",
         '--config.train.progress=False', *overrides]
  evals, startup, verdict, last = [], None, None, None
  # bench/shakespeare.py exits 1 when the target is not reached: a result here
  # (a short or unlucky run), an error only if it printed no verdict.
  for _, line in _stream(cmd, REPO, os.environ, ok=(0, 1)):
    if line.startswith(('REACHED', 'NOT REACHED')):
      verdict = line
    elif m := re.match(r'^first step done: ([\d.]+) s', line):
      startup = float(m[1])
    elif m := re.match(r'^step +(\d+) +([\d.]+) s +val loss ([\d.]+)', line):
      evals.append((float(m[2]), float(m[3])))
    elif m := re.match(r'^final val loss ([\d.]+)', line):
      last = float(m[1])  # also after runs too short for a timed eval
  if verdict is None:
    raise RuntimeError(f'{cmd[:3]} failed before training finished')
  rows = [json.loads(l) for l in Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  if not keep:
    shutil.rmtree(workdir)
  rates = [r['train/tokens_per_sec'] for r in rows if 'train/tokens_per_sec' in r]
  # The first window holds the compile.
  return {**_result(statistics.median(rates[1:] or rates), evals, startup, target),
          'final_val': last}


def val_windows(text: str) -> list:
  """The whole validation split as windows of 65 characters (64 inputs, 64 targets).

  nanoGPT's prepare.py holds out the last 10% of the characters; jaxlm's
  data.val_fraction 0.1 holds out the same tokens (bytes are characters here).
  Whole batches of 12 only, as both evals run them.
  """
  val = text[int(len(text) * 0.9):]
  n = (len(val) - 1) // 64 // 12 * 12
  return [val[i * 64:i * 64 + 65] for i in range(n)]


def nanogpt_full_val(root: Path, ckpt: Path, windows: list) -> float:
  """Mean loss of a nanoGPT checkpoint over ``windows``, with nanoGPT's own model code."""
  import pickle  # noqa: PLC0415
  import torch  # noqa: PLC0415
  sys.path.insert(0, str(root))
  try:
    from model import GPT, GPTConfig  # noqa: PLC0415  (nanoGPT's model.py, not copied)
  finally:
    sys.path.remove(str(root))
  saved = torch.load(ckpt, map_location='cpu')
  model = GPT(GPTConfig(**saved['model_args']))
  model.load_state_dict({k.removeprefix('_orig_mod.'): v for k, v in saved['model'].items()})
  model.eval()
  stoi = pickle.loads((root / 'data' / 'shakespeare_char' / 'meta.pkl').read_bytes())['stoi']
  ids = torch.tensor([[stoi[c] for c in w] for w in windows])
  with torch.no_grad():
    losses = [float(model(b[:, :-1].contiguous(), b[:, 1:].contiguous())[1])
              for b in ids.split(12)]
  return statistics.fmean(losses)


def jaxlm_full_val(workdir: str, windows: list) -> float:
  """Mean loss of a jaxlm workdir's last checkpoint over ``windows``, with its eval step."""
  from jaxlm.data.packing import batch_from_documents  # noqa: PLC0415
  from jaxlm.data.tokenizers import get_tokenizer  # noqa: PLC0415
  from jaxlm.engine import build as engine  # noqa: PLC0415
  loaded = engine.load(workdir)
  tok = get_tokenizer(loaded.cfg.data)
  rows = [[(tok.encode(w), np.ones(64, np.float32))] for w in windows]
  batches = [batch_from_documents(rows[i:i + 12], 64) for i in range(0, len(rows), 12)]
  return loaded.setup.eval_loss(loaded.params, batches)


def _fmt(key, v) -> str:
  return '-' if v is None else f'{v:.4f}' if key.endswith('val') else f'{v:,.2f}'


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
  ap.add_argument('--no-full_val', dest='full_val', action='store_false',
                  help='skip evaluating the final models on the whole validation split')
  args = ap.parse_args(argv)
  text = SHARED / 'data' / 'tinyshakespeare.txt'
  root = prepare_nanogpt(Path(args.nanogpt), text)
  models = Path(tempfile.mkdtemp(prefix='sbs_models_'))
  runs = {'nanogpt': [], 'jaxlm': []}
  try:
    for r in range(args.repeats):
      keep = models / f'nanogpt_{r}.pt' if args.full_val else None
      runs['nanogpt'].append(run_nanogpt(root, args.iters, args.target, keep))
      workdir = str(models / f'jaxlm_{r}') if args.full_val else ''
      runs['jaxlm'].append(run_jaxlm(args.iters, args.target, args.jaxlm_override, workdir))
      for name, rs in runs.items():
        print(f'run {r} {name:7s}: ' + ', '.join(
            f'{k} {_fmt(k, v)}' for k, v in rs[-1].items() if k != 'evals'), flush=True)
    if args.full_val:  # after the timed runs, so neither side's timing shares the host with it
      windows = val_windows(text.read_text(encoding='utf-8'))
      for r in range(args.repeats):
        runs['nanogpt'][r]['full_val'] = nanogpt_full_val(root, models / f'nanogpt_{r}.pt', windows)
        runs['jaxlm'][r]['full_val'] = jaxlm_full_val(str(models / f'jaxlm_{r}'), windows)
        print(f"run {r} final models on the whole validation split ({len(windows)} windows): "
              f"nanoGPT {runs['nanogpt'][r]['full_val']:.4f}, jaxlm {runs['jaxlm'][r]['full_val']:.4f}",
              flush=True)
  finally:
    shutil.rmtree(root)
    shutil.rmtree(models)
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
  for k in ('tokens_per_sec', 'wall_to_target', 'wall_to_common', 'startup', 'final_val',
            *(('full_val',) if args.full_val else ())):
    j, n = med['jaxlm'][k], med['nanogpt'][k]
    ratio = f'{j / n:.2f}x' if j and n else 'n/a'
    print(f'  {k:15s} jaxlm {_fmt(k, j):>10s}   nanoGPT {_fmt(k, n):>10s}   jaxlm/nanoGPT {ratio}')
  return med


if __name__ == '__main__':
  main()
