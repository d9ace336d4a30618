"""The one exception type the CLI turns into a single-line error."""


class DinodistError(Exception):
    """A user-facing error: the message names the field or file at fault and fits on one line."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line logs."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
