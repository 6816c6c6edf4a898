"""acc_norm divides by the choice's UTF-8 bytes, not its tokens: with a character tokenizer
'ééé' is 3 tokens but 6 bytes, so the two normalizations pick different choices."""

import pytest

from jaxlm.data.tokenizers import CharTokenizer
from jaxlm.evals import multiple_choice as mc


def test_acc_norm_is_per_byte_with_a_tokenizer_whose_tokens_are_not_bytes(tmp_path, monkeypatch):
  (tmp_path / 'alphabet.txt').write_text('abcdéxyz ', encoding='utf-8')
  tok = CharTokenizer(tmp_path / 'alphabet.txt')
  examples = [{'context': 'x', 'choices': ['ééé', 'abcd'], 'label': 0},
              {'context': 'y', 'choices': ['ab', 'éé'], 'label': 1}]
  assert [len(tok.encode(c)) for c in examples[0]['choices']] == [3, 4]
  # Log-likelihoods: per byte -4.4/6 > -4/4 and -1.8/4 > -1.2/2; per token the other way.
  scores = [[-4.4, -4.0], [-1.2, -1.8]]
  monkeypatch.setattr(mc, 'score_choices', lambda *a, **k: [list(map(float, s)) for s in scores])
  r = mc.evaluate(None, None, tok, examples)
  assert r['accuracy'] == pytest.approx(0.0)  # the sums favour the other choice both times
  assert r['acc_norm'] == pytest.approx(1.0)
