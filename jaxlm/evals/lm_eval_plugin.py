"""Registers the ``jaxlm`` model with lm-evaluation-harness when lm_eval is imported.

Run at interpreter start by ``jaxlm-lm_eval.pth`` (see setup.py), so it must
be cheap and must never fail: it only adds a finder that, once lm_eval's model
registry module has run, registers ``jaxlm`` as a lazy entry
(``jaxlm.evals.lm_eval_adapter:JaxlmLM``, imported only when used).
"""

import importlib.abc
import sys

REGISTRY = 'lm_eval.api.registry'
TARGET = 'jaxlm.evals.lm_eval_adapter:JaxlmLM'


def register(registry) -> None:
  """Adds 'jaxlm' to lm_eval's model registry (and lm_eval's own models, see below)."""
  if 'jaxlm' not in registry.model_registry:
    registry.model_registry.register('jaxlm', target=TARGET)
  # get_model() fills in lm_eval's built-in models only while the registry is empty;
  # now that it is not, add them here so `--model hf` etc. keep working.
  import lm_eval.models  # noqa: F401, PLC0415


class _AfterRegistryImport(importlib.abc.MetaPathFinder):
  """Finds lm_eval.api.registry with the other finders and runs ``register`` after it."""

  def find_spec(self, name, path, target=None):
    if name != REGISTRY:
      return None
    for finder in sys.meta_path:
      if finder is self or not hasattr(finder, 'find_spec'):
        continue
      spec = finder.find_spec(name, path, target)
      if spec is not None and spec.loader is not None:
        run = spec.loader.exec_module

        def exec_module(module, run=run):
          run(module)
          try:
            register(module)
          except Exception:  # noqa: BLE001  (never break lm_eval itself)
            pass

        spec.loader.exec_module = exec_module
        return spec
    return None


def install() -> None:
  try:
    if REGISTRY in sys.modules:
      register(sys.modules[REGISTRY])
    elif not any(isinstance(f, _AfterRegistryImport) for f in sys.meta_path):
      sys.meta_path.insert(0, _AfterRegistryImport())
  except Exception:  # noqa: BLE001  (a .pth hook must not stop Python from starting)
    pass
