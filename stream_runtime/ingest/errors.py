"""The one error type ingest raises at its public boundary."""

from __future__ import annotations


class IngestError(ValueError):
    """A source that cannot be opened or decoded: missing, corrupt, no video stream, unsupported codec.

    A ``ValueError`` so callers that validate inputs catch it; ``path`` and ``reason`` are kept apart
    so a server can report them without parsing the message.

    Example::

        try:
            frames = list(FileSource("clip.mp4"))
        except IngestError as err:
            print(err.path, err.reason)
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot ingest {path!r}: {reason}")

    def __reduce__(self):
        # Raised inside worker processes and pickled back: rebuild from (path, reason), not the message.
        return (type(self), (self.path, self.reason))
