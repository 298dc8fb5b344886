"""The config's error type, apart so that every module of the package can raise it, and how its
messages show a value."""
import reprlib


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names file and key."""


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxtuple, _SHOWN.maxdict = 3, 8, 8, 8
_SHOWN.maxstring = _SHOWN.maxother = 120


def shown(value: object) -> str:
    """repr(value) cut to about a line: a value is named in an error, not dumped (a YAML file of
    nested aliases, a few hundred bytes, expanded to a 312 MB error line through {value!r})."""
    return _SHOWN.repr(value)
