"""Pooling initialisation: a pooling that asks for it (GSP's prototypes) is initialised at the
first training step from the candidates it names (``dml.models.Pooling``'s contract: the
objective's class rows, or GAP embeddings of training batches), on rank 0, and its state
broadcast to every process.

``PoolingInitialization`` is a part of ``DMLModule`` (a mixin); the module's
``on_train_batch_start`` hook calls ``initialize_pooling`` while the pooling wants it. It runs at
the first step, after every ``on_train_start`` hook, so no callback order matters (CCP's proxies
are picked by then).
"""

from __future__ import annotations

import torch


class PoolingInitialization:
    """Expects the LightningModule's ``trainer``, ``backbone``, ``pooling``, ``head`` and
    ``objective``."""

    def initialize_pooling(self) -> None:
        """A pooling that asks for it (GSP's prototypes) is initialised on rank 0 from the
        candidates it wants, and its state broadcast. Runs at the first training step, after
        every ``on_train_start`` hook (CCP's proxies are picked by then)."""
        rows = self.objective.class_representatives()
        source = self.pooling.candidate_source(None if rows is None else len(rows))
        candidates = (
            rows if source == "class_rows" else self.gap_embeddings(self.pooling.init_batches)
        )
        if self.trainer.is_global_zero:
            self.pooling.initialize(candidates)
        for tensor in self.pooling.state_dict().values():  # every rank: rank 0's state
            tensor.copy_(self.trainer.strategy.broadcast(tensor, src=0))

    @torch.no_grad()
    def gap_embeddings(self, batches: int) -> torch.Tensor:
        """The head's raw output (W f + b) of GAP features of ``batches`` training batches (eval
        mode)."""
        was_training = self.training
        self.eval()
        embeddings = []
        dm = self.trainer.datamodule
        for i, batch in enumerate(dm.train_dataloader()):
            if i >= batches:
                break
            features = self.backbone(dm.device_batch(batch, self.device)[0])
            embeddings.append(self.head(features.mean(dim=(2, 3)))[0])  # raw: W f + b
        self.train(was_training)
        return torch.cat(embeddings)
