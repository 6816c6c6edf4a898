"""Does the data path scale? Memory and startup of training from stores 10x apart; prepare cost.

    .venv/bin/python bench/data_scale.py [--repeats=20,200] [--workers=1,2] [--root=/tmp/x]

For each N in --repeats, ../shared/data/tinyshakespeare.txt repeated N times is
written as ONE text file (one document: N=200 gives 223M byte tokens), then:

  prepare   `jaxlm prepare --input=<file> --output=<store> --workers=W` per W in --workers,
            in a fresh process each: wall time, tokens/s, and peak RSS (wait4's
            ru_maxrss: the largest single process, main or tokenizer worker);
  train     `jaxlm train --config=tiny --config.data.source=arrayrecord
            --config.data.path=<store> --config.train.steps=5` in a fresh process: peak
            RSS, and seconds from process start to the first step's metrics line in
            metrics.jsonl (polled every 20 ms), as wall time and as the CPU time the
            process had used by then (compile included, with an empty compilation
            cache each run; on a shared machine the CPU figure is the comparable one);
  loader    `DataPipeline` in this process with gpt2_small's batch shape (512 x 1024,
            shuffled): construction time (opening the store), then tokens/s of
            `train_iterator()` over --batches batches after one warm-up, by wall clock
            and by this process's CPU time (other processes do not inflate the latter).

Stores and inputs stay under --root (large: N=200 needs ~0.7 GB) and are reused
when their manifest is complete, unless --fresh; prepare is timed only on fresh
stores.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'
sys.path.insert(0, str(REPO))


def cpu_seconds(pid: int) -> float:
  """User + system CPU seconds `pid` has used so far, all its threads (Linux /proc)."""
  fields = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


# Starts the command from a small Python (~10 MB), reports its PID, then its peak RSS from wait4.
# Spawning from this benchmark directly would not do: a child's peak RSS counts the memory
# of the process that forked it (here hundreds of MB after a loader timing).
_LAUNCH = """import os, sys
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
print(f'PID {pid}', flush=True)
_, status, usage = os.wait4(pid, 0)
print(f'MAXRSS {usage.ru_maxrss}', flush=True)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd, poll=None, env=None):
  """Runs `cmd`; returns (exit code, wall s, peak RSS bytes, (wall s, CPU s) when `poll()`)."""
  t0 = time.perf_counter()
  proc = subprocess.Popen([sys.executable, '-c', _LAUNCH, *cmd], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  pid = int(proc.stdout.readline().split()[1])
  first = None
  while poll is not None and first is None and proc.poll() is None:
    if poll():
      first = (time.perf_counter() - t0, cpu_seconds(pid))
    time.sleep(0.02)
  out = proc.stdout.read().decode(errors='replace')
  proc.wait()
  wall = time.perf_counter() - t0
  if proc.returncode:
    sys.stdout.write(out[-3000:])
  rss = int(out.rsplit('MAXRSS ', 1)[1].split()[0]) * 1024 if 'MAXRSS ' in out else 0
  return proc.returncode, wall, rss, first


def make_input(root: Path, repeats: int) -> Path:
  path = root / f'shakespeare_x{repeats}.txt'
  if not path.exists() or path.stat().st_size != SHAKESPEARE.stat().st_size * repeats:
    text = SHAKESPEARE.read_bytes()
    with open(path, 'wb') as f:
      for _ in range(repeats):
        f.write(text)
  return path


def complete(store: Path) -> bool:
  m = store / 'manifest.json'
  return m.exists() and json.loads(m.read_text()).get('complete', False)


def prepare(src: Path, store: Path, workers: int):
  shutil.rmtree(store, ignore_errors=True)
  cmd = [sys.executable, '-m', 'jaxlm', 'prepare', f'--input={src}', f'--output={store}',
         f'--workers={workers}', '--progress=false']
  rc, wall, rss, _ = run_measured(cmd)
  tokens = json.loads((store / 'manifest.json').read_text())['tokens'] if rc == 0 else 0
  return rc, wall, rss, tokens


def train(store: Path, workdir: Path):
  shutil.rmtree(workdir, ignore_errors=True)
  # An empty compilation cache per run: every run compiles, so runs compare (a warm shared
  # cache would skip compiling in whichever run happens to come second).
  cache = workdir.with_name(workdir.name + '_jit_cache')
  shutil.rmtree(cache, ignore_errors=True)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache))
  metrics = workdir / 'metrics.jsonl'
  cmd = [sys.executable, '-m', 'jaxlm', 'train', '--config=tiny',
         '--config.data.source=arrayrecord', f'--config.data.path={store}',
         '--config.train.steps=5', '--config.train.log_every=1', '--config.eval.every=0',
         '--config.checkpoint.every=0', f'--workdir={workdir}']
  return run_measured(cmd, poll=lambda: metrics.exists() and metrics.stat().st_size > 0, env=env)


def loader_rate(store: Path, batches: int):
  """(open s, wall tokens/s, CPU tokens/s) of gpt2_small-shaped batches from `store`."""
  from jaxlm.configs import gpt2_small  # noqa: PLC0415
  from jaxlm.data.pipeline import DataPipeline  # noqa: PLC0415
  from jaxlm.data.tokenizers import ByteTokenizer  # noqa: PLC0415
  cfg = gpt2_small.get_config()
  cfg.data.tokenizer, cfg.data.tokenizer_path = 'byte', ''
  cfg.data.source, cfg.data.path = 'arrayrecord', str(store)
  t0 = time.perf_counter()
  pipe = DataPipeline(cfg, ByteTokenizer())
  opened = time.perf_counter() - t0
  it = pipe.train_iterator()
  next(it)
  t0, c0 = time.perf_counter(), time.process_time()
  for _ in range(batches):
    next(it)
  tokens = batches * pipe.local_batch * pipe.seq_len
  return opened, tokens / (time.perf_counter() - t0), tokens / (time.process_time() - c0)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--repeats', default='20,200', help='store sizes, as copies of the text')
  ap.add_argument('--workers', default='1,2', help='prepare --workers values to time')
  ap.add_argument('--root', default='/tmp/jaxlm_scale', help='inputs, stores and workdirs')
  ap.add_argument('--batches', type=int, default=8, help='loader batches per timing')
  ap.add_argument('--fresh', action='store_true', help='prepare again even if stores exist')
  args = ap.parse_args(argv)
  root = Path(args.root)
  root.mkdir(parents=True, exist_ok=True)
  print(f'{time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, {os.cpu_count()} CPUs, '
        f'load average {os.getloadavg()[0]:.1f}')
  ok = True
  for n in [int(x) for x in args.repeats.split(',')]:
    src = make_input(root, n)
    store = root / f'store_x{n}'
    if args.fresh or not complete(store):
      for w in [int(x) for x in args.workers.split(',')]:
        rc, wall, rss, tokens = prepare(src, store, w)
        ok &= rc == 0
        print(f'x{n} prepare --workers={w}: {tokens:,} tokens in {wall:.1f} s = '
              f'{tokens / wall / 1e6:.1f}M tokens/s, peak RSS {rss / 2**20:,.0f} MB')
    m = json.loads((store / 'manifest.json').read_text())
    size = sum(f.stat().st_size for f in store.iterdir())
    rc, wall, rss, first = train(store, root / f'run_x{n}')
    ok &= rc == 0 and first is not None
    first = first or (float('nan'), float('nan'))
    print(f"x{n} train (store {m['tokens']:,} tokens, {size / 2**20:,.0f} MB): peak RSS "
          f'{rss / 2**20:,.0f} MB, start to first step {first[0]:.2f} s wall / {first[1]:.2f} '
          f'CPU s, exit after {wall:.1f} s')
    opened, rate, cpu_rate = loader_rate(store, args.batches)
    print(f'x{n} loader (512 x 1024, shuffled): opened in {opened * 1e3:.0f} ms; '
          f'{rate / 1e6:.2f}M tokens/s wall, {cpu_rate / 1e6:.2f}M tokens/s per CPU second')
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f'this process peak RSS {peak:,.0f} MB')
  return 0 if ok else 1


if __name__ == '__main__':
  sys.exit(main())
