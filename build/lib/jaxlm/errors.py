"""User-facing errors: raised anywhere, printed as one line by the CLI."""


class JaxlmError(Exception):
  """A problem with the user's input (config, data, checkpoint); no traceback shown."""


class ConfigError(JaxlmError):
  """A config key is unknown, mistyped or inconsistent with another."""


class DataError(JaxlmError):
  """A data path is missing, empty or unreadable."""


class CheckpointError(JaxlmError):
  """A checkpoint is missing, partial, corrupt or does not match the model."""
