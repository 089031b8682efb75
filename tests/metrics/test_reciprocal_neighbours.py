"""k-reciprocal neighbours against brute force (IBC's pseudo-test)."""

import pytest
import torch

from dml.metrics import k_reciprocal_neighbors


def brute_force_reciprocal(q, k, ref=None):
    same = ref is None
    ref = q if same else ref
    dq = torch.cdist(q.double(), ref.double())
    if same:
        dq.fill_diagonal_(float("inf"))
    near_q = [set(dq[i].argsort()[:k].tolist()) for i in range(len(q))]
    dr = torch.cdist(ref.double(), ref.double())
    dr.fill_diagonal_(float("inf"))
    out = []
    for i in range(len(q)):
        rec = set()
        for j in near_q[i]:
            if same:
                ok = i in set(dr[j].argsort()[:k].tolist())
            else:  # j's k nearest among the other references plus the query i
                cands = torch.cat([dr[j], dq[i, j : j + 1]])
                ok = len(ref) in set(cands.argsort()[:k].tolist())
            if ok:
                rec.add(j)
        out.append(rec)
    return out


@pytest.mark.parametrize("gallery", [False, True])
def test_k_reciprocal_neighbours_match_brute_force(gallery):
    g = torch.Generator().manual_seed(4)
    q = torch.randn(40, 3, generator=g)
    ref = torch.randn(30, 3, generator=g) if gallery else None
    idx, mask = k_reciprocal_neighbors(q, 5, ref, backend="torch")
    got = [set(idx[i][mask[i]].tolist()) for i in range(len(q))]
    assert got == brute_force_reciprocal(q, 5, ref)
    assert any(len(s) < 5 for s in got) and any(len(s) > 0 for s in got)
    idx_f, mask_f = k_reciprocal_neighbors(q, 5, ref, backend="faiss")
    assert [set(idx_f[i][mask_f[i]].tolist()) for i in range(len(q))] == got
