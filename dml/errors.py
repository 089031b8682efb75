"""Errors a user can act on. The command line prints them as one line, without a traceback
(set DML_TRACEBACK=1 to see it)."""


class ConfigError(ValueError):
    """A config key or value is not valid; the message names the key (``model.loss.name: ...``)."""


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message names the step, the loss parts and
    the learning rates."""


class NonFiniteEmbeddingsError(ValueError):
    """Evaluation embeddings hold NaN or inf; the message says how many rows."""


class NonFiniteStateError(RuntimeError):
    """The model's weights or buffers went NaN or infinite; the message names them and the step."""


class DiskFullError(OSError):
    """No space was left on the device while writing a file; the message names the file."""


class PretrainedWeightsUnavailable(RuntimeError):
    """Raised when ImageNet weights were asked for and cannot be had."""


def one_line_errors(run, args) -> int:
    """``run(args)`` for the file-handling commands (embed, index, search, export, compare): a
    ConfigError or OSError is one ``error:`` line naming the file, and exit status 2; 0
    otherwise (``DML_TRACEBACK=1`` shows the traceback instead)."""
    import os
    import sys

    try:
        run(args)
    except (ConfigError, OSError) as error:
        if os.environ.get("DML_TRACEBACK"):
            raise
        if isinstance(error, OSError) and not isinstance(error, ConfigError):
            error = ConfigError(f"{error.filename or 'a file'}: {error.strerror or error}")
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0
