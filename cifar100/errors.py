"""The one family of errors a user can cause. Each message names the file or setting, what was expected and
what was found; the command line and the notebook show it as one line, without a traceback."""


class UserError(Exception):
    """Bad input from the user: a setting, a file, a folder. The message says what, where, and what to do."""


class ConfigError(UserError, ValueError):
    """A setting cannot work. The message names the setting and says why."""


class DatasetError(UserError):
    """A dataset file or folder is missing, unsafe, corrupt or inconsistent. The message says which."""


class RunError(UserError):
    """A run folder cannot be used as asked (locked by another process, damaged, or holding other settings)."""
