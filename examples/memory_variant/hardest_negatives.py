"""A memory variant in one file: XBM's memory term over every stored positive but only the
hardest stored negatives.

For anchor i of the batch and the stored rows j with labels y_j, the term sums over the pairs

    P_i = {j : y_j = y_i}                  every stored positive
    N_i = the max(1, floor(f n_i)) stored negatives with the largest s_ij

where n_i = |{j : y_j != y_i}| and s_ij = <z_i, m_j> is the similarity of the anchor to the
stored row: the negatives most similar to the anchor, the ones a margin loss acts on. Everything
else (the warm-up, the enqueue order, XBN's transforms, the checkpointed buffers) is the memory
term's (``dml.losses.CrossBatchMemoryLoss``); this class overrides only ``select_pairs``.

Use it with ``examples/memory_variant/xbm_hardest_negatives.yaml`` on top of a memory method and
this folder on ``PYTHONPATH`` (docs/extending.md).
"""

import torch

from dml.losses import CrossBatchMemoryLoss


class HardestNegativesMemory(CrossBatchMemoryLoss):
    """Args: those of ``CrossBatchMemoryLoss``, and ``fraction`` f of each anchor's stored
    negatives to keep (the most similar; at least one)."""

    def __init__(self, *args, fraction: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        if not 0 < fraction <= 1:
            raise ValueError(f"model.memory.params.fraction: expected (0, 1], got {fraction}")
        self.fraction = fraction

    def select_pairs(self, embeddings, labels, reference, reference_labels, objective):
        """pytorch-metric-learning's (a1, p, a2, n) tuple: P_i and N_i for every anchor i."""
        same = labels[:, None] == reference_labels[None, :]
        a1, p = torch.nonzero(same, as_tuple=True)
        sims = (embeddings.detach() @ reference.T).masked_fill(same, float("-inf"))
        counts = (~same).sum(1)
        keep = torch.clamp((self.fraction * counts).floor().long(), min=1) * (counts > 0)
        order = torch.argsort(sims, dim=1, descending=True, stable=True)
        picked = torch.arange(sims.shape[1], device=sims.device)[None, :] < keep[:, None]
        a2 = torch.nonzero(picked, as_tuple=True)[0]
        return a1, p, a2, order[picked]
