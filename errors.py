"""Errors that the CLI turns into one line and an exit code, without a traceback."""


class M3ViTError(Exception):
    """A failure of the tool's work (exit code 1)."""

    exit_code = 1


class UsageError(M3ViTError):
    """Bad input from the user: options, configuration, files (exit code 2)."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid model, precision or hardware configuration."""
