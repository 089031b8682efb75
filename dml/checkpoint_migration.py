"""Checkpoints of earlier layouts, brought to the current one when they load.

- Before the objective existed, loss terms were module attributes: their weights are renamed
  (``loss_fn.`` -> ``objective.metric_loss.``, ...); the XBM/XBN memory and CCP's theta_prev, then
  callback state, are not carried over (they start afresh, with a warning) and resuming
  training from such a checkpoint is refused by the CLI's config check.
- The objective's metric loss was ``objective.metric`` and its terms by class path
  ``objective.extra``: renamed to ``objective.metric_loss`` and ``objective.terms`` (nothing
  lost); ``model.terms`` was a list, now a mapping by name (``dml.builder.terms_by_name``).
- The cross-batch memory gained ``sample_ids`` (each stored row's image index, for
  ``dml.callbacks.MemoryDrift``): a checkpoint without them gets -1 (unknown) for every row,
  which only leaves those rows out of the drift measure.
- Learning-rate schedulers stepped per epoch (cosine, step) are replaced by the per-step
  schedule's state; the schedule itself is rebuilt from the config (``dml.lr_schedule``).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

# Parameter names before the objective (loss terms as module attributes) -> now.
LEGACY_PREFIXES = {
    "loss_fn.": "objective.metric_loss.",
    "zero_shot_loss.": "objective.zero_shot.",
    "ibc.": "objective.ibc.",
}
# Names inside the objective before they said what they are -> now.
RENAMED_PREFIXES = {
    "objective.metric.": "objective.metric_loss.",
    "objective.extra.": "objective.terms.",
}


def rename_keys(state: Dict[str, Any], prefixes: Dict[str, str]) -> List[str]:
    """Keys of ``state`` starting with a prefix of ``prefixes`` renamed in place; the old keys."""
    old = [k for k in state if k.startswith(tuple(prefixes))]
    for key in old:
        prefix = next(p for p in prefixes if key.startswith(p))
        state[prefixes[prefix] + key[len(prefix) :]] = state.pop(key)
    return old


def migrate_checkpoint(checkpoint: Dict[str, Any]) -> bool:
    """Weights of earlier layouts renamed in place; whether the checkpoint is of the layout
    before the objective (whose memory and proximal state then start afresh)."""
    state = checkpoint.get("state_dict", {})
    legacy = rename_keys(state, LEGACY_PREFIXES)
    rename_keys(state, RENAMED_PREFIXES)
    return bool(legacy)


def migrate_schedulers(checkpoint: Dict[str, Any]) -> None:
    """Epoch-wise scheduler states of old as the per-step LambdaLR's (the step count kept)."""
    for i, state in enumerate(checkpoint.get("lr_schedulers") or []):
        if "lr_lambdas" not in state:
            checkpoint["lr_schedulers"][i] = {
                "last_epoch": state.get("last_epoch", 0),
                "base_lrs": state["base_lrs"],
                "lr_lambdas": [None] * len(state["base_lrs"]),
            }


def fill_fresh_state(checkpoint: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """State the earlier layout kept in callbacks (the memory, the proximal term's theta_prev):
    taken from ``current`` (the module's fresh state), so that it starts afresh; the keys."""
    state = checkpoint["state_dict"]
    fresh = [
        k
        for k in current
        if k not in state and k.startswith(("objective.proximal.", "objective.memory."))
    ]
    for key in fresh:
        state[key] = current[key]
    return fresh


# Buffers added to a module after checkpoints were written: filled from the fresh module.
ADDED_BUFFERS = (".sample_ids",)


def fill_added_buffers(checkpoint: Dict[str, Any], current: Dict[str, Any]) -> List[str]:
    """Buffers of ``ADDED_BUFFERS`` that ``checkpoint`` lacks, taken from ``current`` (the
    module's fresh state: "unknown"); the keys filled."""
    state = checkpoint.get("state_dict", {})
    added = [k for k in current if k.endswith(ADDED_BUFFERS) and k not in state]
    for key in added:
        state[key] = current[key]
    return added


def upgrade_checkpoint(checkpoint: Dict[str, Any], current: Dict[str, Any]) -> Optional[str]:
    """A checkpoint of any earlier layout brought to today's, in place (``current``: the
    module's fresh state dict); a warning to show when something could not be carried over."""
    migrate_schedulers(checkpoint)
    legacy = migrate_checkpoint(checkpoint)
    fill_added_buffers(checkpoint, current)
    if not legacy:
        return None
    fresh = fill_fresh_state(checkpoint, current)
    return (
        "checkpoint of the layout before the objective: weights renamed "
        "(loss_fn -> objective.metric_loss, ...)"
        + (f"; {len(fresh)} memory / proximal buffers start afresh" if fresh else "")
    )
