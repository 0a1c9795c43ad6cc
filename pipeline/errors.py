"""The one exception type users see: a clear, one-line message naming the thing and the fix."""


class LdsError(Exception):
    """A problem with the user's input or environment, reported as one line without a traceback."""


class ItemError(LdsError):
    """A problem with one item (an unreadable image): the stage records it and goes on with the others."""


def one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
