"""The one exception type users see: a message that says what is wrong and where, shown without a traceback."""


class GlassboxError(Exception):
    """A user-facing error (bad input, missing file, wrong config). The CLI prints it as one line and exits 2."""
