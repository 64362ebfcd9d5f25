"""The one error type users see.

Every bad input the project can foresee (a missing checkpoint, a malformed JSONL line, an adapter that
does not fit) is raised as `QloraError` with a one-line message naming the file or field and what was
expected. The CLI prints that line and exits 2; it never shows a stack trace for these.
"""


class QloraError(Exception):
    """A problem with the user's input or files, explained in one line."""
