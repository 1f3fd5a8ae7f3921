"""The config's error, and the messages that name a config key, its value and how to fix it."""
import difflib

__all__ = ["ConfigError", "choice_error", "option_error"]


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the key and how to fix it."""


def choice_error(key, value, choices):
    """``key = value`` is not one of ``choices``: the error names the nearest valid values."""
    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in near)}?" if near else ""
    valid = ", ".join(map(str, choices))
    return ConfigError(f"{key} = {value!r} is not valid.{hint} Valid values: {valid}.")


def option_error(key, error):
    """An option check's :class:`~ptl_torchreid.models.options.InvalidOption` as the error of config ``key``."""
    if error.choices is not None:
        return choice_error(key, error.value, error.choices)
    return ConfigError(f"{key} = {error.value!r} is not valid; {error.requirement}")
