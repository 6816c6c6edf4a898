"""`jaxlm tokenizer train`: a byte-level BPE or SentencePiece tokenizer from a corpus sample.

    jaxlm tokenizer train --input='corpus/*.jsonl' --format=jsonl --kind=bpe \\
        --vocab_size=32000 --max_bytes=200000000 --output=tok/tokenizer.json

Reads the first `--max_bytes` of the corpus (same readers and bad-record rules
as `jaxlm prepare`), trains on all but the last `--holdout_fraction` of it and
prints the compression, UTF-8 bytes per token, on that held-out tail.

Both kinds have `<s>` (BOS), `</s>` (EOS) and `<pad>` and cover any UTF-8 text,
Chinese and mixed scripts included: byte-level BPE by construction (its base
alphabet is the 256 bytes), SentencePiece through byte_fallback for characters
outside its `character_coverage`. Both decode back to the exact input text
(SentencePiece with identity normalization, whitespace kept as is).

The result loads with data.tokenizer='hf' (tokenizer.json) or 'sentencepiece' (.model).
"""

import os
import tempfile
import types
from pathlib import Path
from typing import List, Tuple

from absl import flags

from jaxlm.core.errors import ConfigError, DataError
from jaxlm.data import corpus
from jaxlm.data.tokenizers import get_tokenizer

SPECIALS = ('<s>', '</s>', '<pad>')  # BOS, EOS, PAD; ids 0, 1, 2 in BPE
_KINDS = {'bpe': ('hf', 'tokenizer.json'), 'sentencepiece': ('sentencepiece', 'tokenizer.model')}
_SP_MAX_LINE = 1 << 16  # bytes; SentencePiece drops longer sentences, so lines are cut to this


USAGE = '''usage: jaxlm tokenizer train --input=FILES --output=PATH [--kind=bpe|sentencepiece]
                             [--vocab_size=32000 --max_bytes=100000000 ...]

subcommands:
  train   trains a tokenizer on a corpus sample; prints its vocab size and held-out bytes/token
'''


def define_flags(fv: flags.FlagValues) -> None:
  corpus.define_input_flags(fv)
  flags.DEFINE_enum('kind', 'bpe', tuple(_KINDS), 'byte-level BPE (HF tokenizers) or '
                    'SentencePiece (unigram, byte fallback)', flag_values=fv)
  flags.DEFINE_integer('vocab_size', 32000, 'vocabulary size, specials included', flag_values=fv)
  flags.DEFINE_integer('max_bytes', 100_000_000, 'corpus sample size in UTF-8 bytes',
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_float('holdout_fraction', 0.05, 'tail of the sample kept out of training to '
                     'measure compression', lower_bound=0.0, upper_bound=0.5, flag_values=fv)
  flags.DEFINE_float('character_coverage', 0.9995, 'SentencePiece: share of characters given '
                     'their own piece (the rest fall back to bytes)', flag_values=fv)
  flags.DEFINE_string('output', None, 'tokenizer.json (bpe), .model (sentencepiece) or a '
                      'directory to put tokenizer.json / tokenizer.model in', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'replace an existing --output file (runs trained with '
                    'it keep their own copy, but anything else reading it changes)',
                    flag_values=fv)


def run(fv: flags.FlagValues, args: List[str]) -> int:
  if args != ['train']:
    raise ConfigError(f"usage: jaxlm tokenizer train --input=... --output=... (got "
                      f"'{' '.join(args) or 'no subcommand'}')")
  for name in ('input', 'output'):
    if not fv[name].value:
      raise ConfigError(f'jaxlm tokenizer train needs --{name}')
  target = output_file(fv.output, fv.kind)
  if target.exists() and not fv.overwrite:  # refused before the (long) sampling and training
    raise ConfigError(f"--output '{target}' exists; pass --overwrite to replace it")
  train_docs, held_out = sample(fv.input, fv.format, fv.field, fv.text_unit, fv.max_bytes,
                                fv.holdout_fraction)
  path = train(train_docs, fv.kind, fv.vocab_size, fv.output, fv.character_coverage)
  tok = get_tokenizer(types.SimpleNamespace(tokenizer=_KINDS[fv.kind][0], tokenizer_path=path))
  n_bytes = sum(len(d.encode('utf-8')) for d in train_docs)
  print(f'trained {fv.kind} tokenizer, vocab {tok.vocab_size}, on {n_bytes:,} bytes of '
        f'{len(train_docs):,} docs -> {path}')
  if held_out:
    print(f'held-out compression: {bytes_per_token(tok, held_out):.3f} bytes/token over '
          f"{sum(len(d.encode('utf-8')) for d in held_out):,} bytes")
  return 0


def sample(inputs: str, fmt: str, field: str, text_unit: str, max_bytes: int,
           holdout_fraction: float) -> Tuple[List[str], List[str]]:
  """The first `max_bytes` of the corpus, split by bytes into (train docs, held-out docs).

  The document straddling a cut is cut at a character boundary, so one long
  document (a single text file) still gives both parts.
  """
  records = corpus.read_records(corpus.match_inputs(inputs), fmt, field, text_unit)
  docs, _ = _split_bytes((t for r in records for t in corpus.texts(r)), max_bytes, rest=False)
  if not docs:
    raise DataError(f"--input '{inputs}' holds no usable documents (--format={fmt})")
  total = sum(len(d.encode('utf-8')) for d in docs)
  return _split_bytes(iter(docs), int(total * (1.0 - holdout_fraction)))


def _split_bytes(docs, limit: int, rest: bool = True) -> Tuple[List[str], List[str]]:
  """(documents up to `limit` UTF-8 bytes in all, the remaining documents).

  The document crossing the limit is cut at a character boundary, its parts
  going one to each side. `rest=False` stops reading at the limit (the
  remainder is then empty), so a huge corpus is read only as far as needed.
  """
  head, tail, used = [], [], 0
  for doc in docs:
    if used >= limit:
      if not rest:
        break
      tail.append(doc)
      continue
    raw = doc.encode('utf-8')
    if used + len(raw) > limit:
      first = raw[:limit - used].decode('utf-8', errors='ignore')
      head.append(first)
      tail.append(doc[len(first):])
      used = limit
    else:
      head.append(doc)
      used += len(raw)
  return [d for d in head if d], [d for d in tail if d] if rest else []


def output_file(output, kind: str) -> Path:
  """The file --output names: itself, or <dir>/tokenizer.json / tokenizer.model."""
  out = Path(output).expanduser()
  if out.is_dir() or out.suffix != Path(_KINDS[kind][1]).suffix:
    out = out / _KINDS[kind][1]
  return out


def train(docs: List[str], kind: str, vocab_size: int, output, coverage: float = 0.9995) -> str:
  """Trains a tokenizer of `kind` ('bpe' or 'sentencepiece') on `docs`; returns the file path."""
  out = output_file(output, kind)
  out.parent.mkdir(parents=True, exist_ok=True)
  if vocab_size < 256 + len(SPECIALS) + 4:  # the byte alphabet and specials, and a few merges
    raise ConfigError(f'--vocab_size {vocab_size} is too small: the 256 bytes and '
                      f'{len(SPECIALS)} specials need at least {256 + len(SPECIALS) + 4}')
  (_train_bpe if kind == 'bpe' else _train_sentencepiece)(docs, vocab_size, out, coverage)
  return str(out)


def _train_bpe(docs: List[str], vocab_size: int, out: Path, coverage: float) -> None:
  del coverage  # bytes cover everything
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415
  tok = Tokenizer(models.BPE())
  # No prefix space and no normalizer: decode(encode(text)) == text, byte for byte.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                min_frequency=2, show_progress=False)
  tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
  tok.save(str(out))


def _train_sentencepiece(docs: List[str], vocab_size: int, out: Path, coverage: float) -> None:
  import sentencepiece as spm  # noqa: PLC0415
  with tempfile.TemporaryDirectory() as tmp:
    prefix = os.path.join(tmp, 'sp')
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=_sp_lines(docs), model_prefix=prefix, vocab_size=vocab_size,
          model_type='unigram', byte_fallback=True, character_coverage=coverage,
          unk_id=3, bos_id=0, eos_id=1, pad_id=2, unk_piece='<unk>', bos_piece=SPECIALS[0],
          eos_piece=SPECIALS[1], pad_piece=SPECIALS[2],
          # Lossless: no NFKC, no whitespace squeezing, so decode(encode(text)) == text.
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True, split_digits=True,
          max_sentence_length=_SP_MAX_LINE, hard_vocab_limit=False, minloglevel=2,
          num_threads=max(1, min(os.cpu_count() or 1, 16)))
    except RuntimeError as e:
      raise DataError(f'SentencePiece training failed: {str(e).strip().splitlines()[-1]}') from None
    os.replace(prefix + '.model', out)


def _sp_lines(docs: List[str]):
  # SentencePiece learns from sentences; lines are the natural unit of both prose and code.
  for doc in docs:
    for line in doc.split('\n'):
      if line.strip():
        yield line.encode('utf-8')[:_SP_MAX_LINE].decode('utf-8', errors='ignore')


def bytes_per_token(tok, docs: List[str]) -> float:
  """UTF-8 bytes per token of `tok` over `docs` (higher compresses better)."""
  n_bytes = sum(len(d.encode('utf-8')) for d in docs)
  n_tokens = sum(len(tok.encode(d)) for d in docs)
  return n_bytes / max(n_tokens, 1)
