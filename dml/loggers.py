"""Loggers: W&B that goes offline by itself when no login exists (sync later with `wandb sync`)."""
from __future__ import annotations

import os
from typing import Optional

from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger


def wandb_logged_in() -> bool:
    """True when an API key is available (environment or ~/.netrc), without network access."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class WandbLogger(_LightningWandbLogger):
    """Lightning's WandbLogger; ``offline=None`` (the default) means offline unless logged in.

    ``WANDB_MODE`` in the environment (online, offline, disabled) still wins, as in wandb.
    """

    def __init__(self, project: str = "dml", save_dir: str = "runs", offline: Optional[bool] = None,
                 **kwargs):
        if offline is None:
            mode = os.environ.get("WANDB_MODE", "")
            if mode in ("online", "offline", "dryrun", "disabled"):
                offline = mode in ("offline", "dryrun")  # disabled: wandb itself reads the env
            else:
                offline = not wandb_logged_in()
        os.makedirs(save_dir, exist_ok=True)
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
