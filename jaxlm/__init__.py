"""jaxlm: pretrain decoder-only language models with JAX/Flax."""

__version__ = '0.1.0'
