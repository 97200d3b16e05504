"""The one family of errors a user can cause. Each message names the file or setting, what was expected and
what was found; the command line and the notebook show it as one line, without a traceback."""

import reprlib


class UserError(Exception):
    """Bad input from the user: a setting, a file, a folder. The message says what, where, and what to do."""


class ConfigError(UserError, ValueError):
    """A setting cannot work. The message names the setting and says why."""


class DatasetError(UserError):
    """A dataset file or folder is missing, unsafe, corrupt or inconsistent. The message says which."""


class RunError(UserError):
    """A run folder cannot be used as asked (locked by another process, damaged, or holding other settings)."""


def shown(value, limit: int = 60) -> str:
    """A value read from a file, safe to put in a message: bounded in length, its control characters
    escaped, and an integer too long to print (Python refuses over 4,300 digits) named by its size."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = reprlib.repr(value)
    except (ValueError, RecursionError):
        text = f"a {type(value).__name__}"
    return printable(text[:limit])


def printable(text: str) -> str:
    """`text` (a name from data or a folder name) with every control or format character (terminal escapes,
    bidirectional overrides) written as an escape, so that printing it cannot clear or recolour a terminal."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else char.encode("unicode_escape").decode("ascii") for char in text)
