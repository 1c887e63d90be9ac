"""The project's own error types: every clear, user-facing failure raises one of these."""


class MMQAError(Exception):
    """Base of every error mmqa raises on purpose."""


class DataError(MMQAError, ValueError):
    """Bad input data: the message names the file, the line (where there is one) and the problem."""


class ConfigError(MMQAError, ValueError):
    """A config value or combination that cannot work: the message names the key and the valid choices."""
