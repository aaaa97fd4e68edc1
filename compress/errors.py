"""Errors that end a run with a message for the user (the CLI prints them without a traceback)."""


class CompressError(RuntimeError):
    """Base class: something the user can act on, said in words."""


class UnsupportedModelError(CompressError):
    """The model (or part of it) is something compress cannot handle; raised before any work."""


class ShortfallError(CompressError):
    """A stage compressed nothing, or less than it was asked to. ``report`` holds what it did."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
