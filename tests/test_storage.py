"""jaxlm.core.storage on local paths, and the one-line error when a cloud package is missing.

The same functions on gs:// run against a real GCS server in tests/cloud (make test-cloud).
"""

import importlib.util

from jaxlm.cli.main import main
from jaxlm.core import storage


def test_write_atomic_append_and_text_log(tmp_path):
  p = tmp_path / 'a' / 'config.json'
  storage.write_atomic(p, '{"x": 1}')
  storage.write_atomic(p, '{"x": 2}')
  assert p.read_text() == '{"x": 2}' and sorted(x.name for x in p.parent.iterdir()) == ['config.json']
  storage.append_text(tmp_path / 's.txt', 'a\n')
  storage.append_text(tmp_path / 's.txt', 'b\n')
  assert (tmp_path / 's.txt').read_text() == 'a\nb\n'
  log = storage.TextLog(tmp_path / 'm.jsonl')
  log.write('1\n')
  log.write('2\n')
  assert (tmp_path / 'm.jsonl').read_text() == '1\n2\n'  # flushed per write locally
  log.replace([l for l in log.lines() if l != '2\n'])
  log.write('3\n')
  log.close()
  assert (tmp_path / 'm.jsonl').read_text() == '1\n3\n'


def test_create_exclusive_only_once(tmp_path):
  assert storage.create_exclusive(tmp_path / 'lock', b'first')
  assert not storage.create_exclusive(tmp_path / 'lock', b'second')
  assert storage.read_bytes_or_none(tmp_path / 'lock') == b'first'
  assert storage.read_bytes_or_none(tmp_path / 'none') is None
  assert sorted(x.name for x in tmp_path.iterdir()) == ['lock']  # no temp files left


def test_missing_cloud_package_is_one_line_naming_the_extra(monkeypatch, capsys, tmp_path, repo):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'gcsfs' else real(name, *a))
  monkeypatch.chdir(tmp_path)
  code = main(['train', '--config=tiny', '--workdir=gs://bucket/run',
               f'--config.data.path={repo.parent}/shared/data/tinyshakespeare.txt'])
  err = capsys.readouterr().err
  assert code == 2 and 'Traceback' not in err, err
  assert err.strip().splitlines()[-1] == (
      "jaxlm: error: 'gs://bucket/run' needs the gcsfs package: pip install 'jaxlm[cloud]'")
  assert list(tmp_path.iterdir()) == []
