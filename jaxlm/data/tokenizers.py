"""Tokenizers behind one small protocol: byte-level, character-level, SentencePiece and HF
`tokenizer.json`.

Every tokenizer has `.encode(text) -> int32 [tokens]` (no specials added),
`.decode(ids) -> str` (specials skipped, bad UTF-8 replaced), `.vocab_size`,
`.bos_id`, `.eos_id` (an int or None) and `.name`.
"""

from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

import numpy as np

from jaxlm.core.errors import DataError
from jaxlm.data import workdir_tokenizer

Ids = Union[np.ndarray, Sequence[int]]

# Names under which HF tokenizer files commonly store their specials, most specific first.
# GPT-2 style vocabularies use one '<|endoftext|>' for both, so it closes both lists.
# '<|bos|>' / '<|eos|>' are the specials of a byte-tokenizer run's export (jaxlm.hf.tokenizer).
_HF_BOS_NAMES = ('<|begin_of_text|>', '<s>', '<bos>', '[BOS]', '<|startoftext|>', '<|bos|>',
                 '<|endoftext|>')
_HF_EOS_NAMES = ('<|end_of_text|>', '</s>', '<eos>', '[EOS]', '<|eos|>', '<|endoftext|>')


class Tokenizer(Protocol):
  name: str
  vocab_size: int
  bos_id: Optional[int]
  eos_id: Optional[int]

  def encode(self, text: str) -> np.ndarray:
    """`text` -> int32 ids `[tokens]`, no BOS/EOS added."""

  def decode(self, ids: Ids) -> str:
    """int ids `[tokens]` -> text, special tokens skipped."""


class ByteTokenizer:
  """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is BOS, 257 is EOS.

  Needs no file and round-trips any text exactly, which makes it the default
  for demos and tests (at the cost of ~4x longer sequences than BPE).
  """

  name = 'byte'
  vocab_size = 258
  bos_id = 256
  eos_id = 257

  def encode(self, text: str) -> np.ndarray:
    """`text` -> int32 `[utf8_bytes]`."""
    return self.encode_bytes(text.encode('utf-8'))

  def encode_bytes(self, data: bytes) -> np.ndarray:
    """Raw `data` -> int32 `[len(data)]`; frombuffer keeps tens of MB well under a second."""
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode_bytes(self, ids: Ids) -> bytes:
    """int ids `[tokens]` -> the raw bytes, specials (>= 256) dropped."""
    ids = np.asarray(ids).reshape(-1)
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes()

  def decode(self, ids: Ids) -> str:
    """int ids `[tokens]` -> text; a sample cut mid-character decodes with U+FFFD."""
    return self.decode_bytes(ids).decode('utf-8', errors='replace')


class CharTokenizer:
  """One token per character of a fixed alphabet: the distinct characters of a text file, sorted.

  nanoGPT's shakespeare_char vocabulary is built this way (65 characters of
  tinyshakespeare, ids in code point order), so a jaxlm model can have exactly
  its embedding and head rather than 320 byte rows. The file is re-read
  whenever the tokenizer is built (training, generation, eval), so it must stay
  where the config says. No BOS/EOS: the alphabet has no room for specials.
  """

  bos_id = None
  eos_id = None

  def __init__(self, path: Path):
    if not path.is_file():
      raise DataError(f"data.tokenizer 'char' needs a text file for its alphabet; "
                      f"'{path}' is not one")
    alphabet = set()
    with open(path, encoding='utf-8', errors='strict') as f:
      try:
        while chunk := f.read(1 << 24):
          alphabet.update(chunk)
      except UnicodeDecodeError as e:
        raise DataError(f"'{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not alphabet:
      raise DataError(f"'{path}' is empty: no characters for data.tokenizer 'char'")
    self._points = np.array(sorted(map(ord, alphabet)), dtype=np.uint32)
    self.vocab_size = len(self._points)
    self.name = f'char:{path.name}'

  def encode(self, text: str) -> np.ndarray:
    """`text` -> int32 `[characters]`; a character outside the alphabet is a DataError."""
    points = np.frombuffer(text.encode('utf-32-le'), dtype=np.uint32)
    ids = np.searchsorted(self._points, points)
    bad = (ids == self.vocab_size) | (self._points[np.minimum(ids, self.vocab_size - 1)] != points)
    if bad.any():
      ch = chr(points[np.argmax(bad)])
      raise DataError(f"character {ch!r} is not in the {self.vocab_size}-character alphabet of "
                      f"tokenizer '{self.name}'")
    return ids.astype(np.int32)

  def decode(self, ids: Ids) -> str:
    """int ids `[tokens]` -> text; out-of-range ids skipped."""
    ids = np.asarray(ids).reshape(-1)
    ids = ids[(ids >= 0) & (ids < self.vocab_size)]
    return self._points[ids].astype('<u4').tobytes().decode('utf-32-le')


class SentencePieceTokenizer:
  """A trained SentencePiece `.model` file."""

  def __init__(self, path: Path):
    import sentencepiece as spm
    try:
      self._sp = spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
      raise DataError(f"data.tokenizer_path '{path}' is not a SentencePiece model: {e}") from None
    self.name = f'sentencepiece:{path.name}'
    self.vocab_size = int(self._sp.get_piece_size())
    # SentencePiece reports a disabled special as -1.
    self.bos_id = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    self.eos_id = self._sp.eos_id() if self._sp.eos_id() >= 0 else None

  def encode(self, text: str) -> np.ndarray:
    """`text` -> int32 `[tokens]`."""
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Ids) -> str:
    """int ids `[tokens]` -> text; control ids (BOS/EOS/PAD) and out-of-range ids skipped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    keep = [i for i in ids if 0 <= i < self.vocab_size and not self._sp.is_control(i)]
    return self._sp.decode(keep)


class HFTokenizer:
  """A Hugging Face `tokenizer.json` loaded with the `tokenizers` library (no network)."""

  def __init__(self, path: Path):
    import tokenizers
    if path.is_dir():
      path = path / 'tokenizer.json'
      if not path.is_file():
        raise DataError(f"data.tokenizer_path '{path.parent}' has no tokenizer.json")
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on bad JSON
      raise DataError(f"data.tokenizer_path '{path}' is not a tokenizer.json: {e}") from None
    self.name = f'hf:{path.name}'
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bos_id = self._first_id(_HF_BOS_NAMES)
    self.eos_id = self._first_id(_HF_EOS_NAMES)

  def _first_id(self, names: Sequence[str]) -> Optional[int]:
    for name in names:
      i = self._tok.token_to_id(name)
      if i is not None:
        return int(i)
    return None

  def encode(self, text: str) -> np.ndarray:
    """`text` -> int32 `[tokens]`."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Ids) -> str:
    """int ids `[tokens]` -> text, special tokens skipped."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._tok.decode([i for i in ids if 0 <= i < self.vocab_size], skip_special_tokens=True)


def get_tokenizer(data_cfg) -> Tokenizer:
  """Builds the tokenizer named by `data_cfg.tokenizer` ('byte', 'char', 'sentencepiece', 'hf').

  'char' with no data.tokenizer_path takes its alphabet from data.path (the
  training text itself, as nanoGPT's prepare.py does).
  """
  kind = data_cfg.tokenizer
  if kind == 'byte':
    return ByteTokenizer()
  if kind not in ('char', 'sentencepiece', 'hf'):
    raise DataError(f"data.tokenizer '{kind}' is not one of 'byte', 'char', 'sentencepiece', 'hf'")
  key, where = 'data.tokenizer_path', data_cfg.tokenizer_path
  if kind == 'char' and not where:
    key, where = 'data.path', getattr(data_cfg, 'path', '')
  if not where:
    raise DataError(f"data.tokenizer '{kind}' needs data.tokenizer_path")
  path = Path(where).expanduser()
  if not path.exists():
    raise DataError(f"{key} '{path}' does not exist")
  # A run's recorded copy must still be the file it trained with.
  workdir_tokenizer.check(data_cfg, path / 'tokenizer.json' if path.is_dir() else path)
  if kind == 'char':
    return CharTokenizer(path)
  return SentencePieceTokenizer(path) if kind == 'sentencepiece' else HFTokenizer(path)
