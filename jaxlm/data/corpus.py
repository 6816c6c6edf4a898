"""Raw documents from text, JSONL and Parquet files, with bad records counted instead of fatal.

Shared by `jaxlm prepare` and `jaxlm tokenizer train`. A reader yields, in a
fixed order (the sorted files of each glob, globs in the order given, then
line or row order), either a document's text, a `Long` document (a text file
over `PIECE_BYTES`, read piece by piece so it is never held whole), or a `Bad`
naming why a record was dropped:

  invalid_utf8    bytes that do not decode as UTF-8
  empty           a record with no text (blank line, whitespace-only document)
  malformed_json  a JSONL line that is not JSON
  missing_field   a JSON value / Parquet row without a string in the text field
  no_tokens       text the tokenizer turned into no tokens (counted by `jaxlm prepare`)

Inputs may be on object storage (`gs://bucket/raw/*.parquet`, `s3://...`): they are
listed and streamed through `jaxlm.core.storage` (fsspec), never copied whole to disk.
A local file is a `Path`, a remote one its URI string.
"""

import codecs
import collections
import dataclasses
import glob
import json
from pathlib import Path
from typing import Dict, Iterator, List, Union

from jaxlm.core import storage
from jaxlm.core.errors import DataError

FORMATS = ('text', 'jsonl', 'parquet')
TEXT_UNITS = ('file', 'line')
BAD_KINDS = ('invalid_utf8', 'empty', 'malformed_json', 'missing_field', 'no_tokens')
_PARQUET_BATCH = 4096  # rows per Arrow batch: bounded memory on files of any size
PIECE_BYTES = 4 << 20  # a text file larger than this is one document read in pieces of this size


@dataclasses.dataclass(frozen=True)
class Bad:
  """A dropped record; `kind` is one of `BAD_KINDS`."""
  kind: str


@dataclasses.dataclass(frozen=True)
class Long:
  """One document too large to hold whole: a text file read back in pieces (`pieces()`)."""
  path: Union[Path, str]

  def pieces(self) -> Iterator[str]:
    """The file's text in order, in pieces of about `PIECE_BYTES`, each cut after a newline.

    Cutting at line ends keeps a tokenizer's merges within lines; only where a
    piece holds no newline is it cut mid-line (at a character boundary).
    """
    decoder = codecs.getincrementaldecoder('utf-8')()
    carry = ''
    with open_input(self.path) as f:
      while True:
        raw = f.read(PIECE_BYTES)
        text = carry + decoder.decode(raw, final=not raw)
        if not raw:
          if text:
            yield text
          return
        cut = text.rfind('\n') + 1 or len(text)
        carry = text[cut:]
        if cut:
          yield text[:cut]


Record = Union[str, Long, Bad]


def texts(record: Record) -> Iterator[str]:
  """A record's text as one or more pieces (a `Long` one's pieces; none for a `Bad` one)."""
  if isinstance(record, str):
    yield record
  elif isinstance(record, Long):
    yield from record.pieces()


def define_input_flags(fv) -> None:
  """The corpus-reading flags shared by `jaxlm prepare` and `jaxlm tokenizer train`."""
  from absl import flags  # noqa: PLC0415
  flags.DEFINE_string('input', None, 'files, directories or globs, comma-separated', flag_values=fv)
  flags.DEFINE_enum('format', 'text', FORMATS, 'input format', flag_values=fv)
  flags.DEFINE_string('field', 'text', 'JSONL key / Parquet column holding the text',
                      flag_values=fv)
  flags.DEFINE_enum('text_unit', 'file', TEXT_UNITS,
                    "--format=text: one document per 'file' or per 'line'", flag_values=fv)


def open_input(path: Union[Path, str]):
  """A binary file object for a local input file or a gs:// / s3:// object (streamed)."""
  return storage.path(path).open('rb') if storage.is_remote(path) else open(path, 'rb')


def input_size(path: Union[Path, str]) -> int:
  return storage.size(path)


def describe(path: Union[Path, str]) -> List:
  """[where, size in bytes] of an input file, as a store manifest records it."""
  return [str(path) if storage.is_remote(path) else str(Path(path).resolve()), input_size(path)]


def match_inputs(spec: str, flag: str = '--input') -> List[Union[Path, str]]:
  """'GLOB[,GLOB...]' (files, directories or globs) -> the files, each glob's sorted in turn.

  A directory (or a bucket prefix) stands for every file under it. A file matched
  by two globs is read once. Local files are `Path`s, gs:// / s3:// objects URIs.
  """
  files: List[Union[Path, str]] = []
  for part in [p.strip() for p in spec.split(',') if p.strip()]:
    p = Path(part).expanduser()
    if storage.is_remote(part):
      try:
        found = storage.glob_files(part)
      except (OSError, ValueError) as e:
        raise DataError(f"{flag} '{part}' cannot be listed: {e}") from None
      if not found:
        raise DataError(f"{flag} '{part}' matched no files")
    elif glob.has_magic(part):
      found = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    elif p.is_dir():
      found = sorted(f for f in p.rglob('*') if f.is_file())
    elif p.is_file():
      found = [p]
    else:
      raise DataError(f"{flag} '{part}' does not exist")
    if not found:
      raise DataError(f"{flag} '{part}' matched no files")
    files += [f for f in found if f not in files]
  if not files:
    raise DataError(f'{flag} is empty; give files, directories or globs, comma-separated')
  return files


def read_records(files: List[Path], fmt: str, field: str = 'text',
                 text_unit: str = 'file') -> Iterator[Record]:
  """Every record of `files` in order: its text, or a `Bad` (see module doc)."""
  if fmt not in FORMATS:
    raise DataError(f"--format '{fmt}' is not one of {', '.join(FORMATS)}")
  if text_unit not in TEXT_UNITS:
    raise DataError(f"--text_unit '{text_unit}' is not one of {', '.join(TEXT_UNITS)}")
  read = {'text': lambda f: _text(f, text_unit), 'jsonl': lambda f: _jsonl(f, field),
          'parquet': lambda f: _parquet(f, field)}[fmt]
  for f in files:
    yield from read(f)


def _checked(text: str) -> Record:
  return text if text.strip() else Bad('empty')


def _decode(raw: bytes) -> Record:
  try:
    return _checked(raw.decode('utf-8'))
  except UnicodeDecodeError:
    return Bad('invalid_utf8')


def _text(path, unit: str) -> Iterator[Record]:
  if unit == 'file' and input_size(path) > PIECE_BYTES:
    yield _check_long(path)
    return
  if unit == 'file':
    with open_input(path) as f:
      yield _decode(f.read())
    return
  with open_input(path) as lines:
    for line in lines:
      yield _decode(line.rstrip(b'\r\n'))


def _check_long(path: Path) -> Record:
  """A `Long` record for `path`, or the `Bad` the whole file would be (one streaming pass)."""
  decoder = codecs.getincrementaldecoder('utf-8')()
  blank = True
  with open_input(path) as f:
    while True:
      raw = f.read(PIECE_BYTES)
      try:
        text = decoder.decode(raw, final=not raw)
      except UnicodeDecodeError:
        return Bad('invalid_utf8')
      blank = blank and not text.strip()
      if not raw:
        return Bad('empty') if blank else Long(path)


def _jsonl(path, field: str) -> Iterator[Record]:
  with open_input(path) as lines:
    for raw in lines:
      line = _decode(raw)
      if isinstance(line, Bad):
        yield line
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError:
        yield Bad('malformed_json')
        continue
      text = obj.get(field) if isinstance(obj, dict) else None
      yield _checked(text) if isinstance(text, str) else Bad('missing_field')


def _parquet(path, field: str) -> Iterator[Record]:
  if not storage.is_remote(path):
    yield from _parquet_rows(path, path, field)
    return
  with open_input(path) as f:  # row groups are read by ranged reads of the object
    yield from _parquet_rows(f, path, field)


def _parquet_rows(source, path, field: str) -> Iterator[Record]:
  try:
    import pyarrow.parquet as pq  # noqa: PLC0415  (only Parquet users pay the import)
  except ImportError:
    raise DataError('--format=parquet needs pyarrow: pip install pyarrow') from None
  try:
    pf = pq.ParquetFile(source)
  except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants on non-Parquet files
    raise DataError(f"'{path}' is not a Parquet file: {str(e).splitlines()[0]}") from None
  if field not in pf.schema_arrow.names:
    # Every row lacks the field; counted, like a JSONL line without it, so one odd file
    # in a large glob does not stop the run.
    for _ in range(pf.metadata.num_rows):
      yield Bad('missing_field')
    return
  for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[field]):
    for value in batch.column(0).to_pylist():
      if isinstance(value, bytes):
        yield _decode(value)
      elif isinstance(value, str):
        yield _checked(value)
      else:
        yield Bad('missing_field')


def count_bad(counts: Dict[str, int], record: Bad) -> None:
  counts[record.kind] = counts.get(record.kind, 0) + 1


def merge_counts(*counts: Dict[str, int]) -> Dict[str, int]:
  """Sum of per-kind counts, keys in `BAD_KINDS` order, zeros dropped."""
  total = collections.Counter()
  for c in counts:
    total.update(c)
  return {k: total[k] for k in BAD_KINDS if total[k]}
