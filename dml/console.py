"""Status lines on standard output, from rank 0 only and flushed, so that they reach the terminal
(or a log) in order with the per-epoch metric lines."""
from __future__ import annotations

import sys

from pytorch_lightning.utilities import rank_zero_only


@rank_zero_only
def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)
