"""The one exception type users see: a clear, one-line message naming the thing and the fix."""


class LdsError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""
