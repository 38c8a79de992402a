"""Errors meant for people: one message naming what is wrong and what was expected.

Every user-facing failure (bad file, bad YAML, bad flag, bad request) raises a subclass of
KtransError; the CLI prints its message without a traceback and exits non-zero.
"""


class KtransError(Exception):
    """Base class of every error ktrans reports to a user."""


class UsageError(KtransError):
    """A command-line flag or argument has an invalid value."""
