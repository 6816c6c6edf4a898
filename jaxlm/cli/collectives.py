"""Collective traffic of a compiled step, read from its optimized HLO text.

For each kind (all-gather, reduce-scatter, all-reduce, all-to-all,
collective-permute): the bytes of the results one device's collectives produce
in one run of the step. Collectives inside loops count once per iteration
(XLA's ``known_trip_count`` on each ``while``, or where a compiler writes none,
as libtpu does, the bound its condition compares the counter with: scanned
layers, gradient accumulation), so two meshes of the same step compare by what they move. Of a
conditional's branches the largest counts. Asynchronous pairs count once, by
the ``-done`` half's result.

Across TPU slices (multislice) libtpu compiles one slice's program and turns the
collectives that cross DCN into MegaScale ``send``/``recv`` pairs; each ``recv``
counts under the collective it came from (its rendezvous name) and again under
``DCN`` (the share of the traffic that leaves the slice).
"""

import re

KINDS = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
DCN = 'of these over DCN'

_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1, 'f8e5m2': 1,
          'f8e4m3': 1, 'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1, 'f8e3m4': 1, 'f8e8m0fnu': 1,
          's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2, 's32': 4, 'u32': 4, 'f32': 4,
          's64': 8, 'u64': 8, 'f64': 8, 'c64': 8, 'c128': 16}
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\]')
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$')
# '%name = TYPE op(' ... ; TYPE is an array or a (nested) tuple of arrays.
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\(')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLEE = re.compile(r'\b(?:body|calls|to_apply)=%?([\w.\-]+)')
_BOUND = re.compile(r'\bs32\[\]\S*\s+constant\((\d+)\)')
_MEGASCALE = re.compile(r'_xla_host_transfer_rendezvous="([a-z\-]+)\.')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}|(?:true|false)_computation=%?([\w.\-]+)')


def _nbytes(type_text: str) -> int:
  total = 0
  for dtype, dims in _ARRAY.findall(type_text):
    n = 1
    for d in filter(None, dims.split(',')):
      n *= int(d)
    total += n * _BYTES.get(dtype, 4)
  return total


def _kind(op: str) -> str | None:
  if op.endswith('-start'):
    return None  # counted by its -done
  base = op.removesuffix('-done')
  return base if base in KINDS else None


def collective_bytes(hlo_text: str) -> dict[str, int]:
  """{kind: bytes per device per run} of the compiled module's collectives, and DCN's share."""
  comps: dict[str, dict] = {}
  entry, cur = None, None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      cur = comps.setdefault(head.group(2), {'own': dict.fromkeys((*KINDS, DCN), 0), 'calls': [],
                                             'bounds': []})
      if head.group(1):
        entry = head.group(2)
      continue
    if cur is None:
      continue
    cur['bounds'] += [int(n) for n in _BOUND.findall(line)]
    m = _INSTR.match(line)
    if not m:
      continue
    type_text, op = m.groups()
    kind = _kind(op)
    if kind:
      cur['own'][kind] += _nbytes(type_text)
    if op == 'recv' and 'xla_megascale_runtime' in line:
      origin = _MEGASCALE.search(line)
      payload = _ARRAY.search(type_text)  # (payload, u32[] context, token[])
      if origin and origin.group(1) in KINDS and payload:
        n = _nbytes(payload.group(0))
        cur['own'][origin.group(1)] += n
        cur['own'][DCN] += n
    if op == 'while':
      trip = _TRIP.search(line)
      body = re.search(r'\bbody=%?([\w.\-]+)', line)
      cond = re.search(r'\bcondition=%?([\w.\-]+)', line)
      if body:
        times = int(trip.group(1)) if trip else ('cond', cond.group(1) if cond else '')
        cur['calls'].append(('one', times, [body.group(1)]))
    elif op == 'conditional':
      names = []
      for group, single in _BRANCHES.findall(line):
        names += [n.strip().lstrip('%') for n in group.split(',') if n.strip()] if group else [single]
      cur['calls'].append(('max', 1, names))
    else:
      for callee in _CALLEE.findall(line):
        cur['calls'].append(('one', 1, [callee]))

  memo: dict[str, dict] = {}

  def total(name: str, depth: int = 0) -> dict[str, int]:
    if name in memo:
      return memo[name]
    comp = comps.get(name)
    out = dict.fromkeys((*KINDS, DCN), 0)
    if comp is None or depth > 64:
      return out
    for k, v in comp['own'].items():
      out[k] += v
    for how, times, names in comp['calls']:
      if isinstance(times, tuple):  # the loop bound of its condition: `i < N` with one constant N
        bounds = comps.get(times[1], {}).get('bounds', [])
        times = bounds[0] if len(bounds) == 1 else 1
      subs = [total(n, depth + 1) for n in names]
      if not subs:
        continue
      pick = max(subs, key=lambda s: sum(s.values())) if how == 'max' else subs[0]
      for k in out:
        out[k] += times * pick[k]
    memo[name] = out
    return out

  return total(entry) if entry else dict.fromkeys((*KINDS, DCN), 0)
