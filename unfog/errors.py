"""The one exception type unfog raises for bad input."""


class UnfogError(ValueError):
    """A user-facing error: the message says what was wrong and how to fix it. `field` names
    the request field at fault, where there is one (the server reports it)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field
