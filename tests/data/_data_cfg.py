"""Config and corpus helpers shared by the data tests (tests/conftest.py belongs to others)."""

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / '..' / 'shared' / 'data' / 'tinyshakespeare.txt'


def _load_base():
  spec = importlib.util.spec_from_file_location('_jaxlm_configs_base', REPO / 'configs' / 'base.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


_BASE = _load_base()


def make_cfg(**data):
  """The base config with `data` fields overridden; small batches for fast tests."""
  cfg = _BASE.get_config()
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
