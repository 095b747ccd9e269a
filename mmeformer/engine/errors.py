"""Errors of the training / testing front-ends: each message names the fix."""


class LaunchError(RuntimeError):
    """A command-line or environment choice that cannot work; the message names the fix."""


class ConfigError(LaunchError, ValueError):
    """A config value that cannot work; the message names the key, the valid values and the
    fix. A ``ValueError`` for API users, a ``LaunchError`` for the tools (``error: ...``)."""
