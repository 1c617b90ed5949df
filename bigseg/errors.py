"""The project's error types: one root, each also a matching builtin, each message saying the fix."""


class BigsegError(Exception):
    """Root of every error bigseg raises on purpose; the CLI prints it as one line.

    `param`: the parameter the message is about; the message then reads "<param> <message>"
    for a library user, and the CLI names its option instead (`--batch-size must be ...`)."""

    def __init__(self, message: str = "", *, param: str | None = None):
        self.param = param
        self.reason = message
        super().__init__(f"{param} {message}" if param else message)


class InputError(BigsegError, ValueError):
    """A user-supplied input (path, option value, band list) cannot be used."""


class RasterFormatError(BigsegError, ValueError):
    """A raster file cannot be opened or decoded as an image."""


class CheckpointError(BigsegError, ValueError):
    """A model file is missing, truncated, foreign or does not match its architecture."""


class EngineError(BigsegError, RuntimeError):
    """The inference engine the user named cannot run this model here."""


class OutputError(BigsegError, OSError):
    """An output cannot be written where it was asked to go."""


class DatasetError(BigsegError, ValueError):
    """A training or evaluation data folder has no layout bigseg recognises."""


class TrainingError(BigsegError, RuntimeError):
    """Training cannot go on (non-finite loss, incompatible resume state)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGINT) during a job; the message says what was kept and how to go on."""


def describe_failure(e: Exception) -> str:
    """One line for a failure bigseg did not foresee (a library's own error on a strange file): its
    most specific reason and type, without a traceback. A BigsegError is its message."""
    if isinstance(e, BigsegError):
        return str(e)
    return f"{first_line(e)} ({type(e).__name__})"


def first_line(e: BaseException) -> str:
    """The most specific one-line reason of `e`: rasterio chains GDAL's own reason as the
    innermost cause; the type's name when there is no message."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
