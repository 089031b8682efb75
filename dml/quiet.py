"""Known third-party console noise that does not concern a user of ``python -m dml``, silenced
at the entry points only (the library itself filters nothing; every other warning still shows).

- Lightning's "LightningCLI's args parameter ... not recommended" with the whole command line:
  ``dml.cli`` composes the config files and hands LightningCLI the composed ``args`` on purpose.
- Lightning's "💡 Tip: ... litlogger" after the loggers are set up (an advertisement), and its
  "Seed set to 0" and "GPU / TPU / HPU available: ..." lines before a run's first line: the run
  folder line names the seed, and the line after the validation line the devices trained on
  (Lightning's warning "GPU available but not used" still shows).
- "`isinstance(treespec, LeafSpec)` is deprecated": Lightning's own use of a torch internal.
- "`torch.jit.trace` is deprecated" on ``export --format torchscript``: the format is the user's
  explicit choice, and docs/usage.md says TorchScript is deprecated in torch (ONNX is not).

W&B's "The anonymous setting has no effect" is not filtered: ``dml.loggers.WandbLogger`` no
longer passes the setting.
"""

from __future__ import annotations

import logging
import re
import warnings

KNOWN_WARNINGS = (
    (r"LightningCLI's args parameter is intended to run from within Python", UserWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", Warning),
    (r"`torch\.jit\.trace` is deprecated", FutureWarning),
)
LIGHTNING_LOGGERS = (
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
    "lightning_fabric.utilities.seed",
)
DROPPED_LINES = ("💡 Tip:", "Seed set to ", "GPU available:", "TPU available:", "HPU available:")


class _DropTips(logging.Filter):
    """Drops the Lightning info lines that start with ``DROPPED_LINES``, passes the rest."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = re.sub(r"^\[rank: \d+\] ", "", str(record.getMessage()))  # DDP's prefix
        return not message.startswith(DROPPED_LINES)


def quiet_known_noise() -> None:
    """Silence the messages of the module docstring in this process (idempotent)."""
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in LIGHTNING_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
