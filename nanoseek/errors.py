"""One exception type for every user-facing failure.

The CLI prints `error: <message>` and exits 1 (no traceback unless --debug), so the
message must name the file, field or request at fault.
"""


class NanoseekError(Exception):
    """A failure caused by the user's input (file, config field, request), not by a bug."""
