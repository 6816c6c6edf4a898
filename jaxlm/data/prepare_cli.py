"""`jaxlm prepare`'s command line: the flags of `prepare`, plus which runner writes the store.

`--runner=local` (default) is `jaxlm.data.prepare` on this machine's `--workers`
processes; `--runner=beam` is `jaxlm.data.beam_prepare` on any Apache Beam runner
(`--beam_options`), imported only then (apache-beam is the `jaxlm[beam]` extra).
Both write the same store.
"""

import importlib.util
from typing import List

from absl import flags

from jaxlm.core.errors import ConfigError
from jaxlm.data import prepare


def define_flags(fv: flags.FlagValues) -> None:
  prepare.define_flags(fv)
  flags.DEFINE_enum('runner', 'local', ('local', 'beam'),
                    "'local': this machine's --workers processes; 'beam': an Apache Beam "
                    'pipeline (jaxlm[beam]) writing the same store', flag_values=fv)
  flags.DEFINE_string('beam_options', '', "--runner=beam: Beam's own options, passed as they "
                      "are (e.g. '--runner=DataflowRunner --project=P --region=R'); default "
                      'the DirectRunner in multi-processing mode with --workers processes',
                      flag_values=fv)


def run(fv: flags.FlagValues, args: List[str]) -> int:
  if fv.runner == 'local':
    if fv.beam_options:
      raise ConfigError('--beam_options is for --runner=beam')
    return prepare.run(fv, args)
  if args:
    raise ConfigError(f"jaxlm prepare takes no positional arguments, got '{' '.join(args)}'")
  for name in ('input', 'output'):
    if not fv[name].value:
      raise ConfigError(f'jaxlm prepare needs --{name}')
  if importlib.util.find_spec('apache_beam') is None:
    raise ConfigError("--runner=beam needs Apache Beam: pip install 'jaxlm[beam]'")
  from jaxlm.data import beam_prepare  # noqa: PLC0415  (imports apache_beam)
  m = beam_prepare.run(fv.input, fv.output, beam_options=fv.beam_options, fmt=fv.format,
                       field=fv.field, text_unit=fv.text_unit, tokenizer=fv.tokenizer,
                       tokenizer_path=fv.tokenizer_path, docs_per_shard=fv.docs_per_shard,
                       workers=fv.workers, add_bos=fv.add_bos, add_eos=fv.add_eos)
  prepare.report(fv.input, fv.output, m)
  return 0
