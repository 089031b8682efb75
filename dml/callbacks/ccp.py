"""CCP's projection rounds as a Lightning callback: ``ccp: {enabled: true}`` (docs/methods/ccp.md).

Training alternates between optimising the network and proxies (a round) and projecting the
proxies back onto sample embeddings. The proxies and the proximal term are the objective's
(``model.loss.proxies_per_class``; ``dml.objective``); this callback decides when a round ends
and acts only through the objective's public methods. At every validation it tracks the
round's best score (``monitor``, validation MAP@R) and snapshots the network weights
(``DMLModule.network_parameters``: every trainable weight outside the objective) and the
proxies at that best. A round ends when the score has not improved for ``patience``
validations and the round has lasted at least ``min_epochs``. Then:

1. theta_prev <- the round's best network weights and lambda = ``lam`` * ``lam_decay`` ** r
   after r rounds, as the released callback sets it (``Objective.anchor_proximal``; lambda 0
   during round 0);
2. a candidate pool per class: ``pool_passes`` (b) passes over the classes, one training image
   per class per pass, drawn without replacement from a shuffled list of the class's images
   (reshuffled when it runs out), training augmentation, network in eval mode (b * K passes
   when b < K, as in the released code);
3. the K proxies of each class are replaced by K greedy k-center picks from its pool, seeded
   with the class's proxies at the round's best (``Objective.pick_proxies`` / ``set_proxies``).

Before the first round the same selection runs seeded with the origin (the released code's zero
initial proxies), unless the proxies were already picked (a resumed run).

Under DDP the decision is the same on every rank (the validation metrics are broadcast); rank 0
builds the pool and picks, the new proxies are broadcast. The round counter, best score and the
best snapshot are saved in checkpoints (callback state); theta_prev, lambda and the proxies are
the model's.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from dml.errors import ConfigError


class ChanceConstraintProjection(pl.Callback):
    """Args:
    enabled: run the rounds (needs model.loss.proxies_per_class >= 1).
    monitor: the validation metric whose plateau ends a round (val/MAP@R).
    patience: validations without improvement that end a round (3).
    min_epochs: the shortest round, in validations (1).
    min_delta: improvement below this does not count (1e-5).
    lam: lambda0 of the proximal term, which is 0 during round 0 (2e-4).
    lam_decay: lambda = lam * lam_decay ** r after r rounds.
    pool_passes: b, candidate images per class (12 on CUB/Cars, 7 on SOP/In-Shop).
    init_from_samples: pick the first proxies from sample embeddings (true).
    batch_size: batch size of the pool's forward passes.
    seed: seed of the pool's image draws (the draw of round r uses seed + r).
    """

    def __init__(
        self,
        enabled: bool = False,
        monitor: str = "val/MAP@R",
        patience: int = 3,
        min_epochs: int = 1,
        min_delta: float = 1e-5,
        lam: float = 2e-4,
        lam_decay: float = 1.0,
        pool_passes: int = 12,
        init_from_samples: bool = True,
        batch_size: int = 128,
        seed: int = 0,
    ):
        if patience < 1 or min_epochs < 1 or pool_passes < 1:
            raise ConfigError("ccp.patience, ccp.min_epochs and ccp.pool_passes must be >= 1")
        if lam < 0:
            raise ConfigError(f"ccp.lam must be >= 0, got {lam}")
        self.enabled, self.monitor, self.patience = enabled, monitor, patience
        self.min_epochs, self.min_delta = min_epochs, min_delta
        self.lam0, self.lam_decay, self.pool_passes = lam, lam_decay, pool_passes
        self.init_from_samples, self.batch_size, self.seed = init_from_samples, batch_size, seed
        # state (state_dict)
        self.round = 0
        self.lam = 0.0
        self.best_score = -float("inf")
        self.checks_in_round = 0
        self.checks_without_gain = 0
        self.best_weights: Dict[str, torch.Tensor] = {}
        self.best_proxies: Optional[torch.Tensor] = None
        self.history: list = []  # (round, epoch, global_step, best score, seconds)
        self.last_reinit_seconds = 0.0

    @property
    def state_key(self) -> str:
        return "ChanceConstraintProjection"

    # --- wiring ----------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.enabled and not pl_module.objective.has_multi_proxy():
            raise ConfigError(
                "ccp.enabled needs proxies: set model.loss.proxies_per_class >= 1 "
                "(8 on CUB/Cars, 4 on SOP/In-Shop)"
            )

    def state_dict(self) -> Dict[str, Any]:
        if not self.enabled:
            return {}
        return {
            "round": self.round,
            "lam": self.lam,
            "best_score": self.best_score,
            "checks_in_round": self.checks_in_round,
            "checks_without_gain": self.checks_without_gain,
            "best_weights": self.best_weights,
            "best_proxies": self.best_proxies,
            "history": self.history,
        }

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        for key in (
            "round",
            "lam",
            "best_score",
            "checks_in_round",
            "checks_without_gain",
            "best_weights",
            "best_proxies",
            "history",
        ):
            if key in state_dict:
                setattr(self, key, state_dict[key])

    # --- rounds ----------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        """Initial proxies from sample embeddings (a pooling that starts from the proxies, GSP,
        is initialised at the first training step, after this)."""
        objective = pl_module.objective
        if not self.enabled or objective.proxies_initialized() or not self.init_from_samples:
            return
        seconds = self.reinitialize(trainer, pl_module, seeds=None)
        rank_zero_info(f"ccp: proxies picked from sample embeddings ({seconds:.1f} s)")

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self.enabled or trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            raise ConfigError(
                f"ccp.monitor: {self.monitor!r} was not logged; logged metrics: "
                f"{sorted(trainer.callback_metrics)}"
            )
        score = float(value)
        self.checks_in_round += 1
        if score > self.best_score + self.min_delta:
            self.best_score = score
            self.checks_without_gain = 0
            self.snapshot(pl_module)
        else:
            self.checks_without_gain += 1
        if self.checks_in_round >= self.min_epochs and self.checks_without_gain >= self.patience:
            self.end_round(trainer, pl_module)

    @torch.no_grad()
    def snapshot(self, pl_module) -> None:
        """The round's best so far: network weights and proxies (on the CPU)."""
        self.best_weights = {
            k: p.detach().to("cpu", copy=True) for k, p in pl_module.network_parameters()
        }
        self.best_proxies = pl_module.objective.proxies().detach().to("cpu", copy=True)

    def end_round(self, trainer, pl_module) -> None:
        self.round += 1
        self.lam = self.lam0 * self.lam_decay**self.round
        pl_module.objective.anchor_proximal(self.best_weights, self.lam)
        seeds = (
            self.best_proxies
            if self.best_proxies is not None
            else pl_module.objective.proxies().detach().cpu()
        )
        seconds = self.reinitialize(trainer, pl_module, seeds=seeds)
        self.history.append(
            {
                "round": self.round,
                "epoch": trainer.current_epoch,
                "step": trainer.global_step,
                "best": self.best_score,
                "seconds": seconds,
            }
        )
        rank_zero_info(
            f"ccp: round {self.round - 1} ended at epoch {trainer.current_epoch} "
            f"(best {self.monitor} {self.best_score:.4f}); proxies re-picked in "
            f"{seconds:.1f} s; lambda {self.lam:g}"
        )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {
                        "ccp/round": self.round,
                        "ccp/lambda": self.lam,
                        "ccp/reinit_seconds": seconds,
                    },
                    step=trainer.global_step,
                )
        self.best_score = -float("inf")
        self.checks_in_round = 0
        self.checks_without_gain = 0

    def reinitialize(self, trainer, pl_module, seeds: Optional[torch.Tensor]) -> float:
        """Replace every class's K proxies by greedy k-center picks from its candidate pool,
        seeded with ``seeds`` (C*K, D) or the origin. Returns the seconds it took."""
        start = time.perf_counter()
        objective = pl_module.objective
        proxies = objective.proxies()
        if trainer.is_global_zero:
            pool = self.candidate_pool(trainer, pl_module)  # (C, P, D)
            new = objective.pick_proxies(pool, None if seeds is None else seeds.to(pool.device))
            new = new.to(proxies.device, proxies.dtype)
        else:
            new = torch.empty_like(proxies.data)
        objective.set_proxies(trainer.strategy.broadcast(new, src=0))
        self.last_reinit_seconds = time.perf_counter() - start
        return self.last_reinit_seconds

    def candidate_draws(self, labels: np.ndarray, num_classes: int, passes: int) -> np.ndarray:
        """(passes, C) training indices: in each pass one image of every class, drawn without
        replacement from a shuffled list of the class's images (a fresh shuffle when a class
        runs out), as the released sampler does."""
        rng = np.random.default_rng(self.seed + self.round)
        by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
        missing = [c for c, idx in enumerate(by_class) if len(idx) == 0]
        if missing:
            raise ConfigError(
                f"ccp: training classes {missing[:10]} have no image; labels must "
                f"be 0..{num_classes - 1}"
            )
        columns = []
        for idx in by_class:
            order = []
            while len(order) < passes:
                order.extend(rng.permutation(idx).tolist())
            columns.append(order[:passes])
        return np.array(columns).T

    @torch.no_grad()
    def candidate_pool(self, trainer, pl_module) -> torch.Tensor:
        """(C, P, D) raw embeddings of P training images per class, training augmentation,
        network in eval mode."""
        num_classes, per_class = pl_module.objective.proxy_layout()
        dm = trainer.datamodule
        passes = self.pool_passes if self.pool_passes >= per_class else self.pool_passes * per_class
        draws = self.candidate_draws(np.asarray(dm.train_labels()), num_classes, passes)
        loader = dm.candidate_loader(draws.reshape(-1).tolist(), self.batch_size)
        was_training = pl_module.training
        pl_module.eval()
        rows = []
        for batch in loader:
            images = dm.device_batch(batch, pl_module.device)[0]
            rows.append(pl_module.embed(images)["raw_embeddings"].float())
        pl_module.train(was_training)
        pool = torch.cat(rows).view(passes, num_classes, -1)
        return pool.transpose(0, 1).contiguous()
