"""Errors a user can act on. The command line prints them as one line, without a traceback
(set DML_TRACEBACK=1 to see it)."""


class ConfigError(ValueError):
    """A config key or value is not valid; the message names the key (``model.loss.name: ...``)."""
