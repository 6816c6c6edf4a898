"""Workdir storage: one path layer (etils.epath) for local dirs, gs:// and s3://.

Every read and write of a workdir file goes through here or through Orbax,
which uses the same epath (plus tensorstore for array data), so a run behaves
the same on a laptop disk and in a bucket. ``gs://`` goes through gcsfs and
``s3://`` through s3fs (the ``cloud`` extra); ``check`` names the extra before
anything is loaded.

Object stores have no append and no atomic rename, so:
  * ``write_atomic``: tmp + rename locally; one object PUT (already atomic) remotely;
  * ``TextLog`` (metrics.jsonl): appended and flushed locally; remotely the whole
    object is rewritten at most every ``upload_every`` seconds and on close;
  * ``create_exclusive`` (the workdir lock): ``O_CREAT|O_EXCL`` locally; a
    create-only-if-absent upload remotely (GCS ``ifGenerationMatch=0``, S3
    ``If-None-Match: *``), through the same fsspec filesystem epath uses.
"""

import importlib.util
import os
import time

from etils import epath

from jaxlm.core.errors import ConfigError

# URI scheme -> the fsspec package epath needs for it.
_CLOUD_PACKAGES = {'gs': 'gcsfs', 's3': 's3fs'}


def scheme(p) -> str:
  """'gs', 's3', ... for a URI; '' for a local path."""
  s = os.fspath(p) if not isinstance(p, str) else p
  return s.split('://', 1)[0] if '://' in s else ''


def is_remote(p) -> bool:
  return bool(scheme(p))


def check(p) -> None:
  """ConfigError naming the missing package for a gs:// or s3:// path (one line, no traceback)."""
  pkg = _CLOUD_PACKAGES.get(scheme(p))
  if pkg and importlib.util.find_spec(pkg) is None:
    raise ConfigError(f"'{p}' needs the {pkg} package: pip install 'jaxlm[cloud]'")


def path(p) -> epath.Path:
  """An epath.Path for a local path or URI (checked for its cloud package)."""
  check(p)
  return epath.Path(p)


def absolute(p) -> str:
  """A local path made absolute (Orbax refuses relative ones); URIs as they are."""
  s = os.fspath(p)
  return s if is_remote(s) else os.path.abspath(s)


def join(p, *parts) -> str:
  """``p/part/...`` as a string (URIs keep their scheme)."""
  return os.fspath(path(p).joinpath(*parts))


def read_text(p) -> str:
  return path(p).read_text(encoding='utf-8')


def write_atomic(p, text: str) -> None:
  """Writes ``text`` so readers see the old file or the new one, never half of it."""
  target = path(p)
  target.parent.mkdir(parents=True, exist_ok=True)
  if is_remote(p):
    target.write_text(text, encoding='utf-8')  # an object upload commits whole
    return
  tmp = target.parent / f'.{target.name}.tmp{os.getpid()}'
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, target)


def append_text(p, text: str) -> None:
  """Appends ``text``; remotely a read-modify-write of the object (for rare writes)."""
  target = path(p)
  if not is_remote(p):
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, 'a', encoding='utf-8') as f:
      f.write(text)
    return
  old = target.read_text(encoding='utf-8') if target.exists() else ''
  target.write_text(old + text, encoding='utf-8')


def copy(src, dst) -> None:
  path(dst).write_bytes(path(src).read_bytes())


def _fs(p):
  """(fsspec filesystem, path within it) for a URI: the filesystem epath uses."""
  import fsspec  # noqa: PLC0415  (epath's remote backend; local paths never need it)
  fs, fs_path = fsspec.core.url_to_fs(os.fspath(p))
  return fs, fs_path


def create_exclusive(p, data: bytes) -> bool:
  """Creates ``p`` holding ``data`` only if it does not exist; False if it does."""
  if not is_remote(p):
    # Write a private file, then hard-link it into place: link() fails if the name
    # exists, and a reader never sees the file half-written.
    target = path(p)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f'.{target.name}.new{os.getpid()}'
    tmp.write_bytes(data)
    try:
      os.link(tmp, target)
    except FileExistsError:
      return False
    finally:
      tmp.unlink()
    return True
  check(p)
  fs, fs_path = _fs(p)
  try:
    fs.pipe_file(fs_path, data, mode='create')
  except FileExistsError:
    return False
  return True


def read_bytes_or_none(p) -> bytes | None:
  """The object's bytes, or None if it does not exist (never a cached listing)."""
  if not is_remote(p):
    try:
      with open(os.fspath(p), 'rb') as f:
        return f.read()
    except FileNotFoundError:
      return None
  fs, fs_path = _fs(path(p))
  try:
    return fs.cat_file(fs_path)
  except FileNotFoundError:
    return None


def remove(p) -> None:
  """Deletes one file/object; already gone is fine."""
  try:
    path(p).unlink()
  except FileNotFoundError:
    pass


class TextLog:
  """An append-only text file (metrics.jsonl) that works on object stores too.

  Locally each ``write`` is appended and flushed. An object cannot be appended
  to, so remotely the whole text is kept and the object rewritten at most
  every ``upload_every`` seconds and on ``flush``/``close``.
  """

  def __init__(self, p, upload_every: float = 30.0):
    self.path = path(p)
    self.remote = is_remote(p)
    self.upload_every = upload_every
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._text = (self.path.read_text(encoding='utf-8') if self.path.exists() else '') \
        if self.remote else None
    self._file = None if self.remote else open(self.path, 'a', encoding='utf-8')  # noqa: SIM115
    self._uploaded = time.monotonic()
    self._dirty = False

  def lines(self) -> list[str]:
    if self.remote:
      return self._text.splitlines(keepends=True)
    return self.path.read_text(encoding='utf-8').splitlines(keepends=True)

  def replace(self, lines: list[str]) -> None:
    """Rewrites the file with ``lines`` (each ending in a newline)."""
    if self.remote:
      self._text = ''.join(lines)
      self._dirty = True
      self.flush()
      return
    self._file.close()
    write_atomic(self.path, ''.join(lines))
    self._file = open(self.path, 'a', encoding='utf-8')  # noqa: SIM115

  def write(self, text: str) -> None:
    if not self.remote:
      self._file.write(text)
      self._file.flush()
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._uploaded >= self.upload_every:
      self.flush()

  def flush(self) -> None:
    if self.remote and self._dirty:
      self.path.write_text(self._text, encoding='utf-8')
      self._dirty = False
      self._uploaded = time.monotonic()

  def close(self) -> None:
    if self.remote:
      self.flush()
    elif self._file is not None:
      self._file.close()
      self._file = None


# ---- Object reads and writes for token stores and corpora (`jaxlm prepare`, the loader).


def open_write(p):
  """A binary file for writing ``p`` whole, committed on ``close()``.

  Remotely an fsspec upload: the object appears only when the upload completes, so a
  killed writer leaves nothing listed (GCS resumable / S3 multipart uploads are
  never finalized). Call ``discard(f)`` instead of ``close()`` to abandon it.
  """
  if not is_remote(p):
    return open(os.fspath(p), 'wb')  # noqa: SIM115
  check(p)
  fs, fs_path = _fs(p)
  return fs.open(fs_path, 'wb')


def discard(f) -> None:
  """Abandons a file from ``open_write`` without committing it (remote: no object)."""
  drop = getattr(f, 'discard', None)
  if drop is not None and getattr(f, 'fs', None) is not None:
    drop()
    f.closed = True
    return
  f.close()


def read_range(p, start: int, end: int) -> bytes:
  """Bytes ``[start, end)`` of a file or object: one positioned read / ranged GET."""
  if not is_remote(p):
    with open(os.fspath(p), 'rb') as f:
      return os.pread(f.fileno(), end - start, start)
  fs, fs_path = _fs(p)
  return fs.cat_file(fs_path, start=start, end=end)


def read_ranges(paths: list, starts: list, ends: list, concurrency: int = 64) -> list[bytes]:
  """Bytes ``[start, end)`` of each object, fetched concurrently (one fsspec batch).

  All paths share one filesystem (one store); at most ``concurrency`` requests in
  flight; locally, positioned reads in turn.
  """
  if not paths:
    return []
  if not is_remote(paths[0]):
    return [read_range(p, a, b) for p, a, b in zip(paths, starts, ends)]
  fs, _ = _fs(paths[0])
  return fs.cat_ranges([fs._strip_protocol(p) for p in paths], starts, ends,  # noqa: SLF001
                       on_error='raise', batch_size=concurrency)


def list_sizes(folder) -> dict[str, int]:
  """``{file name: size in bytes}`` of the files directly in ``folder`` (one listing)."""
  if not is_remote(folder):
    with os.scandir(os.fspath(folder)) as it:
      return {e.name: e.stat().st_size for e in it if e.is_file()}
  check(folder)
  fs, fs_path = _fs(folder)
  try:
    entries = fs.ls(fs_path, detail=True, refresh=True)
  except FileNotFoundError:
    return {}
  return {e['name'].rstrip('/').rsplit('/', 1)[-1]: int(e.get('size') or 0) for e in entries
          if e.get('type') == 'file'}


def glob_files(pattern: str) -> list[str]:
  """URIs of the objects a ``gs://``/``s3://`` glob (or a prefix standing for a folder) names.

  Sorted; a pattern without wildcards that names a folder stands for every object under it.
  """
  check(pattern)
  fs, fs_path = _fs(pattern)
  proto = scheme(pattern)
  if any(c in fs_path for c in '*?['):
    found = fs.glob(fs_path)
  elif fs.isfile(fs_path):
    found = [fs_path]
  else:
    found = fs.find(fs_path)
  return sorted(f'{proto}://{f}' for f in found if fs.isfile(f))


def size(p) -> int:
  """A file's or object's size in bytes."""
  if not is_remote(p):
    return os.path.getsize(os.fspath(p))
  fs, fs_path = _fs(p)
  return int(fs.size(fs_path))
