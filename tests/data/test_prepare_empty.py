"""`jaxlm prepare` that yields no document is an error (exit 2) naming the bad records."""

from jaxlm.cli import main as cli


def test_prepare_with_no_usable_document_exits_2_with_bad_record_counts(tmp_path, capsys):
  (tmp_path / 'bad.jsonl').write_text('{"x": 1}\n{"y": 2}\nnot json\n')
  assert cli.main(['prepare', f'--input={tmp_path / "bad.jsonl"}', '--format=jsonl',
                   f'--output={tmp_path / "store"}', '--workers=0', '--progress=False']) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if 'jaxlm: error:' in l]
  assert len(err) == 1, err
  assert 'no usable document' in err[0]
  assert 'missing_field 2' in err[0] and 'malformed_json 1' in err[0], err[0]
