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
