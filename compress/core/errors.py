"""Errors that end a run with a message for the user (the CLI prints them without a traceback)."""


class CompressError(RuntimeError):
    """Base class: something the user can act on, said in words. ``result``: what the failing stage did
    (a :class:`compress.stages.base.StageResult`, or a method's report), recorded before the run fails."""

    def __init__(self, message: str = "", result=None):
        super().__init__(message)
        self.result = result


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and the valid choices."""


class UnsupportedModelError(CompressError):
    """The model (or part of it) is something compress cannot handle; raised before any work."""


class ShortfallError(CompressError):
    """A stage compressed nothing, or less than it was asked to. ``result`` holds what it did (a
    :class:`compress.stages.base.StageResult` when raised by a stage, else the method's report)."""


class SaveError(CompressError):
    """A saved checkpoint does not reload as it must (the message names the cause and the alternative)."""
