"""Evaluations that run on a trained model: multiple-choice scoring, lm-evaluation-harness."""

from jaxlm.core.errors import ConfigError


def load_lm_eval():
  """jaxlm.evals.lm_eval_adapter, or a ConfigError when the lm-eval extra is not installed."""
  try:
    from jaxlm.evals import lm_eval_adapter as adapter  # noqa: PLC0415
  except ModuleNotFoundError as e:
    if not (e.name or '').startswith('lm_eval'):
      raise
    raise ConfigError("lm-eval tasks need the lm-eval package: pip install 'jaxlm[eval]'") from None
  return adapter
