"""``jaxlm <command> --flags``: train, eval, generate, plan, and plug-in commands.

Core commands (train/eval/generate/plan) take a config and live in
jaxlm.cli.commands. Other commands live in their own module, listed in
``PLUGINS``, which provides ``define_flags(fv)`` and ``run(fv, args) -> int``
(``args``: positional words after the command, e.g. ``jaxlm tokenizer train``).

Every user error ends as one ``jaxlm: error:`` line on stderr and a documented
exit status (jaxlm.core.errors: 2 bad input, 3 diverged, 4 storage fault; 75 for a
train run stopped early by a signal); a traceback means a bug in jaxlm.
"""

import difflib
import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxlm import configs
from jaxlm.core.errors import EXIT_BAD_INPUT, EXIT_CODES_HELP, ConfigError, JaxlmError
from jaxlm.run import lock, preflight

COMMANDS = ('train', 'eval', 'generate', 'plan')
PLUGINS = {
    'prepare': 'jaxlm.data.prepare_cli',  # corpus -> token store (local or Apache Beam)
    'tokenizer': 'jaxlm.data.tokenizer_train',  # `jaxlm tokenizer train ...`
    'convert': 'jaxlm.cli.convert',  # Hugging Face import/export
    'finetune': 'jaxlm.run.finetune',  # supervised fine-tuning from a checkpoint or HF model
}
WRITERS = ('train', 'finetune', 'convert')  # commands that may create their --workdir
USAGE = f"""usage: jaxlm {{{','.join(COMMANDS + tuple(PLUGINS))}}} [--flags]

  jaxlm train    --config=demo --workdir=runs/demo [--config.train.steps=100 ...]
                 (--config: a shipped name, see jaxlm/configs/, or a config file)
  jaxlm eval     --workdir=runs/demo [--config=F] [--restore_step=N]
                 [--tasks=hellaswag,arc_easy --limit=N --num_fewshot=K --include_path=DIR]
  jaxlm generate --workdir=runs/demo --prompt='def ' [--max_new_tokens=200 --temperature=0.8
                 --top_k=40 --top_p=1.0 --seed=0]
  jaxlm plan     --config=llama_8b [--target=h100-80g|v5p-512] [--devices=N] [--slices=K]
  jaxlm <plugin> --help   for prepare, tokenizer, convert, finetune
"""
TRAIN_HELP = f"""usage: jaxlm train --config=<name or file.py> --workdir=DIR [--config.a.b=value ...]
                   [--restore_step=N] [--init_from=WORKDIR_OR_HF_DIR]
                   [--coordinator_address=H:P --num_processes=N --process_id=I]
                   [--peer_timeout=60]

Trains to train.steps, resuming from the latest checkpoint in --workdir. With
--init_from, a new run starts from that workdir's (step --restore_step, default its
latest) or Hugging Face model's parameters with a fresh optimizer and schedule; the
source is recorded in config.json (train.init_from). Every config field, its default
and meaning: jaxlm/configs/base.py.

{EXIT_CODES_HELP}
"""


def _define(fv: flags.FlagValues, command: str) -> None:
  config_flags.DEFINE_config_file('config', None, 'config file (configs/<size>.py)',
                                  flag_values=fv, lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory (config, checkpoints, metrics)',
                      flag_values=fv)
  flags.DEFINE_integer('restore_step', None, 'restore this checkpoint step, not the latest',
                       flag_values=fv)
  if command == 'train':
    lock.define_flags(fv)
    flags.DEFINE_string('init_from', '', 'new run from the parameters of this jaxlm workdir '
                        '(--restore_step: its step) or Hugging Face model directory, with a fresh '
                        'optimizer and schedule (sets train.init_from)', flag_values=fv)
    flags.DEFINE_string('coordinator_address', '', 'multi-host: host:port of process 0',
                        flag_values=fv)
    flags.DEFINE_integer('num_processes', 0, 'multi-host: number of processes', flag_values=fv)
    flags.DEFINE_integer('process_id', -1, 'multi-host: this process index', flag_values=fv)
    flags.DEFINE_float('peer_timeout', 60, 'multi-host: seconds without a heartbeat from another '
                       'process before every process stops with exit 75 (0 = jax default)',
                       lower_bound=0, flag_values=fv)
  if command == 'eval':
    flags.DEFINE_list('tasks', [], 'lm-evaluation-harness tasks (e.g. hellaswag,arc_easy); '
                      'empty = validation loss', flag_values=fv)
    flags.DEFINE_string('include_path', '', 'folder of extra lm-eval task YAMLs', flag_values=fv)
    flags.DEFINE_integer('limit', 0, 'lm-eval: examples per task (0 = all)', flag_values=fv)
    flags.DEFINE_integer('num_fewshot', -1, "lm-eval: few-shot examples (-1 = task's default)",
                         flag_values=fv)
    flags.DEFINE_integer('batch_size', 32, 'lm-eval: rows per forward pass', flag_values=fv)
  if command == 'plan':
    flags.DEFINE_string('target', '', "hardware to compile for and fit: v5e-N, v5p-N, v6e-N "
                        "(Cloud TPU names), a100-80g, h100-80g, h200, b200 (with --devices GPUs), "
                        "or GiB per device ('' = this host's accelerator)", flag_values=fv)
    flags.DEFINE_integer('devices', 0, 'devices to plan for (0 = the TPU target\'s chips, else '
                         'this host if the mesh fits it, else the mesh the config names)',
                         flag_values=fv)
    flags.DEFINE_integer('slices', 1, 'TPU multislice: slices of --target joined over DCN',
                         flag_values=fv)
  if command == 'generate':
    flags.DEFINE_string('prompt', '', 'text to continue', flag_values=fv)
    flags.DEFINE_integer('max_new_tokens', 200, 'tokens to generate', flag_values=fv)
    flags.DEFINE_float('temperature', 0.8, 'sampling temperature (0 = greedy)', flag_values=fv)
    flags.DEFINE_integer('top_k', 0, 'keep the k most likely tokens (0 = all)', flag_values=fv)
    flags.DEFINE_float('top_p', 1.0, 'nucleus sampling mass (1 = off)', flag_values=fv)
    flags.DEFINE_integer('seed', 0, 'sampling seed', flag_values=fv)


def _resolve_config_arg(argv: list[str]) -> tuple[str | None, list[str]]:
  """(the --config value, argv with it resolved to a file: see jaxlm.configs.resolve)."""
  argv = list(argv)
  for i, a in enumerate(argv):
    if a.startswith('--config='):
      value = a.split('=', 1)[1]
      argv[i] = '--config=' + configs.resolve(value)
      return value, argv
    if a == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
      argv[i + 1] = configs.resolve(value)
      return value, argv
  return None, argv


def _unknown_override(load_cfg, argv: list[str]) -> str | None:
  """Names the first --config.x.y override whose key the config (``load_cfg()``) lacks."""
  try:
    cfg = load_cfg()
  except Exception:  # noqa: BLE001  (the original error is reported instead)
    return None
  for a in argv:
    if not a.startswith('--config.'):
      continue
    key = a[len('--config.'):].split('=', 1)[0]
    node = cfg
    parts = key.split('.')
    for i, part in enumerate(parts):
      if not hasattr(node, 'keys') or part not in node.keys():
        known = list(node.keys()) if hasattr(node, 'keys') else []
        hint = difflib.get_close_matches(part, known, n=1)
        where = '.'.join(parts[:i]) or 'config'
        return (f"unknown config key '{key}' ('{part}' is not in {where}"
                + (f"; did you mean '{hint[0]}'?)" if hint else ')'))
      node = node[part]
  return None


def parse(command: str, argv: list[str]) -> flags.FlagValues:
  """Parses flags for ``command``; bad flags become a ConfigError naming the key."""
  fv = flags.FlagValues()
  _, argv = _resolve_config_arg(argv)
  # config_flags discovers --config.x overrides from sys.argv, so make it ours.
  saved_argv, sys.argv = sys.argv, ['jaxlm'] + argv
  try:
    _define(fv, command)
    return _parse(fv, command, argv)
  finally:
    sys.argv = saved_argv


def _parse(fv: flags.FlagValues, command: str, argv: list[str]) -> flags.FlagValues:
  given, argv = _resolve_config_arg(argv)
  path = configs.resolve(given) if given is not None else None
  if path is not None and not os.path.exists(path.split(':')[0]):
    raise ConfigError(f"config file '{given}' does not exist (shipped configs: "
                      f"{', '.join(configs.names())})")
  if path is None and command in ('train', 'plan'):
    raise ConfigError(f'jaxlm {command} needs --config=<name> or --config=<file.py> '
                      f"(shipped: {', '.join(configs.names())})")
  _apply(lambda: fv(['jaxlm'] + argv), argv,
         lambda: configs.load(path), path)
  return fv


def _apply(parse, argv: list[str], load_cfg, path: str | None) -> None:
  """Runs ``parse()``; bad flags and overrides in ``argv`` become a ConfigError naming the key."""
  try:
    parse()
  except flags.Error as e:
    msg = str(e).splitlines()[0]
    raise ConfigError(msg.replace('flag --config.', 'config key ')) from None
  except (AttributeError, KeyError) as e:
    raise ConfigError(_unknown_override(load_cfg, argv) or f'bad config override: {e}') from None
  except (OSError, TypeError, ValueError) as e:
    raise ConfigError(f"cannot load config '{path}': {str(e).strip().splitlines()[-1]}") from None


def override(cfg, argv: list[str]):
  """``cfg`` with ``--config.a.b=v`` arguments applied exactly as ``jaxlm train`` applies them.

  For scripts (bench/) that build a config in code; other arguments are an error.
  """
  fv = flags.FlagValues()
  saved_argv, sys.argv = sys.argv, ['jaxlm'] + argv
  try:
    def parse():
      config_flags.DEFINE_config_dict('config', cfg, flag_values=fv)
      fv(['jaxlm'] + argv)
    _apply(parse, argv, lambda: cfg, None)
  finally:
    sys.argv = saved_argv
  return fv.config


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv or argv[0] in ('-h', '--help', 'help'):
    print(USAGE)
    return 0
  command, rest = argv[0], argv[1:]
  if command not in COMMANDS and command not in PLUGINS:
    print(f"jaxlm: error: unknown command '{command}'\n{USAGE}", file=sys.stderr)
    return EXIT_BAD_INPUT
  if command in COMMANDS and ('--help' in rest or '-h' in rest):
    print(TRAIN_HELP if command == 'train' else USAGE)
    return 0
  if command == 'train':
    from jaxlm.run import runtime, supervise  # noqa: PLC0415
    if supervise.wanted() and runtime.multi_process_env(rest):
      return supervise.run(argv)  # C++ aborts on a lost peer -> one line, exit 75
  try:
    # A refused train / finetune / import leaves no new workdir behind (jaxlm.run.preflight).
    with preflight.WorkdirGuard(preflight.workdir_arg(rest) if command in WRITERS else None):
      if command in PLUGINS:
        return _run_plugin(command, rest)
      fv = parse(command, rest)
      from jaxlm.cli import commands  # noqa: PLC0415  (imports jax; keep --help fast)
      return getattr(commands, command)(fv) or 0
  except JaxlmError as e:
    print(f'jaxlm: error: {e}', file=sys.stderr)
    return e.exit_code
  except KeyboardInterrupt:
    print('jaxlm: interrupted', file=sys.stderr)
    return 130


def _run_plugin(command: str, argv: list[str]) -> int:
  import importlib  # noqa: PLC0415
  try:
    module = importlib.import_module(PLUGINS[command])
  except ModuleNotFoundError as e:
    if e.name != PLUGINS[command]:
      raise
    raise ConfigError(f"command '{command}' is not available in this version") from None
  fv = flags.FlagValues()
  module.define_flags(fv)
  if '--help' in argv or '-h' in argv:
    usage = getattr(module, 'USAGE', f'usage: jaxlm {command} [--flags]')
    print(f'{usage}\n{fv.main_module_help() or fv}')
    return 0
  try:
    args = fv(['jaxlm'] + argv)[1:]
  except flags.Error as e:
    raise ConfigError(str(e).splitlines()[0]) from None
  return module.run(fv, args) or 0


if __name__ == '__main__':
  sys.exit(main())
