"""Peak host memory of `jaxlm convert --from_hf` and `--to_hf` on a random Llama-3.2-1B.

    python bench/hf_import_memory.py [--hf_dir=/tmp/llama1b_random] [--dtype=bfloat16]
        [--param_dtype=float32] [--max_shard_size=1GB]

Writes the model once with transformers (random weights, safetensors) unless
``--hf_dir`` already holds one, then runs the import under ``/usr/bin/time -v``
and prints the peak RSS next to the largest tensor (in the parameter dtype), then
exports the imported workdir with `jaxlm convert --to_hf` the same way.
The fixed overhead is the peak RSS of the same command on a tiny model of the
same family (interpreter, jax, orbax and tensorstore loaded; tensors of a few
KiB), so ``(peak - fixed) / largest`` is what the model's size adds per byte of
its largest tensor (the issue's check: below 1.5).
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                max_position_embeddings=2048, tie_word_embeddings=True,
                rope_parameters={'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 32.0,
                                 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                                 'original_max_position_embeddings': 8192})
BYTES = {'float32': 4, 'bfloat16': 2, 'float16': 2}


TINY = dict(LLAMA_1B, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)


def write_model(out: Path, dtype: str, shapes: dict = LLAMA_1B) -> None:
  import torch  # noqa: PLC0415
  import transformers  # noqa: PLC0415
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(**shapes)
  with torch.no_grad():
    model = transformers.LlamaForCausalLM(cfg).to(getattr(torch, dtype))
  model.save_pretrained(str(out))


def largest_tensor(hf_dir: Path) -> tuple[str, int]:
  """(name, element count) of the largest tensor in the safetensors files."""
  best = ('', 0)
  for f in sorted(hf_dir.glob('*.safetensors')):
    raw = f.read_bytes()[:8]
    n = int.from_bytes(raw, 'little')
    with open(f, 'rb') as fh:
      fh.seek(8)
      header = json.loads(fh.read(n))
    for name, info in header.items():
      if name != '__metadata__':
        count = 1
        for d in info['shape']:
          count *= d
        best = max(best, (name, count), key=lambda t: t[1])
  return best


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument('--hf_dir', default='/tmp/llama1b_random')
  ap.add_argument('--dtype', default='bfloat16', help='dtype the random model is saved in')
  ap.add_argument('--param_dtype', default='float32', help='jaxlm model.param_dtype on import')
  ap.add_argument('--max_shard_size', default='1GB', help='export: jaxlm convert --max_shard_size')
  args = ap.parse_args()
  hf_dir = Path(args.hf_dir)
  if not (hf_dir / 'config.json').is_file():
    print(f'writing a random Llama ({args.dtype}) to {hf_dir} ...', flush=True)
    write_model(hf_dir, args.dtype)
  size = sum(f.stat().st_size for f in hf_dir.glob('*.safetensors'))
  name, count = largest_tensor(hf_dir)
  tiny = Path(tempfile.mkdtemp(prefix='jaxlm_tiny_hf_'))
  try:
    write_model(tiny, args.dtype, TINY)
    fixed = measure(tiny, args.param_dtype, args.max_shard_size)
    big = measure(hf_dir, args.param_dtype, args.max_shard_size)
  finally:
    shutil.rmtree(tiny, ignore_errors=True)
  largest = count * BYTES[args.param_dtype]
  gib = 2 ** 30
  print(f'model files       {size / gib:.2f} GiB ({args.dtype}) in {hf_dir}')
  print(f'largest tensor    {name}: {count:,} elements = {largest / gib:.2f} GiB as '
        f'{args.param_dtype}')
  for step in ('import', 'export'):
    (peak, wall), (base, _) = big[step], fixed[step]
    print(f'{step}: fixed overhead {base / gib:.2f} GiB (peak RSS for a '
          f'{TINY["hidden_size"]}-wide 1-layer model)')
    if step == 'export':  # HF files are float32: the largest tensor is 4 bytes an element
      largest = count * 4
      print(f'export: {big["files"]} safetensors file(s), --max_shard_size={args.max_shard_size}, '
            f'largest tensor {largest / gib:.2f} GiB as float32')
    print(f'{step}: peak RSS {peak / gib:.2f} GiB = fixed + {(peak - base) / largest:.2f} x the '
          f'largest tensor ({peak / largest:.2f} x in all), wall {wall}')
  return 0


def measure(hf_dir: Path, param_dtype: str, max_shard_size: str) -> dict:
  """{'import'/'export': (peak RSS in bytes, wall time), 'files': count} of `jaxlm convert
  --from_hf` into a fresh workdir and `--to_hf` back out of it, each under /usr/bin/time -v."""
  workdir = Path(tempfile.mkdtemp(prefix='jaxlm_import_'))
  try:
    out = {'import': _timed(['--from_hf', hf_dir, '--workdir', workdir / 'w',
                             '--param_dtype', param_dtype])}
    out['export'] = _timed(['--to_hf', workdir / 'hf', '--workdir', workdir / 'w',
                            '--max_shard_size', max_shard_size])
    out['files'] = len(list((workdir / 'hf').glob('*.safetensors')))
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  return out


def _timed(args: list) -> tuple[int, str]:
  cmd = ['/usr/bin/time', '-v', sys.executable, '-m', 'jaxlm', 'convert', *map(str, args)]
  out = subprocess.run(cmd, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(out.stderr[-3000:])
  rss_kb = int(re.search(r'Maximum resident set size \(kbytes\): (\d+)', out.stderr).group(1))
  wall = re.search(r'Elapsed \(wall clock\) time.*: (\S+)', out.stderr).group(1)
  return rss_kb * 1024, wall


if __name__ == '__main__':
  sys.exit(main())
