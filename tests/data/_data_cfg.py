"""Config and corpus helpers shared by the data tests (tests/conftest.py belongs to others)."""

from pathlib import Path

from jaxlm.configs import base

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / '..' / 'shared' / 'data' / 'tinyshakespeare.txt'


def make_cfg(**data):
  """The base config with `data` fields overridden; small batches for fast tests."""
  cfg = base.get_config()
  cfg.data.seq_len = 16
  cfg.train.batch_size = 4
  cfg.eval.batches = 3
  for key, value in data.items():
    setattr(cfg.data, key, value)
  return cfg


def write_docs(folder: Path, docs, suffix='.txt'):
  """Writes each doc as its own file `doc_000.txt`, ... (sorted order = list order)."""
  folder.mkdir(parents=True, exist_ok=True)
  for i, doc in enumerate(docs):
    (folder / f'doc_{i:03d}{suffix}').write_text(doc, encoding='utf-8')
  return folder
