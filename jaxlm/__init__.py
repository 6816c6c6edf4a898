"""jaxlm: pretrain decoder-only language models with JAX/Flax."""

__version__ = '0.1.0'


def __getattr__(name: str):
  # Lazy, so `import jaxlm` (and `jaxlm --help`) does not import jax.
  if name == 'generate_text':
    from jaxlm.generate import generate_text  # noqa: PLC0415
    return generate_text
  if name == 'load':
    from jaxlm.convert import load  # noqa: PLC0415
    return load
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")
