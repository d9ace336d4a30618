"""The one exception type the CLI turns into a single-line error."""


class DinodistError(Exception):
    """A user-facing error: the message names the field or file at fault and fits on one line."""
