"""The one exception type that means "the user can fix this".

The CLI turns a UserError into a single line on stderr and a non-zero exit code, without a traceback (unless --debug).
Anything else reaching the top is a bug in malhae and is reported as such.
"""


class UserError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""

    exit_code = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class NotFound(UserError):
    """A name that is not there (a model, an adapter): a server answers it with 404."""


class Broken(UserError):
    """Something on this machine is broken, not the request (a model file that cannot be read): a server answers 500."""
