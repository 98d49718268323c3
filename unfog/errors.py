"""The one exception type unfog raises for bad input."""


class UnfogError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it."""
