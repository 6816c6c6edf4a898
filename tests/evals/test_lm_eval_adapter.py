"""jaxlm.evals.lm_eval_adapter: lm-evaluation-harness on jaxlm, offline, on local task YAMLs."""

import json
import os
import subprocess
import sys
import sysconfig
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('lm_eval')

from jaxlm.cli import main as cli  # noqa: E402
from jaxlm.data.packing import batch_from_documents  # noqa: E402
from jaxlm.data.tokenizers import get_tokenizer  # noqa: E402
from jaxlm.engine.build import load  # noqa: E402
from jaxlm.evals import lm_eval_adapter as adapter  # noqa: E402
from jaxlm.evals.multiple_choice import score_choices  # noqa: E402
from jaxlm.run.loop import Trainer  # noqa: E402

FACTS = [('The sky is ', 'blue'), ('Grass is ', 'green'), ('Snow is ', 'white'),
         ('Coal is ', 'black')]
CHOICES = [a for _, a in FACTS]
MC_YAML = """task: tiny_facts_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_YAML = """task: tiny_facts_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: context
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _tasks(d: Path) -> Path:
  """A folder of two task YAMLs over local JSONL files (no hub access)."""
  d.mkdir(parents=True)
  mc, gen = d / 'mc.jsonl', d / 'gen.jsonl'
  mc.write_text(''.join(json.dumps({'context': c, 'choices': CHOICES, 'label': CHOICES.index(a)})
                        + '\n' for c, a in FACTS))
  gen.write_text(''.join(json.dumps({'context': c, 'answer': a}) + '\n' for c, a in FACTS))
  (d / 'tiny_facts_mc.yaml').write_text(MC_YAML.format(data=mc))
  (d / 'tiny_facts_gen.yaml').write_text(GEN_YAML.format(data=gen))
  return d


@pytest.fixture(scope='module')
def memorized(tmp_path_factory):
  """A tiny model trained on the facts, with the lm-eval hook on (runs at the end)."""
  from tests.conftest import load_config  # noqa: PLC0415
  root = tmp_path_factory.mktemp('lm_eval')
  tasks = _tasks(root / 'tasks')
  rng = np.random.default_rng(0)
  lines = [c + a + '\n' for c, a in FACTS]
  (root / 'facts.txt').write_text(''.join(lines[i] for i in rng.integers(0, 4, 400)))
  cfg = load_config('tiny')
  cfg.data.path = str(root / 'facts.txt')
  cfg.train.steps, cfg.optim.lr, cfg.eval.every, cfg.checkpoint.every = 250, 1e-2, 0, 0
  cfg.eval.lm_eval_tasks = 'tiny_facts_mc,tiny_facts_gen'
  cfg.eval.lm_eval_include = str(tasks)
  summary = Trainer(cfg, str(root / 'w')).run()
  return root, summary


def test_memorized_task_scores_one_in_the_training_hook(memorized):
  root, summary = memorized
  assert summary['lm_eval/tiny_facts_mc/acc'] == 1.0
  assert summary['lm_eval/tiny_facts_gen/exact_match'] == 1.0
  saved = json.loads((root / 'w' / 'lm_eval' / 'step_250.json').read_text())
  assert saved['results']['tiny_facts_mc']['acc,none'] == 1.0


def test_loglikelihoods_equal_jaxlm_scoring_on_any_mesh(memorized, tmp_path):
  root, _ = memorized
  loaded = load(str(root / 'w'))
  tok = get_tokenizer(loaded.cfg.data)
  lm = adapter.JaxlmLM.from_parts(loaded.setup.model, loaded.params, tok, loaded.setup.mesh,
                                  loaded.setup.rules, batch_size=4)
  results = adapter.simple_evaluate(lm, ['tiny_facts_mc'], include_path=str(root / 'tasks'),
                                    log_samples=True)
  got = {s['doc']['context']: [r[0][0] for r in s['resps']]
         for s in results['samples']['tiny_facts_mc']}
  # lm-eval moves a context's trailing space into the continuation; score the same split.
  examples = [{'context': c.rstrip(), 'choices': [' ' + x for x in CHOICES], 'label': 0}
              for c, _ in FACTS]
  want = score_choices(loaded.setup.model, loaded.params, tok, examples,
                       mesh=loaded.setup.mesh, rules=loaded.setup.rules)
  for (c, _), w in zip(FACTS, want):
    np.testing.assert_allclose(got[c], w, atol=1e-5, rtol=0)

  # Rolling log-likelihood of whole documents, one shorter and one longer than max_seq_len,
  # against jaxlm's eval loss on the same windows; and on a fsdp x tensor mesh.
  docs = ['Snow is white\n', ''.join(c + a + '\n' for c, a in FACTS) * 4]
  reqs = [types.SimpleNamespace(args=(d,)) for d in docs]
  rolling = lm.loglikelihood_rolling(reqs)
  from lm_eval import utils  # noqa: PLC0415
  for doc, ll in zip(docs, rolling):
    windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
        lm.tok_encode(doc), tok.bos_id, loaded.cfg.model.max_seq_len, 1)))
    total = 0.0
    for ctx, cont in windows:
      ids = np.asarray(ctx + cont, np.int32)
      mask = np.zeros(len(ids) - 1, np.float32)
      mask[-len(cont):] = 1
      batch = batch_from_documents([[(ids, mask)]] * 8, loaded.cfg.model.max_seq_len)
      total -= loaded.setup.eval_loss(loaded.params, [batch]) * len(cont)
    assert len(windows) == (1 if len(doc) < 64 else 4)
    np.testing.assert_allclose(ll, total, atol=1e-5 * len(doc), rtol=0)
  sharded = load(str(root / 'w'), mesh_overrides={'data': 2, 'fsdp': 2, 'tensor': 2})
  lm8 = adapter.JaxlmLM.from_parts(sharded.setup.model, sharded.params, tok, sharded.setup.mesh,
                                   sharded.setup.rules, batch_size=4)
  np.testing.assert_allclose(lm8.loglikelihood_rolling(reqs), rolling, atol=1e-4, rtol=0)
  assert lm8.generate_until([types.SimpleNamespace(args=('Coal is ', {'until': ['\n']}))]) == [
      'black']


def test_jaxlm_eval_tasks_writes_results_and_tensorboard(memorized, capfd, tmp_path, monkeypatch):
  root, _ = memorized
  w = root / 'w'
  monkeypatch.chdir(tmp_path)  # outside any git repository: lm_eval asks git for a commit
  assert cli.main(['eval', f'--workdir={w}', '--tasks=tiny_facts_gen', '--limit=2',
                   f'--include_path={root / "tasks"}']) == 0
  out, err = capfd.readouterr()  # file descriptors: git's own stderr would show here
  assert 'tiny_facts_gen' in out and 'fatal' not in err, err
  lines = [json.loads(x) for x in (w / 'metrics.jsonl').read_text().splitlines()]
  assert lines[-1]['lm_eval/tiny_facts_gen/exact_match'] == 1.0
  assert any(p.name.startswith('events.out.tfevents') for p in w.rglob('*'))
  assert cli.main(['eval', f'--workdir={w}', '--tasks=tiny_facts_gn',
                   f'--include_path={root / "tasks"}']) == 2
  assert "unknown lm-eval task 'tiny_facts_gn' (did you mean tiny_facts_gen" in capfd.readouterr().err


def test_lm_eval_cli_finds_the_jaxlm_model(memorized, tmp_path):
  """`lm_eval --model jaxlm` (registered by the jaxlm-lm_eval.pth that installs ship)."""
  root, _ = memorized
  site = Path(sysconfig.get_paths()['purelib'])
  args = ['--model', 'jaxlm', '--model_args', f'workdir={root / "w"}', '--batch_size', '4',
          '--tasks', 'tiny_facts_mc', '--include_path', str(root / 'tasks'),
          '--output_path', str(tmp_path / 'out')]
  if (site / 'jaxlm-lm_eval.pth').is_file():
    cmd = [str(Path(sys.executable).parent / 'lm_eval')] + args
  else:  # a development venv installed before the .pth existed: run what the .pth runs
    assert not os.environ.get('CI'), f'jaxlm-lm_eval.pth is not installed in {site}'
    cmd = [sys.executable, '-c', 'import sys, jaxlm.evals.lm_eval_plugin as p; p.install(); '
           'from lm_eval.__main__ import cli_evaluate; sys.argv[0] = "lm_eval"; cli_evaluate()'
           ] + args
  env = dict(os.environ, HF_DATASETS_OFFLINE='1', JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device: the saved 8-way mesh falls back to what fits
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'tiny_facts_mc' in out.stdout and '|acc' in out.stdout.replace(' ', '')
  results = json.loads(next((tmp_path / 'out').rglob('results_*.json')).read_text())
  assert results['results']['tiny_facts_mc']['acc,none'] == 1.0
