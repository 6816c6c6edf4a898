"""jaxlm: pretrain decoder-only language models with JAX/Flax."""

__version__ = '0.1.0'


def __getattr__(name: str):
  # Lazy, so `import jaxlm` (and `jaxlm --help`) does not import jax.
  if name in ('generate_text', 'load'):
    from jaxlm.engine import build as engine  # noqa: PLC0415
    return getattr(engine, name)
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
