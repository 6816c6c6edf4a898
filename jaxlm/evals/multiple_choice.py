"""Multiple-choice scoring (HellaSwag / ARC style) by continuation log-likelihood.

A task is a JSONL file of ``{"context": str, "choices": [str, ...], "label": int}``.
Each choice is scored by the summed log-probability of its tokens given the
context. Two accuracies are reported:

  accuracy  argmax of the summed log-likelihood
  acc_norm  argmax of the log-likelihood per UTF-8 byte of the choice text
            (per byte, not per token, so it does not depend on the tokenizer)

Use from Python with ``evaluate(model, params, tokenizer, examples)`` or in a
run with ``multiple_choice_hook(path, every)`` (``eval.multiple_choice`` in the
config registers one).
"""

import functools
import json
from pathlib import Path

import jax
import numpy as np

from jaxlm.core import sharding
from jaxlm.core.errors import DataError
from jaxlm.data.packing import batch_from_documents
from jaxlm.evals.hooks import Hook, HookContext
from jaxlm.model.loss import sequence_losses


def load_examples(path: str) -> list[dict]:
  """Reads and checks a task file; DataError names the file and line of a bad record."""
  p = Path(path)
  if not p.is_file():
    raise DataError(f"multiple-choice file '{path}' does not exist")
  out = []
  for n, line in enumerate(p.read_text(encoding='utf-8').splitlines(), 1):
    if not line.strip():
      continue
    try:
      ex = json.loads(line)
      ok = (isinstance(ex.get('context'), str) and isinstance(ex.get('choices'), list)
            and len(ex['choices']) >= 2 and all(isinstance(c, str) for c in ex['choices'])
            and isinstance(ex.get('label'), int) and 0 <= ex['label'] < len(ex['choices']))
    except (json.JSONDecodeError, AttributeError):
      ok = False
    if not ok:
      raise DataError(f"multiple-choice file '{path}' line {n}: expected "
                      '{"context": str, "choices": [str, str, ...], "label": int < len(choices)}')
    out.append(ex)
  if not out:
    raise DataError(f"multiple-choice file '{path}' has no examples")
  return out


def _rows(tokenizer, examples, max_len: int) -> list[tuple[list[int], int]]:
  """One (context + choice ids, number of choice tokens) row per choice."""
  rows = []
  for ex in examples:
    ctx = [int(t) for t in tokenizer.encode(ex['context'])]
    if not ctx:  # the first continuation token needs something to be conditioned on
      start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
      ctx = [start if start is not None else 0]
    for choice in ex['choices']:
      cont = [int(t) for t in tokenizer.encode(choice)][:max_len - 1]
      ids = (ctx + cont)[-(max_len + 1):]  # too long: drop the oldest context tokens
      rows.append((ids, len(cont)))
  return rows


def _pack(rows, width: int) -> dict:
  """One right-padded document per row; the loss mask marks continuation targets."""
  docs = []
  for ids, n_cont in rows:
    mask = np.zeros(len(ids) - 1, np.float32)
    mask[len(mask) - n_cont:] = 1.0
    docs.append([(np.asarray(ids, np.int32), mask)])
  return batch_from_documents(docs, width)


@functools.partial(jax.jit, static_argnames=('model',))
def _loglik(model, params, batch):
  """Per row: summed log p(target) over the loss mask, and whether every masked target is
  the argmax (greedy decoding would produce it). Batch arrays [batch, length] -> [batch].
  Logits are built a chunk of positions at a time (jaxlm.model.loss)."""
  losses, misses = sequence_losses(model, params, batch, count_misses=True)
  return -losses, misses == 0


def score_rows(model, params, rows, batch_size: int = 32, max_len: int = 0, mesh=None,
               rules=None) -> tuple[np.ndarray, np.ndarray]:
  """(log-likelihood float64 [rows], greedy bool [rows]) of ``(ids, n_cont)`` rows.

  A row scores its last ``n_cont`` tokens given the ones before. Rows are
  right-padded to one width (the longest row, rounded up to a power of two, at
  most ``max_len`` = the model's max_seq_len) and run in fixed-size batches, so
  the forward pass compiles once per width. With a ``mesh`` and ``rules`` the
  model's sharding annotations are active (params may be sharded).
  """
  max_len = max_len or int(model.cfg.max_seq_len)
  longest = max(len(ids) - 1 for ids, _ in rows)
  width = min(max_len, 1 << max(3, (longest - 1).bit_length()))
  if mesh is not None:  # the batch splits over the data-parallel axes
    dp = int(np.prod([mesh.shape[a] for a in ('data', 'fsdp', 'expert') if a in mesh.shape]))
    batch_size = -(-batch_size // dp) * dp
  scores, greedy = [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    chunk = chunk + [([0, 0], 1)] * (batch_size - len(chunk))  # fixed shape: one compile
    batch = _pack(chunk, width)  # numpy: replicated to every device (and process)
    if mesh is not None:
      with sharding.activate(mesh, rules):
        out = _loglik(model, params, batch)
    else:
      out = _loglik(model, params, batch)
    s, g = jax.device_get(out)
    scores.append(np.asarray(s, np.float64)[:len(rows) - start])
    greedy.append(np.asarray(g, bool)[:len(rows) - start])
  return np.concatenate(scores), np.concatenate(greedy)


def score_choices(model, params, tokenizer, examples, batch_size: int = 32, max_len: int = 0,
                  mesh=None, rules=None) -> list[np.ndarray]:
  """Log-likelihood of every choice: one float64 array [choices] per example (see score_rows)."""
  max_len = max_len or int(model.cfg.max_seq_len)
  rows = _rows(tokenizer, examples, max_len)
  flat, _ = score_rows(model, params, rows, batch_size, max_len, mesh, rules)
  out, i = [], 0
  for ex in examples:
    out.append(flat[i:i + len(ex['choices'])])
    i += len(ex['choices'])
  return out


def evaluate(model, params, tokenizer, examples, batch_size: int = 32, max_len: int = 0,
             mesh=None, rules=None) -> dict:
  """{'accuracy', 'acc_norm', 'n'} over ``examples`` (dicts of context, choices, label)."""
  scores = score_choices(model, params, tokenizer, examples, batch_size, max_len, mesh, rules)
  correct = correct_norm = 0
  for ex, s in zip(examples, scores):
    nbytes = np.asarray([max(1, len(c.encode('utf-8'))) for c in ex['choices']], np.float64)
    correct += int(np.argmax(s) == ex['label'])
    correct_norm += int(np.argmax(s / nbytes) == ex['label'])
  n = len(examples)
  return {'accuracy': correct / n, 'acc_norm': correct_norm / n, 'n': n}


def multiple_choice_hook(path: str, every: int, name: str = '', batch_size: int = 32) -> Hook:
  """A Hook logging ``eval/<name>/accuracy`` and ``eval/<name>/acc_norm`` (name: file stem).

  The file is read and checked now, so a bad task file fails at start.
  """
  examples = load_examples(path)
  name = name or Path(path).stem

  def fn(ctx: HookContext):
    rules = sharding.rules_for(ctx.cfg.model, ctx.cfg.mesh, ctx.mesh)
    r = evaluate(ctx.model, ctx.params, ctx.tokenizer, examples, batch_size, mesh=ctx.mesh,
                 rules=rules)
    return {f'eval/{name}/accuracy': r['accuracy'], f'eval/{name}/acc_norm': r['acc_norm']}

  return Hook(fn, every=every, name=f'multiple_choice:{name}')
