"""Bytes each device sends through collectives in a compiled step, read from its HLO.

``jaxlm plan`` prints these so that layouts can be compared before launch (e.g.
``fsdp=N`` against ``pipeline=P, fsdp=N/P``): a collective inside a loop (the
layer scan, the pipeline's iterations, gradient accumulation) counts once per
trip, using the trip count XLA records on each ``while``.
"""

import re

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')

_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1, 's16': 2, 'u16': 2,
          'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8}
_ARRAY = re.compile(r'\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]')
_OP = re.compile(r'=\s*(.*?)\s(' + '|'.join(KINDS) + r')(-start)?\(')
_HEAD = re.compile(r'^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_WHILE = re.compile(r'\swhile\(.*body=%?([\w.\-]+)')
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLS = re.compile(r'(?:calls|to_apply|branch_computations)=\{?%?([\w.\-, %]+)\}?')


def _array_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in _ARRAY.findall(text):
    if dtype in _BYTES:
      n = 1
      for d in filter(None, dims.split(',')):
        n *= int(d)
      out.append(n * _BYTES[dtype])
  return out


def _computations(hlo: str):
  """{name: (lines, is_entry)} of an HLO module's text."""
  comps, name, entry = {}, None, None
  for line in hlo.splitlines():
    head = _HEAD.match(line)
    if head and ('->' in line or line.startswith('ENTRY')):
      name = head.group(1)
      comps[name] = []
      if line.startswith('ENTRY'):
        entry = name
    elif line.strip() == '}':
      name = None
    elif name is not None:
      comps[name].append(line)
  return comps, entry


def collective_bytes(hlo: str) -> dict[str, int]:
  """{kind: bytes} per device over one run of the compiled module ``hlo`` (its text)."""
  comps, entry = _computations(hlo)
  memo: dict[str, dict[str, int]] = {}

  def total(name: str, depth: int = 0) -> dict[str, int]:
    if name in memo or name not in comps or depth > 64:
      return memo.get(name, {})
    out = dict.fromkeys(KINDS, 0)
    for line in comps[name]:
      op = _OP.search(line)
      if op:  # result shape(s) sit between '=' and the op name; '-start' tuples hold in and out
        sizes = _array_bytes(op.group(1))
        out[op.group(2)] += max(sizes, default=0)
        continue
      loop = _WHILE.search(line)
      if loop:
        trips = _TRIPS.search(line)
        inner = total(loop.group(1), depth + 1)
        for k in KINDS:
          out[k] += inner.get(k, 0) * (int(trips.group(1)) if trips else 1)
        continue
      for called in _CALLS.findall(line):
        for c in (s.strip().lstrip('%') for s in called.split(',')):
          inner = total(c, depth + 1)
          for k in KINDS:
            out[k] += inner.get(k, 0)
    memo[name] = out
    return out

  return total(entry) if entry else dict.fromkeys(KINDS, 0)
