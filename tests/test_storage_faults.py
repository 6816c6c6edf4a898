"""Any exception a storage client raises while saving, uploading metrics or refreshing the lock
is one StorageError line (exit 4), whatever its type."""

import pytest

from jaxlm.checkpoint.checkpointer import Checkpointer
from jaxlm.core.errors import EXIT_STORAGE, StorageError
from jaxlm.run import lock as lock_lib
from jaxlm.run import metrics


class HttpError(Exception):
  """Stands in for gcsfs.retry.HttpError / botocore's ClientError: not an OSError."""


def test_an_orbax_wait_failing_with_any_type_is_a_storage_error(tmp_path, tiny_cfg):
  ckpt = Checkpointer(str(tmp_path), tiny_cfg.checkpoint)
  with pytest.raises(StorageError) as e:
    with ckpt._storage(10, ckpt.directory):  # what save/check/wait/close run inside
      raise ValueError('Malformed StorageGeneration: "abc"\n' + 'tensorstore detail\n' * 100)
  ckpt.close()
  assert e.value.exit_code == EXIT_STORAGE
  msg = str(e.value)
  assert 'saving checkpoint step 10' in msg and 'ValueError: Malformed StorageGeneration' in msg
  assert '\n' not in msg and 'latest committed checkpoint: none' in msg


def test_a_metrics_upload_failing_with_any_type_is_a_storage_error(tmp_path, monkeypatch):
  writer = metrics.MetricsWriter(str(tmp_path))

  def fail(_):
    raise HttpError('503 Service Unavailable, retries exhausted')

  monkeypatch.setattr(writer._jsonl, 'write', fail)
  with pytest.raises(StorageError, match='HttpError: 503 Service Unavailable'):
    writer.write(3, {'train/loss': 1.0})
  writer.close(quiet=True)


def test_a_lock_heartbeat_failing_with_any_type_is_a_storage_error(tmp_path, monkeypatch):
  lock = lock_lib.WorkdirLock(str(tmp_path))
  lock.acquire()

  def fail():
    raise HttpError('403 Forbidden')

  monkeypatch.setattr(lock, '_owner_token', fail)
  with pytest.raises(StorageError, match='refreshing the workdir lock .* failed: HttpError: 403'):
    lock.heartbeat(force=True)
  monkeypatch.undo()
  lock.release()
