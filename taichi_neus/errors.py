"""Errors a user can act on.

Anything raised as :class:`UserInputError` is printed by the command-line entry
points as one sentence (no traceback) and the process exits with status 2.
The message names the file or option at fault and says what to do.
"""


class UserInputError(ValueError):
    """Bad input from the user: a missing file, a wrong shape, an unknown option."""

    exit_code = 2
