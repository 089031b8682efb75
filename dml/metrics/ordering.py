"""The one tie rule of every evaluation back end, and the distances it is applied to.

Tie rule: a query's references are ordered by (squared distance, reference index), which is
exactly what a stable sort of the query's distance row gives. Two references at the same
distance are ranked by their index in the reference set, never in the query's favour.

``order_keys`` turns a (distance, index) pair into one int64 whose integer order is that
lexicographic order: the float32's bits made monotone in the high 32 bits, the index in the low
32. Sorting, ``topk`` or comparing keys is then exact under the rule, ties included.

``squared_distances`` forms ||q||^2 + ||r||^2 - 2 q.r with the two norms added first, so that
d(i, j) and d(j, i) are the same float (the symmetric block pass relies on it).
"""

from __future__ import annotations

import torch

INT64_MAX = torch.iinfo(torch.int64).max
_LOW32 = 0xFFFFFFFF


def _monotone_bits(bits: torch.Tensor) -> torch.Tensor:
    """float32 bits (as int32) -> int32 with the same order as the floats (an involution)."""
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def order_keys(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """int64 keys ordered as (value, index). ``values`` float32 (finite or +inf), ``index``
    non-negative below 2**32, broadcastable to ``values``."""
    v = values.float() + 0.0  # -0.0 -> +0.0: equal floats must get equal bits
    bits = _monotone_bits(v.contiguous().view(torch.int32))
    return (bits.to(torch.int64) << 32) | index.to(torch.int64)


def key_index(keys: torch.Tensor) -> torch.Tensor:
    """The reference index held by each key."""
    return keys & _LOW32


def key_value(keys: torch.Tensor) -> torch.Tensor:
    """The float32 value held by each key; +inf for the empty key INT64_MAX."""
    bits = _monotone_bits((keys >> 32).to(torch.int32))
    return bits.view(torch.float32).masked_fill(keys == INT64_MAX, float("inf"))


def squared_distances(
    query: torch.Tensor, reference: torch.Tensor, query_sq: torch.Tensor, reference_sq: torch.Tensor
) -> torch.Tensor:
    """(n_q, n_r) squared Euclidean distances ||q||^2 + ||r||^2 - 2 q.r, float32.

    The norms are summed before the product is added, so swapping query and reference gives
    the transposed matrix bit for bit (with the same BLAS)."""
    out = query_sq[:, None] + reference_sq[None, :]
    return out.addmm_(query, reference.T, beta=1.0, alpha=-2.0)


def stable_smallest(values: torch.Tensor, k: int, index: torch.Tensor) -> torch.Tensor:
    """Keys of the k smallest entries of each row under the tie rule, sorted ascending.
    ``index`` gives each column's reference index."""
    return torch.topk(order_keys(values, index), k, dim=1, largest=False, sorted=True).values
