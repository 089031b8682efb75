"""Status lines on standard output, from rank 0 only and flushed, so that they reach the terminal
(or a log) in order with the per-epoch metric lines."""

from __future__ import annotations

import sys

from pytorch_lightning.utilities import rank_zero_only


@rank_zero_only
def say(message: str) -> None:
    print(message, file=sys.stdout, flush=True)


def run_command(main, errors=(Exception,)) -> None:
    """Run a command-line ``main()``: an error of the ``errors`` kinds is one line on standard
    error and exit status 2 (``DML_TRACEBACK=1`` shows the traceback instead)."""
    import os

    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C: the child runs are stopped with this process
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except errors as error:
        if os.environ.get("DML_TRACEBACK"):
            raise
        message = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
