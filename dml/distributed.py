"""The one cross-process gather the losses use (DDP): rows of every process in rank order.

``gather_rows(t, with_grad=True)`` lets the gradients of the gathered rows flow back to the
process that computed them, summed over processes (``torch.distributed.nn.functional.
all_gather``, what Lightning's ``all_gather(sync_grads=True)`` uses): every process computing
the same loss on the global batch then gives, averaged by DDP, one process's gradient on the
whole batch. Without DDP both are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_rows(tensor: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """(n, ...) on each of W processes -> (W * n, ...), in rank order, on every process."""
    if world_size() == 1:
        return tensor
    if with_grad and tensor.requires_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()))
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)
