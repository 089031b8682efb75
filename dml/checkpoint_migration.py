"""Checkpoints of earlier layouts, brought to the current one when they load.

- Before the objective existed, loss terms were module attributes: their weights are renamed
  (``loss_fn.`` -> ``objective.metric.``, ...); the XBM/XBN memory and CCP's theta_prev, then
  callback state, are not carried over (they start afresh, with a warning) and resuming
  training from such a checkpoint is refused by the CLI's config check.
- Learning-rate schedulers stepped per epoch (cosine, step) are replaced by the per-step
  schedule's state; the schedule itself is rebuilt from the config (``dml.lr_schedule``).
"""
from __future__ import annotations

from typing import Any, Dict, List

# Parameter names before the objective (loss terms as module attributes) -> now.
LEGACY_PREFIXES = {"loss_fn.": "objective.metric.", "zero_shot_loss.": "objective.zero_shot.",
                   "ibc.": "objective.ibc."}


def migrate_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """Weights of the layout before the objective renamed in place; whether any was."""
    state = checkpoint.get("state_dict", {})
    legacy = [k for k in state if k.startswith(tuple(LEGACY_PREFIXES))]
    for key in legacy:
        prefix = next(p for p in LEGACY_PREFIXES if key.startswith(p))
        state[LEGACY_PREFIXES[prefix] + key[len(prefix):]] = state.pop(key)
    return bool(legacy)


def migrate_schedulers(checkpoint: Dict[str, Any]) -> None:
    """Epoch-wise scheduler states of old as the per-step LambdaLR's (the step count kept)."""
    for i, state in enumerate(checkpoint.get("lr_schedulers") or []):
        if "lr_lambdas" not in state:
            checkpoint["lr_schedulers"][i] = {
                "last_epoch": state.get("last_epoch", 0), "base_lrs": state["base_lrs"],
                "lr_lambdas": [None] * len(state["base_lrs"])}


def fill_fresh_state(checkpoint: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """State the earlier layout kept in callbacks (the memory, the proximal term's theta_prev):
    taken from ``current`` (the module's fresh state), so that it starts afresh; the keys."""
    state = checkpoint["state_dict"]
    fresh = [k for k in current if k not in state and
             k.startswith(("objective.proximal.", "objective.memory."))]
    for key in fresh:
        state[key] = current[key]
    return fresh
