"""The objective: every training loss term, and every parameter and buffer the terms need.

    L = metric terms + memory + IBC's two cross-entropies + zero-shot + proximal

``Objective.forward(embedded, labels)`` returns the named, weighted terms; ``DMLModule`` sums
and logs them (``train/loss_<name>``). Every term is optional; ``dml.builder`` builds them from
the config and checks that they fit together:

- ``metric_loss``: a pair or proxy loss by name (``dml.losses.factory``) with an optional miner,
  weighted by ``metric_weight`` -> "metric"; or CCP's multi-proxy loss
  (``dml.losses.MultiProxyLoss``, on the head's raw output) -> "proxy" and "pair". With
  ``gather`` under DDP it is computed over the global batch (``dml.distributed``).
- ``memory``: XBM's cross-batch memory term (``dml.losses.memory``) -> "memory": the batch
  against the stored rows, with the term's own loss and pair selection or the metric loss and
  miner. The memory (``dml.memory.CrossBatchMemory``) is the one writer of its rows; XBN's
  callback registers a transform on every memory ``memories()`` finds.
- ``ibc``: IBC's message passing and cross-entropies (``dml.losses.ibc``) -> "ibc_backbone",
  "ibc_mpn"; over the global batch with ``ibc_gather``.
- ``zero_shot``: GSP's zero-shot prototype loss on the pooling's attributes, weighted by
  ``zero_shot_weight`` -> "zero_shot".
- ``proximal``: CCP's (lambda / 2) ||theta - theta_prev||^2 -> "proximal" (absent while
  lambda is 0).
- ``terms``: terms given by class path (``model.terms``, a mapping name -> class), in an
  ``nn.ModuleDict`` under their config names; each is called as
  ``term(embedded, labels, objective)`` and returns its named values.

A value name is given once: a term that returns a name another term already returned
("metric", "memory", ...) is an error naming both, never a silent replacement.

Optimizer groups come from the terms themselves (``parameter_groups``): a term's parameters go
to its ``param_group`` ("loss" unless it says otherwise). The callbacks act only through the
public methods below (``pick_proxies``, ``set_proxies``, ``proxies``, ``anchor_proximal``,
``memories``).

Precision: under mixed precision (``bf16-mixed``) the network runs in bfloat16 and the
objective in float32: ``forward`` casts what it is handed to float32 and turns autocast off.
Its cost, O(B^2 D) similarities and a small message-passing network, is small against the
backbone's, and the terms need the digits: bfloat16 keeps 8 bits of mantissa, so a cosine
similarity is off by up to 2^-9 ~ 0.002, which multi-similarity's exp(beta (s - lambda)) with
beta = 50 turns into a 10 % error in a pair's weight, and GSP's entropic transport, XBN's moments
and CCP's proximal term sum many small differences.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from dml.distributed import gather_rows, world_size
from dml.errors import ConfigError
from dml.losses.factory import proxy_rows


def as_float32(value: Any) -> Any:
    """``value`` with every half-precision floating tensor in it (dicts, lists, dataclasses
    such as ``PoolingOutput``) cast to float32; float32 and float64 tensors stay as they are."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.element_size() < 4 else value
    if isinstance(value, dict):
        return {k: as_float32(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(as_float32(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(
            value, **{f.name: as_float32(getattr(value, f.name)) for f in fields(value) if f.init}
        )
    return value


class Objective(nn.Module):
    def __init__(
        self,
        metric_loss: Optional[nn.Module] = None,
        miner: Optional[nn.Module] = None,
        metric_weight: float = 1.0,
        gather: bool = False,
        memory: Optional[nn.Module] = None,
        ibc: Optional[nn.Module] = None,
        ibc_gather: bool = False,
        zero_shot: Optional[nn.Module] = None,
        zero_shot_weight: float = 0.0,
        proximal: Optional[nn.Module] = None,
        terms: Optional[Dict[str, nn.Module]] = None,
    ):
        super().__init__()
        self.metric_loss, self.miner, self.memory = metric_loss, miner, memory
        self.terms = nn.ModuleDict(terms or {})
        self.ibc, self.zero_shot, self.proximal = ibc, zero_shot, proximal
        self.metric_weight, self.gather = metric_weight, gather
        self.ibc_gather, self.zero_shot_weight = ibc_gather, zero_shot_weight

    # --- the terms ---------------------------------------------------------------------------
    def forward(self, embedded: Dict[str, Any], labels: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``embedded``: ``DMLModule.embed``'s output ("embeddings", "raw_embeddings",
        "pooling"). Returns {term name: weighted value}, computed in float32 (module
        docstring, "Precision")."""
        with torch.autocast(labels.device.type, enabled=False):
            return self.loss_values(as_float32(embedded), labels)

    def loss_values(
        self, embedded: Dict[str, Any], labels: torch.Tensor
    ) -> Dict[str, torch.Tensor]:
        """{value name: weighted value} of every term, in float32 as handed over."""
        z, raw = embedded["embeddings"], embedded["raw_embeddings"]
        values: Dict[str, torch.Tensor] = {}

        def add(source: str, named: Dict[str, torch.Tensor]) -> None:
            for name, value in named.items():
                if name in values:
                    raise ConfigError(
                        f"objective: {source} returns a loss value named "
                        f"{name!r}, which {owner[name]} already returned; "
                        f"rename it"
                    )
                values[name], owner[name] = value, source

        owner: Dict[str, str] = {}
        if self.metric_loss is not None:
            add("the metric loss", self.metric_loss_values(z, raw, labels))
        if self.memory is not None:
            add("the memory term", self.memory(embedded, labels, self))
        if self.ibc is not None:
            if self.ibc_gather and world_size() > 1:  # messages over the global batch
                add(
                    "IBC",
                    self.ibc(raw, gather_rows(z, with_grad=True), gather_rows(labels), labels),
                )
            else:
                add("IBC", self.ibc(raw, z, labels))
        if self.zero_shot is not None:
            add(
                "the zero-shot loss",
                {
                    "zero_shot": self.zero_shot_weight
                    * self.zero_shot(embedded["pooling"].attributes, labels)
                },
            )
        if self.proximal is not None:
            value = self.proximal()
            if value is not None:
                add("the proximal term", {"proximal": value})
        for name, term in self.terms.items():
            add(f"model.terms.{name}", term(embedded, labels, self))
        return values

    def diagnostics(
        self, embedded: Dict[str, Any], labels: torch.Tensor, values: Dict[str, torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """What the terms do on this batch, for the training log (nothing changes):
        grad_norm/<name>: ||d value / d h||, h the head's output of the local batch (how hard
        each term pulls on the embeddings; a term that does not reach h is left out), and the
        memory term's ``diagnostics``."""
        out: Dict[str, torch.Tensor] = {}
        h = embedded["raw_embeddings"]
        if torch.is_grad_enabled() and h.requires_grad:
            for name, value in values.items():
                if not value.requires_grad:
                    continue
                (grad,) = torch.autograd.grad(value, h, retain_graph=True, allow_unused=True)
                if grad is not None:
                    out[f"grad_norm/{name}"] = grad.detach().float().norm()
        if self.memory is not None and hasattr(self.memory, "diagnostics"):
            z = as_float32(embedded["embeddings"]).detach()
            out.update(self.memory.diagnostics(z, labels, self))
        return out

    def metric_loss_values(self, z, raw, labels) -> Dict[str, torch.Tensor]:
        """ "metric", or CCP's "proxy" and "pair" (``named_values`` on the raw embeddings)."""
        if self.gather and world_size() > 1:  # the global batch, gradients back to their rows
            z, raw = gather_rows(z, with_grad=True), gather_rows(raw, with_grad=True)
            labels = gather_rows(labels)
        pairs = self.miner(z, labels) if self.miner is not None else None
        if hasattr(self.metric_loss, "named_values"):  # several values, on the raw output
            return {
                name: self.metric_weight * value
                for name, value in self.metric_loss.named_values(raw, labels, pairs).items()
            }
        return {"metric": self.metric_weight * self.metric_loss(z, labels, pairs)}

    # --- parameters ------------------------------------------------------------------------------
    def parameter_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters by optimizer group: each term's ``param_group`` ("loss" by
        default: proxies, class embeddings; IBC's network says "head")."""
        groups: Dict[str, List[nn.Parameter]] = {}
        children = [t for t in self.children() if t is not self.terms] + list(self.terms.values())
        for term in children:
            params = [p for p in term.parameters() if p.requires_grad]
            if params:
                groups.setdefault(getattr(term, "param_group", "loss"), []).extend(params)
        return groups

    # --- what callbacks and poolings use ---------------------------------------------------
    def memories(self) -> List[nn.Module]:
        """Every cross-batch memory among the terms (``dml.memory.CrossBatchMemory``), the
        memory term's and any a term of ``model.terms`` holds."""
        from dml.memory.cross_batch import CrossBatchMemory

        return [m for m in self.modules() if isinstance(m, CrossBatchMemory)]

    def class_representatives(self) -> Optional[torch.Tensor]:
        """Rows that stand for the classes (proxies, classifier weights), or None."""
        return None if self.metric_loss is None else proxy_rows(self.metric_loss)

    def proxy_layout(self) -> Tuple[int, int]:
        """CCP: (C classes, K proxies per class) of the multi-proxy loss."""
        loss = self._multi_proxy()
        return int(loss.num_classes), int(loss.per_class)

    def proxies(self) -> torch.Tensor:
        """CCP's proxies (C*K, D)."""
        return self._multi_proxy().proxies

    def pick_proxies(self, pool: torch.Tensor, seeds: Optional[torch.Tensor] = None):
        """CCP: new proxies picked by greedy k-center from per-class candidates (C, P, D)."""
        return self._multi_proxy().pick(pool, seeds)

    def set_proxies(self, rows: torch.Tensor) -> None:
        self._multi_proxy().set_proxies(rows)

    def proxies_initialized(self) -> bool:
        return bool(self._multi_proxy().initialized)

    def anchor_proximal(self, theta: Dict[str, torch.Tensor], lam: float) -> None:
        """CCP: the proximal term's theta_prev and lambda."""
        if self.proximal is None:
            raise RuntimeError("this objective has no proximal term (model.loss.proxies_per_class)")
        self.proximal.anchor(theta, lam)

    def has_multi_proxy(self) -> bool:
        return self.metric_loss is not None and hasattr(self.metric_loss, "pick")

    def _multi_proxy(self):
        if not self.has_multi_proxy():
            raise RuntimeError(
                "this objective has no multi-proxy loss (model.loss.proxies_per_class)"
            )
        return self.metric_loss
