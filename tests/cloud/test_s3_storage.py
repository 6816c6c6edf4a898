"""jaxlm.core.storage and the workdir lock on s3:// against moto's S3 server on localhost.

Part of make test-cloud. Covers the path layer (config.json, metrics.jsonl, the
lock's create-if-absent, heartbeat, release) on S3, and a token store prepared into S3
(batches equal to the same store on disk); full training runs on an
object store are tested on gs:// (test_workdir_e2e.py). s3fs and botocore find
the server through AWS_ENDPOINT_URL, their documented variable.
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.cloud, pytest.mark.skipif(
    not (Path(sys.executable).parent / 'moto_server').exists(),
    reason="needs pip install -e '.[test-cloud]' (moto's S3 server)")]


@pytest.fixture(scope='module')
def s3(tmp_path_factory):
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([str(Path(sys.executable).parent / 'moto_server'), '-H', '127.0.0.1',
                           '-p', str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f'http://127.0.0.1:{port}'
  env = {'AWS_ENDPOINT_URL': url, 'AWS_ACCESS_KEY_ID': 'test', 'AWS_SECRET_ACCESS_KEY': 'test',
         'AWS_DEFAULT_REGION': 'us-east-1'}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(urllib.request.Request(f'{url}/jaxlm-test', method='PUT'), timeout=5)
        break
      except (urllib.error.URLError, ConnectionError):
        assert time.time() < deadline and proc.poll() is None, 'moto_server did not start'
        time.sleep(0.3)
    yield 's3://jaxlm-test'
  finally:
    proc.terminate()
    proc.wait(10)
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def test_config_metrics_and_lock_on_s3(s3, tmp_path, monkeypatch):
  from jaxlm.configs import tiny  # noqa: PLC0415
  from jaxlm.core import config as config_lib  # noqa: PLC0415
  from jaxlm.core import storage  # noqa: PLC0415
  from jaxlm.run import lock as lock_lib  # noqa: PLC0415
  monkeypatch.chdir(tmp_path)
  work = f'{s3}/run'
  cfg = tiny.get_config()
  config_lib.save(cfg, work)
  assert config_lib.load_saved(work).to_dict() == cfg.to_dict()
  log = storage.TextLog(storage.join(work, 'metrics.jsonl'), upload_every=3600)
  log.write('{"step": 1}\n')
  log.write('{"step": 2}\n')
  log.close()  # uploads once, at the end
  log = storage.TextLog(storage.join(work, 'metrics.jsonl'))
  log.replace(log.lines()[:1])
  assert storage.read_text(storage.join(work, 'metrics.jsonl')) == '{"step": 1}\n'

  held = lock_lib.WorkdirLock(work, heartbeat_every=0.0)
  held.acquire()
  with pytest.raises(lock_lib.LockError, match=f'PID {os.getpid()}'):
    lock_lib.WorkdirLock(work).acquire()  # create-if-absent refused by the server
  first = json.loads(storage.read_text(storage.join(work, lock_lib.NAME)))['heartbeat']
  time.sleep(0.01)
  held.heartbeat()
  assert json.loads(storage.read_text(storage.join(work, lock_lib.NAME)))['heartbeat'] > first
  held.release()
  assert storage.read_bytes_or_none(storage.join(work, lock_lib.NAME)) is None
  assert os.listdir(tmp_path) == []  # nothing under a local s3: folder


def test_token_store_prepared_into_s3_reads_like_the_local_one(s3, tmp_path, monkeypatch):
  import numpy as np  # noqa: PLC0415
  from jaxlm.configs import base  # noqa: PLC0415
  from jaxlm.data import prepare  # noqa: PLC0415
  from jaxlm.data.pipeline import make_pipeline  # noqa: PLC0415
  text = tmp_path / 'corpus.txt'
  text.write_text((Path(__file__).resolve().parents[3] / 'shared' / 'data' /
                   'tinyshakespeare.txt').read_text()[:200_000])
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  for out in (tmp_path / 'local', f'{s3}/store'):
    prepare.prepare(str(text), out, text_unit='line', docs_per_shard=1000)
  assert os.listdir(cwd) == []  # nothing under a local s3: folder
  batches = []
  for path in (tmp_path / 'local', f'{s3}/store'):
    cfg = base.get_config()
    cfg.data.source, cfg.data.path, cfg.data.seq_len = 'arrayrecord', str(path), 64
    pipe = make_pipeline(cfg)
    it = pipe.train_iterator()
    batches.append([next(it) for _ in range(5)] + pipe.eval_batches())
  assert make_pipeline(cfg).store.remote
  for w, g in zip(*batches, strict=True):
    for k in w:
      np.testing.assert_array_equal(w[k], g[k])
