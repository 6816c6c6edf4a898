"""Loader tokens/s from a store in a GCS emulator bucket vs on local disk, at gpt2_small's batch.

    .venv/bin/python bench/bucket_loader.py [--repeats=4] [--batches=6] [--delays=0,0.05]

Needs the test-cloud extra (fake-gcs-server, gcsfs). Prepares
../shared/data/tinyshakespeare.txt repeated --repeats times (one document per
line, byte tokenizer) into a local store and into the emulator's bucket (timing
both prepares), then measures `DataPipeline.train_iterator()` with gpt2_small's
batch shape (512 x 1024, shuffled, default data.* settings: data.prefetch=0,
data.read_requests, data.read_ahead) in a fresh process per case:

  local       the store on this disk;
  gs          the bucket store, straight to the emulator on localhost;
  gs +50ms    the bucket store behind tests/cloud/delay_proxy.py, which adds each
              delay in --delays to every storage request (object stores answer in
              tens of ms).

Per case: tokens/s by wall clock over --batches batches after one warm-up batch, the
process's CPU seconds per million tokens, and its peak RSS (ru_maxrss). The
consumer does nothing with a batch, so tokens/s is what the loader can feed.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'tests' / 'cloud'))


def measure(path: str, batches: int) -> dict:
  """In this (fresh) process: the pipeline on `path`, timed (see module doc)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from jaxlm.configs import base  # noqa: PLC0415
  from jaxlm.data.pipeline import make_pipeline  # noqa: PLC0415
  cfg = base.get_config()
  cfg.data.source, cfg.data.path = 'arrayrecord', path
  cfg.data.seq_len, cfg.train.batch_size = 1024, 512
  t0 = time.perf_counter()
  pipe = make_pipeline(cfg)
  opened = time.perf_counter() - t0
  it = pipe.train_iterator()
  next(it)
  c0, t0 = time.process_time(), time.perf_counter()
  tokens = 0
  for _ in range(batches):
    tokens += next(it)['inputs'].size
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {'open_s': round(opened, 3), 'tokens_per_s': tokens / wall,
          'cpu_s_per_M_tokens': cpu / tokens * 1e6,
          'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _child(path: str, batches: int, env: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, '--measure', path, f'--batches={batches}'],
                       env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _prepare(inp: Path, out: str, env: dict) -> float:
  t0 = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'jaxlm', 'prepare', f'--input={inp}', f'--output={out}',
                  '--text_unit=line', '--workers=1', '--progress=false'], env=env, check=True,
                 capture_output=True)
  return time.perf_counter() - t0


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument('--measure', default='')
  ap.add_argument('--batches', type=int, default=6)
  ap.add_argument('--repeats', type=int, default=4)
  ap.add_argument('--delays', default='0,0.05')
  args = ap.parse_args()
  if args.measure:
    print(json.dumps(measure(args.measure, args.batches)))
    return
  from delay_proxy import DelayProxy  # noqa: PLC0415
  from gcs_emulator import Emulator  # noqa: PLC0415
  with tempfile.TemporaryDirectory(prefix='bucket_loader_') as tmp, Emulator() as emu:
    root = Path(tmp)
    corpus = root / 'corpus.txt'
    corpus.write_text(SHAKESPEARE.read_text() * args.repeats)
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), **emu.env)
    local, remote = str(root / 'store'), f'gs://{emu.bucket}/store'
    prep_local, prep_remote = _prepare(corpus, local, env), _prepare(corpus, remote, env)
    tokens = json.loads((root / 'store' / 'manifest.json').read_text())['tokens']
    print(f'store: {tokens:,} tokens; prepare local {prep_local:.1f} s = '
          f'{tokens / prep_local / 1e6:.2f}M tokens/s, into the bucket {prep_remote:.1f} s = '
          f'{tokens / prep_remote / 1e6:.2f}M tokens/s (--workers=1, fresh process)')
    rows = [('local', _child(local, args.batches, env))]
    for delay in [float(d) for d in args.delays.split(',')]:
      if delay:
        with DelayProxy(emu.url, delay) as proxy:
          slow = dict(env, STORAGE_EMULATOR_HOST=proxy.url)
          rows.append((f'gs +{delay * 1e3:.0f}ms', _child(remote, args.batches, slow)))
      else:
        rows.append(('gs', _child(remote, args.batches, env)))
  print('| store | tokens/s | CPU s per M tokens | peak RSS MB | open s |')
  print('|---|---|---|---|---|')
  for name, r in rows:
    print(f"| {name} | {r['tokens_per_s'] / 1e6:.2f}M | {r['cpu_s_per_M_tokens']:.3f} | "
          f"{r['peak_rss_mb']:.0f} | {r['open_s']} |")


if __name__ == '__main__':
  main()
