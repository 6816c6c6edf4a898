"""The tokenizer files of an exported Hugging Face model directory.

transformers' ``AutoTokenizer`` reads ``tokenizer.json`` (the ``tokenizers``
model), ``tokenizer_config.json`` (class, special tokens, padding side, max
length) and ``special_tokens_map.json``; ``generate`` reads
``generation_config.json``. Without the config files AutoTokenizer knows no
EOS or PAD, and the usual ``tok.pad_token = tok.eos_token`` + batched
``generate`` fails. So every export writes all four, with every special id
inside the model's vocabulary:

  * an ``hf`` run: its own tokenizer.json;
  * a ``byte`` run: an equivalent ``tokenizers`` model: byte b is id b (GPT-2's
    byte-to-unicode alphabet, no merges), ``<|bos|>`` 256 and ``<|eos|>`` 257;
  * a ``char`` run: its alphabet in code-point order, one id per character, no
    specials (the alphabet has none; pad with any id and an attention mask);
  * ``sentencepiece``: not converted (transformers reads the .model only through
    slow tokenizer classes); the export says so and writes no tokenizer.

PAD is the EOS (as GPT-2 and Llama exports do); padding is on the left, which
is what batched generation with a decoder-only model needs.
"""

import json
import logging

from jaxlm.core import storage

log = logging.getLogger('jaxlm')
BYTE_SPECIALS = ('<|bos|>', '<|eos|>')  # ids 256 and 257 of jaxlm's byte tokenizer


def byte_level_alphabet() -> dict[int, str]:
  """GPT-2's printable stand-in for each byte (tokenizers' ByteLevel uses the same map)."""
  keep = list(range(ord('!'), ord('~') + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return chars


def byte_tokenizer():
  """A ``tokenizers.Tokenizer`` giving the ids of jaxlm's ByteTokenizer."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415
  vocab = {ch: b for b, ch in byte_level_alphabet().items()}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in BYTE_SPECIALS])
  return tok


def char_tokenizer(jaxlm_tok):
  """A ``tokenizers.Tokenizer`` giving the ids of a jaxlm CharTokenizer (same alphabet)."""
  from tokenizers import Tokenizer, decoders, models  # noqa: PLC0415
  alphabet = jaxlm_tok.decode(list(range(jaxlm_tok.vocab_size)))
  tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
  tok.decoder = decoders.Fuse()  # characters joined as they are, no spaces between them
  return tok


def _specials(tok, jaxlm_tok, vocab: int) -> dict[str, str]:
  """{'bos_token': text, 'eos_token': ..., 'pad_token': ...} for ids inside ``vocab``."""
  out = {}
  for key, i in (('bos_token', jaxlm_tok.bos_id), ('eos_token', jaxlm_tok.eos_id)):
    if i is not None and i < vocab:
      out[key] = tok.id_to_token(i)
  if 'eos_token' in out:
    out['pad_token'] = out['eos_token']
  return out


def hf_tokenizer(cfg, jaxlm_tok):
  """The ``tokenizers.Tokenizer`` for a run's tokenizer, or None (sentencepiece)."""
  from tokenizers import Tokenizer  # noqa: PLC0415
  kind = cfg.data.tokenizer
  if kind == 'byte':
    return byte_tokenizer()
  if kind == 'char':
    return char_tokenizer(jaxlm_tok)
  if kind == 'hf':
    src = storage.path(cfg.data.tokenizer_path)
    src = src / 'tokenizer.json' if src.is_dir() else src
    return Tokenizer.from_str(src.read_text())
  return None


def write(out_dir: str, cfg, jaxlm_tok, vocab: int) -> tuple[list[str], dict]:
  """Writes the tokenizer and generation files into ``out_dir``.

  Returns (their names, {'bos_token_id': ..., 'eos_token_id': ..., 'pad_token_id': ...}
  for the specials the export has).
  """
  tok = hf_tokenizer(cfg, jaxlm_tok)
  ids = {}
  names = []
  if tok is not None:
    specials = _specials(tok, jaxlm_tok, vocab)
    ids = {f'{k}_id': tok.token_to_id(v) for k, v in specials.items()}
    _write(out_dir, 'tokenizer.json', tok.to_str(pretty=True))
    added = {str(i): {'content': t.content, 'special': t.special, 'lstrip': t.lstrip,
                      'rstrip': t.rstrip, 'normalized': t.normalized, 'single_word': t.single_word}
             for i, t in sorted(tok.get_added_tokens_decoder().items())}
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'added_tokens_decoder': added,
              'model_max_length': int(cfg.model.max_seq_len), 'padding_side': 'left',
              'clean_up_tokenization_spaces': False, 'add_bos_token': bool(cfg.data.add_bos),
              **specials}
    _write(out_dir, 'tokenizer_config.json', json.dumps(config, indent=2))
    _write(out_dir, 'special_tokens_map.json', json.dumps(specials, indent=2))
    names += ['tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json']
  else:
    log.info("convert: data.tokenizer '%s' has no tokenizer.json form; the export has no "
             'tokenizer (load one separately)', cfg.data.tokenizer)
  generation = {'_from_model_config': True, 'do_sample': False,
                'max_length': int(cfg.model.max_seq_len), **ids}
  _write(out_dir, 'generation_config.json', json.dumps(generation, indent=2))
  return names + ['generation_config.json'], ids


def _write(out_dir: str, name: str, text: str) -> None:
  storage.path(storage.join(out_dir, name)).write_text(text)
