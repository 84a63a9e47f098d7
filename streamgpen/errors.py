"""The one exception type for errors a user can cause and fix."""


class UserError(Exception):
    """An error caused by the user's input or environment.

    The CLI prints its message as one line on stderr and exits non-zero, without a traceback.
    """

    exit_code = 2
