"""A corpus of many JSONL and Parquet files with bad records (the cloud and beam tests' input)."""

import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO.parent / 'shared' / 'data' / 'tinyshakespeare.txt'

BAD_LINES = [b'\xff\xfe not utf-8', b'', b'{"text": "  "}', b'{"text": "unterminated',
             b'{"body": "no text field"}', b'{"text": 7}']


def _docs():
  lines = [l for l in SHAKESPEARE.read_text().split('\n') if l.strip()][:3000]
  return [' '.join(lines[i:i + 6]) for i in range(0, len(lines), 6)]  # 500 documents


def write_corpus(folder: Path, copies: int = 1):
  """500 documents per copy: 10 JSONL files per copy with bad lines among them, and 5 Parquet
  files per copy with nulls (row groups of 30)."""
  import pyarrow as pa  # noqa: PLC0415
  import pyarrow.parquet as pq  # noqa: PLC0415
  docs = _docs() * copies
  (folder / 'jsonl').mkdir(parents=True)
  (folder / 'parquet').mkdir()
  for f in range(10 * copies):
    lines = []
    for i, d in enumerate(docs[f * 50:(f + 1) * 50]):
      lines.append(json.dumps({'text': d}).encode())
      if i % 9 == 0:
        lines.append(BAD_LINES[(f + i) % len(BAD_LINES)])
    (folder / 'jsonl' / f'part-{f:02d}.jsonl').write_bytes(b'\n'.join(lines) + b'\n')
  for f in range(5 * copies):
    part = docs[f * 100:(f + 1) * 100]
    texts = [None if i % 17 == 3 else d for i, d in enumerate(part)]
    pq.write_table(pa.table({'text': texts}), folder / 'parquet' / f'part-{f:02d}.parquet',
                   row_group_size=30)
  return folder
