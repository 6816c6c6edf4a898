"""Shipped run configs: ``base.py`` defines every field; each size file changes what differs.

Each file is a plain ``get_config()`` module. ``jaxlm train --config=tiny`` (or
``--config=configs/tiny.py`` in a checkout) resolves to the file here, so an
installed package trains without the repository.
"""

import runpy
from pathlib import Path

DIR = Path(__file__).resolve().parent


def names() -> list[str]:
  """Names of the shipped configs (``tiny``, ``llama_8b``, ...), base excluded."""
  return sorted(p.stem for p in DIR.glob('*.py') if p.stem not in ('__init__', 'base'))


def resolve(arg: str) -> str:
  """A ``--config`` value -> a file path: an existing file as given, else a shipped config.

  ``tiny``, ``tiny.py`` and ``configs/tiny.py`` (the repository's path) name
  ``jaxlm/configs/tiny.py`` when no such file exists relative to the working
  directory. A ``:arg`` suffix (config_flags' parameter) is kept.
  """
  path, colon, param = arg.partition(':')
  if Path(path).is_file():
    return arg
  name = Path(path).name.removesuffix('.py')
  shipped = DIR / f'{name}.py'
  if shipped.is_file() and path in (name, f'{name}.py', f'configs/{name}.py'):
    return str(shipped) + colon + param
  return arg


def load(arg: str):
  """A ``--config`` value (shipped name or file) -> its ``get_config()``, as the CLI loads it."""
  return runpy.run_path(resolve(arg).partition(':')[0])['get_config']()
