"""The config's error type, apart so that every module of the package can raise it."""


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file and key."""
