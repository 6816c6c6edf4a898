"""A run owns its tokenizer: ``<workdir>/tokenizer/<file>``, recorded in config.json.

A run trained with ``tok/tokenizer.json`` must decode with that file's vocabulary
forever, even after the original is retrained in place or moved. So a new run
copies the file into its workdir (a 'char' tokenizer writes its alphabet, not
the whole text it came from), points ``data.tokenizer_path`` at the copy and
records ``data.tokenizer_sha256`` and ``data.tokenizer_vocab``; eval, generate,
finetune, export and resume read the saved config and so the copy, and
``get_tokenizer`` refuses a file whose content no longer matches the record.

Two steps, because a refused run must write nothing: ``plan`` (no writes, before
the checks) and ``install`` (the copy, right before config.json is written).
"""

import dataclasses
import hashlib
import logging
import os
from pathlib import Path

from jaxlm.core import storage
from jaxlm.core.errors import ConfigError

log = logging.getLogger('jaxlm')
DIRNAME = 'tokenizer'


def source_file(data_cfg) -> Path | None:
  """The file that defines the tokenizer of ``data_cfg`` (None for 'byte')."""
  kind = data_cfg.tokenizer
  if kind == 'byte':
    return None
  where = data_cfg.tokenizer_path or (data_cfg.path if kind == 'char' else '')
  if not where:
    return None
  p = Path(where).expanduser()
  return p / 'tokenizer.json' if p.is_dir() else p


def sha256_of(path) -> str:
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 24):
      h.update(chunk)
  return h.hexdigest()


@dataclasses.dataclass
class Pending:
  """What ``install`` writes: ``content`` (bytes) at ``<workdir>/tokenizer/<name>``."""
  name: str
  content: bytes
  sha256: str
  vocab: int


def plan(cfg, workdir: str, tokenizer) -> Pending | None:
  """What this run's tokenizer copy will be (nothing is written), or None when there is
  none to make: a 'byte' tokenizer, or a resumed run (``adopt_saved`` handles that)."""
  src = source_file(cfg.data)
  if src is None:
    return None
  if cfg.data.tokenizer == 'char':  # the alphabet, not the (maybe huge) text it came from
    content = ''.join(tokenizer.decode(list(range(tokenizer.vocab_size)))).encode('utf-8')
    name = 'alphabet.txt'
  else:
    content = src.read_bytes()
    name = src.name
  return Pending(name, content, hashlib.sha256(content).hexdigest(), tokenizer.vocab_size)


def adopt_saved(cfg, saved) -> None:
  """On resume: the run keeps the tokenizer copy its config.json records (``saved``, the
  saved config), whatever ``cfg`` names; a note says so when the two differ."""
  d, old = cfg.data, saved.data
  if not old.get('tokenizer_sha256'):
    return  # a run from before workdirs owned tokenizers: as it was
  given = source_file(d)
  if given is not None and str(given) != old.tokenizer_path and given.is_file() and \
      d.tokenizer != 'char' and sha256_of(given) != old.tokenizer_sha256:
    log.warning("tokenizer: %s differs from the one this run was trained with; resuming with "
                "the run's own copy %s", given, old.tokenizer_path)
  with cfg.unlocked():
    d.tokenizer_path = old.tokenizer_path
    d.tokenizer_sha256, d.tokenizer_vocab = old.tokenizer_sha256, old.tokenizer_vocab


def install(cfg, workdir: str, pending: Pending | None, write: bool = True):
  """Writes the copy (``write``: this process writes) and points ``cfg`` at it."""
  if pending is None:
    return cfg
  dst = storage.join(storage.absolute(workdir), DIRNAME, pending.name)
  if write:
    _write_bytes(dst, pending.content)
  with cfg.unlocked():
    cfg.data.tokenizer_path = dst
    cfg.data.tokenizer_sha256, cfg.data.tokenizer_vocab = pending.sha256, pending.vocab
  return cfg


def _write_bytes(dst: str, content: bytes) -> None:
  """Whole or not at all (a .model file is binary: storage.write_atomic writes text)."""
  target = storage.path(dst)
  target.parent.mkdir(parents=True, exist_ok=True)
  if storage.is_remote(dst):
    target.write_bytes(content)  # an object upload commits whole
    return
  tmp = target.parent / f'.{target.name}.tmp'
  tmp.write_bytes(content)
  os.replace(tmp, target)


def check(data_cfg, path: Path) -> None:
  """ConfigError if ``path`` no longer holds the tokenizer config.json recorded."""
  want = getattr(data_cfg, 'tokenizer_sha256', '')
  if not want or not path.is_file():
    return
  if sha256_of(path) != want:
    raise ConfigError(f"tokenizer file '{path}' has changed since the run recorded it "
                      f'(sha256 {want[:12]}...): restore it or use a new --workdir')
