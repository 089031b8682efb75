"""The evaluator's pieces: the DDP gather that drops padding, the one decoding of set names."""

import pytest
import torch

from dml.evaluation import EvalSet, EvalSets, Evaluator, gather_by_index


def test_gather_by_index_drops_padding_and_restores_order():
    # A DistributedSampler over 5 items on 2 ranks: rank 0 {0, 2, 4}, rank 1 {1, 3, 0 (pad)}.
    emb = torch.arange(6, dtype=torch.float32)[:, None].repeat(1, 2)
    idx = torch.tensor([0, 2, 4, 1, 3, 0])
    lab = idx * 10
    e, labels, i = gather_by_index(emb, lab, idx)
    assert i.tolist() == [0, 1, 2, 3, 4]
    assert labels.tolist() == [0, 10, 20, 30, 40]
    assert e[:, 0].tolist() == [0, 3, 1, 4, 2]


def one(name, n=6):
    g = torch.Generator().manual_seed(len(name))
    return EvalSet(name, torch.randn(n, 4, generator=g), torch.arange(n) % 3, torch.arange(n))


def test_sets_are_named_test_or_query_and_gallery():
    test = EvalSets.from_named({"test": one("test")})
    assert test.same and test.sets == [test.query]
    pair = EvalSets.from_named({"query": one("query"), "gallery": one("gallery")})
    assert not pair.same and [s.name for s in pair.sets] == ["query", "gallery"]
    with pytest.raises(ValueError, match="test, or query and gallery"):
        EvalSets.from_named({"val": one("val")})


def test_evaluator_collects_refines_scores_and_keeps_the_last_sets():
    evaluator = Evaluator(
        nmi=True,
        refine=lambda sets: sets.map(
            lambda s: EvalSet(s.name, s.embeddings * 2, s.labels, s.indices)
        ),
    )
    data = one("test", 9)
    evaluator.add(0, data.embeddings[5:], data.labels[5:], data.indices[5:])
    evaluator.add(0, data.embeddings[:5], data.labels[:5], data.indices[:5])
    sets = evaluator.collect(["test"])
    assert sets.query.indices.tolist() == list(range(9))  # data-set order
    metrics = evaluator.score(sets, [1, 2])
    assert set(metrics) == {"R@1", "R@2", "MAP@R", "R-Precision", "NMI"}
    assert torch.equal(evaluator.last_sets.query.embeddings, 2 * data.embeddings)
