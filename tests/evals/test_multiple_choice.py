"""jaxlm.evals.multiple_choice: exact scores on a model with set logits; the hook in a run."""

import json

import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from jaxlm.core.errors import DataError
from jaxlm.data.tokenizers import ByteTokenizer
from jaxlm.engine.build import Setup
from jaxlm.evals import multiple_choice as mc
from jaxlm.run.loop import Trainer

BOOST = 5.0  # logit of byte t+1 after byte t; every other logit is 0


class Bigram(nn.Module):
  """logits[t] = table[token t]: a model whose next-token distribution we choose.

  Shaped like jaxlm's Transformer for the scorer: ``features`` then ``logits``,
  the loss built 8 positions at a time (``cfg.loss_chunk``).
  """
  vocab: int = 258
  cfg: object = ml_collections.FrozenConfigDict({'loss_chunk': 8})

  @nn.compact
  def features(self, tokens, positions=None, segment_ids=None):
    return self.param('table', nn.initializers.zeros, (self.vocab, self.vocab))[tokens], None

  def logits(self, x):
    return x


def _bigram():
  table = np.zeros((258, 258), np.float32)
  table[np.arange(257), np.arange(1, 258)] = BOOST
  return Bigram(), {'table': table}


def _logp(prev: int, nxt: int) -> float:
  row = np.zeros(258)
  row[prev + 1] = BOOST
  return row[nxt] - np.log(np.exp(row).sum())


def test_scores_are_continuation_log_likelihoods_and_norm_is_per_byte():
  model, params = _bigram()
  examples = [
      # Sum favours the 1-byte 'z'; per byte, the 7-byte run of successors wins.
      {'context': 'xa', 'choices': ['bcdefgh', 'z'], 'label': 0},
      {'context': 'abc', 'choices': ['q', 'd', 'dq'], 'label': 1},
      {'context': '', 'choices': ['ab', 'ba'], 'label': 0},  # empty context: BOS conditions
  ]
  scores = mc.score_choices(model, params, ByteTokenizer(), examples, batch_size=4, max_len=32)
  want = [[sum(_logp(a, b) for a, b in zip(b'abcdefg', b'bcdefgh')), _logp(ord('a'), ord('z'))],
          [_logp(ord('c'), ord('q')), _logp(ord('c'), ord('d')),
           _logp(ord('c'), ord('d')) + _logp(ord('d'), ord('q'))],
          [_logp(256, ord('a')) + _logp(ord('a'), ord('b')),
           _logp(256, ord('b')) + _logp(ord('b'), ord('a'))]]
  for got, exp in zip(scores, want):
    np.testing.assert_allclose(got, exp, atol=1e-4)
  r = mc.evaluate(model, params, ByteTokenizer(), examples, batch_size=4, max_len=32)
  assert r['n'] == 3
  assert r['accuracy'] == pytest.approx(2 / 3)  # example 0 is lost on the sum
  assert r['acc_norm'] == pytest.approx(1.0)


def test_bad_task_file_names_the_line(tmp_path):
  path = tmp_path / 'task.jsonl'
  path.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a"}\n')
  with pytest.raises(DataError, match='line 2'):
    mc.load_examples(str(path))
  with pytest.raises(DataError, match='does not exist'):
    mc.multiple_choice_hook(str(tmp_path / 'nope.jsonl'), every=1)


def test_config_key_scores_a_task_during_training(tiny_cfg, tmp_path):
  """Real continuations of the training text against random letters of the same length:
  chance for the untrained model, well above chance after 20 steps."""
  text = open(tiny_cfg.data.path).read()
  rng = np.random.default_rng(0)
  letters = np.array(list('abcdefghijklmnopqrstuvwxyz'))
  rows = []
  for i in range(24):
    start = 1000 + 997 * i
    right = text[start + 40:start + 52]
    # Same byte length as the right answer, so neither the sum nor the per-byte norm
    # can win on length alone.
    wrong = [''.join(rng.choice(letters, len(right.encode()))) for _ in range(3)]
    label = i % 4
    choices = wrong[:label] + [right] + wrong[label:]
    assert len({len(c.encode()) for c in choices}) == 1
    rows.append({'context': text[start:start + 40], 'choices': choices, 'label': label})
  task = tmp_path / 'shakes_mc.jsonl'
  task.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  tiny_cfg.eval.multiple_choice = str(task)
  tiny_cfg.checkpoint.async_save = False

  setup = Setup(tiny_cfg)
  untrained = mc.evaluate(setup.model, setup.init_state().params, ByteTokenizer(), rows,
                          mesh=setup.mesh, rules=setup.rules)
  assert untrained['accuracy'] <= 0.5, untrained  # chance is 0.25

  Trainer(tiny_cfg, str(tmp_path / 'run')).run()
  lines = [json.loads(l) for l in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()]
  mc_lines = [l for l in lines if 'eval/shakes_mc/accuracy' in l]
  assert [l['step'] for l in mc_lines] == [10, 20]
  trained = mc_lines[-1]['eval/shakes_mc/accuracy']
  assert trained >= 0.75 and trained >= untrained['accuracy'] + 0.3, (untrained, mc_lines)  # 0.29 -> 0.83
  assert mc_lines[-1]['eval/shakes_mc/acc_norm'] == mc_lines[-1]['eval/shakes_mc/accuracy']
