"""notebooks/quickstart.ipynb: committed without outputs, and runs top to bottom on CPU."""

import json

import pytest

from tests.conftest import REPO, SHAKESPEARE

NOTEBOOK = REPO / 'notebooks' / 'quickstart.ipynb'


def test_notebook_is_committed_without_outputs():
  nb = json.loads(NOTEBOOK.read_text())
  code = [c for c in nb['cells'] if c['cell_type'] == 'code']
  assert code and all(c['outputs'] == [] and c['execution_count'] is None for c in code)


@pytest.mark.notebook
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  # The kernel inherits this environment: one CPU device (the recipe's batch of 12 does
  # not split over the suite's 8 fake ones), the worktree's jaxlm, the local corpus.
  monkeypatch.setenv('XLA_FLAGS', '')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  monkeypatch.setenv('PYTHONPATH', str(REPO))
  monkeypatch.setenv('JAXLM_SHAKESPEARE', str(SHAKESPEARE))
  monkeypatch.setenv('MPLBACKEND', 'module://matplotlib_inline.backend_inline')
  nb = nbformat.read(str(NOTEBOOK), as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': str(tmp_path)}}).execute()
  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert any('image/png' in o.get('data', {}) for o in outputs)  # the loss / lr plot
  assert 'ROMEO:' in text and 'accuracy:' in text and 'tokenizer.json' in text, text[-2000:]
