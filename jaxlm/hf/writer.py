"""Writing a Hugging Face model directory tensor by tensor, as transformers' save_pretrained
lays it out: ``model.safetensors``, or when the tensors pass ``max_shard_size``
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: file}}``).

Tensors are added one at a time and a file is written as soon as the next tensor
would not fit, so host memory holds at most one file's tensors plus the one
being added. A tensor larger than the limit gets a file of its own. Paths may be
local or gs:// / s3:// (jaxlm.core.storage).
"""

import json
import re

import numpy as np

from jaxlm.core import storage
from jaxlm.core.errors import ConfigError

_UNITS = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9, 'TB': 10**12,
          'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30, 'TIB': 2**40}


def parse_size(text: str) -> int:
  """'2GB' -> 2_000_000_000 (transformers' units: KB/MB/GB are powers of 10, KiB/MiB/GiB
  of 2; a bare number is bytes)."""
  m = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*', str(text))
  if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
    raise ConfigError(f"--max_shard_size '{text}' is not a size such as 500MB, 2GB or 1GiB")
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


class ShardedWriter:
  """``add(name, tensor)`` in any order, then ``close()``: writes the files and the index
  (none for a single file). As a context manager it closes on success (names in
  ``.files``); on an error nothing is renamed
  into place, so a half-written export has no index and no ``model*.safetensors``."""

  def __init__(self, out_dir: str, max_shard_size: int):
    self.dir, self.limit = storage.path(out_dir), max_shard_size
    self.dir.mkdir(parents=True, exist_ok=True)
    self._pending: dict[str, np.ndarray] = {}
    self._pending_bytes = 0
    self._files: list[tuple[str, list[str]]] = []  # (temporary name, tensor names)
    self.total = 0
    self.files: list[str] = []

  def add(self, name: str, tensor: np.ndarray) -> None:
    if self._pending and self._pending_bytes + tensor.nbytes > self.limit:
      self._flush()
    self._pending[name] = np.ascontiguousarray(tensor)
    self._pending_bytes += tensor.nbytes
    self.total += tensor.nbytes

  def _flush(self) -> None:
    from safetensors.numpy import save, save_file  # noqa: PLC0415
    tmp = f'.model-part-{len(self._files) + 1:05d}.safetensors.tmp'
    meta = {'format': 'pt'}  # transformers' loader expects it on files it did not write
    if storage.is_remote(str(self.dir)):
      (self.dir / tmp).write_bytes(save(self._pending, metadata=meta))
    else:  # straight to the file, without a bytes copy of the whole shard
      save_file(self._pending, str(self.dir / tmp), metadata=meta)
    self._files.append((tmp, list(self._pending)))
    self._pending, self._pending_bytes = {}, 0

  def close(self) -> list[str]:
    """Writes what is pending, renames the files to their final names, writes the
    index; returns the file names."""
    if self._pending or not self._files:
      self._flush()
    n = len(self._files)
    names = (['model.safetensors'] if n == 1 else
             [f'model-{i:05d}-of-{n:05d}.safetensors' for i in range(1, n + 1)])
    for old in [*self.dir.glob('model*.safetensors'), self.dir / 'model.safetensors.index.json']:
      old.unlink(missing_ok=True)  # a previous export's files would mix with these
    for (tmp, _), final in zip(self._files, names):
      (self.dir / tmp).rename(self.dir / final)
    if n > 1:
      weight_map = {t: final for (_, tensors), final in zip(self._files, names) for t in tensors}
      index = {'metadata': {'total_size': self.total},
               'weight_map': dict(sorted(weight_map.items()))}
      (self.dir / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))
    return names

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    if exc_type is None:
      self.files = self.close()
    else:
      for tmp, _ in self._files:
        (self.dir / tmp).unlink(missing_ok=True)
