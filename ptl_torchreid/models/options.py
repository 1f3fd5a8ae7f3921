"""Checks of the cell's and the PTL model's options: the one place their ranges are checked.

The constructors call them, and so does the config before any work starts; :class:`InvalidOption` says which
option failed, with its value and what would be valid, so that the config can name its own key in the message.
"""


class InvalidOption(ValueError):
    """An option value a cell or a PTL model does not accept.

    Attributes: ``option`` (the constructor argument), ``value``, ``requirement`` (what would be valid) and
    ``choices`` (the valid values, or None when the requirement is a range)."""

    def __init__(self, option, value, requirement, choices=None):
        self.option, self.value, self.requirement = option, value, requirement
        self.choices = tuple(choices) if choices is not None else None
        super().__init__(f"{option}={value!r} is not valid; {requirement}")


def check_choice(option, value, choices):
    """Raise :class:`InvalidOption` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise InvalidOption(option, value, "choose one of " + ", ".join(choices), choices)
