"""Errors a user can fix.

Every mistake a user can make (a typo in a config key, a missing file, a malformed JSONL line)
raises a subclass of :class:`UserError` whose message names the file, line, key or value and
says what would work. The CLI prints that one message without a traceback (unless ``--debug``).
Anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in the user's input: the message alone tells them what to change."""


class ConfigError(UserError):
    """A config key, value or combination that cannot work."""


class DataError(UserError):
    """A data file that is missing, empty or malformed."""


class CheckpointError(UserError):
    """A checkpoint folder that is missing or incomplete."""
