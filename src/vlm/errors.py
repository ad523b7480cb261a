"""Errors every layer may raise about what the user asked for. Imports nothing of the project."""


class ConfigError(ValueError):
    """A config value is invalid or cannot work on this machine; the message names the key."""
