"""jaxlm's modules import each other without cycles (function-local imports count too)."""

import ast
import graphlib
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'jaxlm'


def _modules() -> dict[str, Path]:
  out = {}
  for path in PKG.rglob('*.py'):
    name = '.'.join(path.relative_to(PKG.parent).with_suffix('').parts)
    out[name.removesuffix('.__init__')] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """{module: the jaxlm modules it imports anywhere in its source}; packages are not nodes."""
  mods = _modules()

  def owner(name: str) -> str | None:  # 'jaxlm.engine.Setup' -> 'jaxlm.engine'
    while name and name not in mods:
      name = name.rpartition('.')[0]
    return name or None

  graph = {}
  for mod, path in mods.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
      for n in names:
        dep = owner(n) if n.split('.')[0] == 'jaxlm' else None
        if dep and dep != mod and dep != 'jaxlm' and not mod.startswith(dep + '.'):
          deps.add(dep)
    graph[mod] = deps
  return graph


def test_no_import_cycles():
  try:
    order = list(graphlib.TopologicalSorter(import_graph()).static_order())
  except graphlib.CycleError as e:
    pytest.fail(f'import cycle among jaxlm modules: {" -> ".join(e.args[1])}')
  assert 'jaxlm.engine' in order and 'jaxlm.train.loop' in order


def test_the_graph_sees_function_local_imports(tmp_path, monkeypatch):
  # The checker itself must catch a cycle hidden inside a function body.
  fake = tmp_path / 'jaxlm'
  fake.mkdir()
  (fake / '__init__.py').write_text('')
  (fake / 'a.py').write_text('import jaxlm.b\n')
  (fake / 'b.py').write_text('def f():\n  from jaxlm.a import x\n')
  monkeypatch.setattr(__import__(__name__), 'PKG', fake)
  with pytest.raises(graphlib.CycleError):
    list(graphlib.TopologicalSorter(import_graph()).static_order())


@pytest.mark.parametrize('module', ['jaxlm.engine', 'jaxlm.generate', 'jaxlm.convert',
                                    'jaxlm.train.loop', 'jaxlm.finetune', 'jaxlm.commands'])
def test_modules_import(module):
  importlib.import_module(module)
