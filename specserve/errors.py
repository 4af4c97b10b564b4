"""User-facing errors."""


class SpecServeError(Exception):
    """A user error: bad input or configuration.

    ``param`` names the offending parameter so that CLIs and HTTP front ends
    can report it (OpenAI error ``param`` field) without a traceback.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
        self.message = message
