"""The one exception type that reaches users as a single line.

Anything the user can fix (a bad path, an out-of-range setting, malformed data) is raised as
``PrunekitError``; the CLI prints its message on one line and exits non-zero. Every other
exception is a bug in prunekit and is reported as such.
"""


class PrunekitError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def require(condition: bool, message: str) -> None:
    if not condition:
        raise PrunekitError(message)
