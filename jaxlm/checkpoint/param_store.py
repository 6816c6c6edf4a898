"""Single parameters of a saved step, written and read a block of rows at a time.

Orbax keeps each array of a step's ``state`` item as a zarr3 array in one OCDBT
database (``<step>/state``, key ``params.<path joined by '.'>``). HF import and
export move one parameter at a time through those arrays with tensorstore, so
host memory stays near one block (or one layer), never a model or a whole
extra copy of a tensor:

  * ``save_empty``: Orbax saves every parameter as zeros backed by untouched
    anonymous pages (no memory), which writes a normal checkpoint's metadata,
    shapes, dtypes and chunking (and zero chunks, which ``fill`` replaces).
    Orbax's own save of a real array would hold another
    whole copy of it while writing (bench/RESULTS.md, issue 17).
  * ``fill``: writes a parameter's values into its array, block by block.
  * ``verify``: reads every block back from storage and compares it with what was
    meant to be written, so an import never reports a step it cannot read.

Orbax records ``store_array_data_equal_to_fill_value`` in each save and restores
with missing chunks being an error: every chunk must be stored, including one
whose values all equal the array's fill value (an all-zero bias). tensorstore
skips such chunks unless the array is opened with ``store_data_equal_to_fill_value``,
so ``open_param(..., write=True)`` sets it and ``strict=True`` reads as Orbax does.
  * ``open_param``: a parameter's array (in a training save too), to read whole or
    one layer at a time.
"""

import itertools
import json

import jax
import numpy as np

from jaxlm.core import storage

BLOCK_BYTES = 64 << 20  # storage chunk size and the size of one written block


def read_layout(step_dir: str) -> dict:
  """Orbax's record of how the step's arrays are stored: ``use_ocdbt`` and ``use_zarr3``
  (a training save writes zarr v2, jaxlm's import zarr3)."""
  meta = json.loads(storage.read_text(storage.join(step_dir, 'state', '_METADATA')))
  return {'use_ocdbt': meta.get('use_ocdbt', True), 'use_zarr3': meta.get('use_zarr3', False)}


def open_param(step_dir: str, path: tuple[str, ...], context=None, layout: dict | None = None,
               write: bool = False, strict: bool = False):
  """The tensorstore array of parameter ``path`` (e.g. ('embed', 'embedding')) in a
  finalized step directory; ``[i]`` / ``.read()`` read what is indexed only.
  ``layout``: ``read_layout(step_dir)``, read here if not given. ``write``: every
  written chunk is stored, fill-valued or not (Orbax's restore needs each one).
  ``strict``: a chunk missing from storage is an error, not the fill value (as
  Orbax reads), and nothing is served from a cache."""
  import tensorstore as ts  # noqa: PLC0415
  layout = layout or read_layout(step_dir)
  base = step_dir.rstrip('/') + '/state/'
  if not storage.is_remote(base):
    base = 'file://' + str(storage.path(base).absolute()) + '/'
  key = '.'.join(('params',) + tuple(path)) + '/'
  if layout['use_ocdbt']:
    spec = {'kvstore': {'driver': 'ocdbt', 'base': base}, 'path': key}
  else:
    spec = {'kvstore': base + key}
  spec['driver'] = 'zarr3' if layout['use_zarr3'] else 'zarr'
  if write:
    spec['store_data_equal_to_fill_value'] = True
  if strict:
    spec.update(fill_missing_data_reads=False, recheck_cached_data=True)
  return ts.open(spec, open=True, context=context or ts.Context()).result()


def _untouched_zeros(shape, dtype) -> np.ndarray:
  """Zeros whose pages are never written (calloc'd), 64-byte aligned so that a CPU
  jax array can alias them instead of copying."""
  n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
  raw = np.zeros(n + 64, np.uint8)
  start = (-raw.ctypes.data) % 64
  return raw[start:start + n].view(dtype).reshape(shape)


def save_empty(step_dir: str, shapes: dict[tuple[str, ...], tuple], dtype) -> None:
  """Writes a finalized params-only checkpoint at ``step_dir`` (step 0) whose
  parameters ``{path: shape}`` are all zero and stored as no data."""
  from orbax.checkpoint import v1 as ocp  # noqa: PLC0415
  from orbax.checkpoint.experimental.v1 import partial  # noqa: PLC0415
  try:
    cpu = jax.local_devices(backend='cpu')[0]
  except RuntimeError:  # no CPU backend: the zeros then cost device memory, not host
    cpu = jax.local_devices()[0]
  opts = ocp.options.ArrayOptions
  with ocp.Context(array_options=opts(saving=opts.Saving(
      storage_options=opts.Saving.StorageOptions(chunk_byte_size=BLOCK_BYTES)))):
    for path, shape in shapes.items():  # one at a time: bounded virtual memory too
      node = jax.device_put(_untouched_zeros(shape, dtype), cpu, may_alias=True)
      for k in reversed(('params',) + path):
        node = {k: node}
      partial.save(step_dir, node)
      del node
    partial.save(step_dir, {'step': jax.device_put(np.zeros((), np.int32), cpu)})
  partial.finalize(step_dir)


def fill(array, leaf, after_block=None) -> None:
  """Writes ``leaf[idx]`` (numpy in the array's dtype) into ``array`` one storage write
  chunk at a time (at most BLOCK_BYTES each, as save_empty chunks them).

  Each block covers whole chunks: a write to part of a chunk would make
  tensorstore read, merge and rewrite it (and hold it) once per block.
  """
  if not array.shape:
    array.write(leaf[()]).result()
    return
  for idx in _blocks(array):
    # The block is new and never changed, so tensorstore may keep it instead of copying.
    array[idx].write(leaf[idx], can_reference_source_data_indefinitely=True).result()
    if after_block is not None:
      after_block()


def _blocks(array):
  """Index tuples covering ``array`` in whole write chunks (one storage chunk each)."""
  shape = tuple(array.shape)
  if not shape:
    yield ()
    return
  chunk = array.chunk_layout.write_chunk.shape
  for start in itertools.product(*(range(0, n, c) for n, c in zip(shape, chunk))):
    yield tuple(slice(lo, min(lo + c, n)) for lo, c, n in zip(start, chunk, shape))


def verify(array, leaf, after_block=None):
  """None if ``array`` (opened with ``strict=True``) holds exactly ``leaf``'s values,
  else a short description of the first block that differs or cannot be read.

  Bitwise per block (NaNs compare equal to themselves); host memory stays near two blocks.
  """
  for idx in _blocks(array):
    want = np.asarray(leaf[idx] if idx else leaf[()])
    try:
      got = np.asarray(array[idx].read().result() if idx else array.read().result())
    except ValueError as e:  # tensorstore: a chunk is missing or unreadable
      return f'block {_show(idx)} cannot be read back ({str(e).splitlines()[0][:160]})'
    if got.shape != want.shape or got.tobytes() != want.astype(got.dtype).tobytes():
      return f'block {_show(idx)} reads back different values'
    if after_block is not None:
      after_block()
  return None


def _show(idx) -> str:
  return '[' + ', '.join(f'{s.start}:{s.stop}' for s in idx) + ']'
