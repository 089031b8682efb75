"""IBC: the extra-zero-logit attention, permutation equivariance, the residual path, the
backbone-only evaluation, k-reciprocal neighbours against brute force, and training."""
import pytorch_lightning as pl
import pytest
import torch
import torch.nn.functional as F

from dml.metrics import k_reciprocal_neighbors
from dml.models import IntraBatchConnections, MessagePassingNetwork, zero_logit_softmax
from dml.models.message_passing import MessagePassingLayer
from dml.module import BackboneConfig, DMLModule, IBCConfig, LossConfig, OptimizerConfig
from test_training import small_data, trainer


def test_zero_logit_softmax_matches_the_direct_formula_and_rows_sum_below_one():
    s = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)) * 3
    a = zero_logit_softmax(s)
    direct = torch.exp(s) / (1 + torch.exp(s).sum(-1, keepdim=True))
    torch.testing.assert_close(a, direct)
    assert (a.sum(-1) < 1).all() and (a > 0).all()
    # large logits: stable, and the sum approaches (but stays below) one
    big = zero_logit_softmax(torch.tensor([[200.0, 199.0]]))
    assert torch.isfinite(big).all() and float(big.sum()) <= 1.0
    mask = torch.tensor([[True, False, True, True, False]] * 3)
    masked = zero_logit_softmax(s, mask)
    assert (masked[:, [1, 4]] == 0).all()
    keep = s[:, [0, 2, 3]]
    torch.testing.assert_close(masked[:, [0, 2, 3]],
                               torch.exp(keep) / (1 + torch.exp(keep).sum(-1, keepdim=True)))


def test_attention_weights_of_a_layer_follow_the_formula():
    torch.manual_seed(0)
    layer = MessagePassingLayer(8, heads=2, dropout=0.0, ff_hidden=16)
    h = torch.randn(1, 5, 8)
    a = layer.attention(h)
    q = layer.q(h).view(1, 5, 2, 4).transpose(1, 2)
    k = layer.k(h).view(1, 5, 2, 4).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / 2.0
    torch.testing.assert_close(a, torch.exp(s) / (1 + torch.exp(s).sum(-1, keepdim=True)))


def test_mpn_is_permutation_equivariant():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(16, layers=2, heads=4, ff_hidden=32, concat=True).eval()
    f = F.normalize(torch.randn(9, 16), dim=1)
    perm = torch.randperm(9)
    with torch.no_grad():
        torch.testing.assert_close(mpn(f[perm]), mpn(f)[perm])
    assert mpn(f).shape == (9, 32)


def test_zero_value_projection_leaves_the_residual_and_norm_path():
    torch.manual_seed(0)
    layer = MessagePassingLayer(8, heads=2, dropout=0.0, ff_hidden=16).eval()
    with torch.no_grad():
        layer.v.weight.zero_(), layer.v.bias.zero_()
        h = torch.randn(1, 6, 8)
        expected = layer.norm1(h + layer.out.bias)  # W_o applied to zero messages
        expected = layer.norm2(expected + layer.ff(expected))
        torch.testing.assert_close(layer(h), expected)
        # no message: a sample's output no longer depends on the others
        torch.testing.assert_close(layer(h[:, :1]), expected[:, :1])


def test_padded_groups_ignore_masked_members():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(8, layers=1, heads=2, ff_hidden=16).eval()
    group = torch.randn(1, 4, 8)
    mask = torch.tensor([[True, True, False, False]])
    with torch.no_grad():
        padded = mpn(torch.cat([group[:, :2], torch.randn(1, 2, 8)], 1), mask)[:, :2]
        torch.testing.assert_close(padded, mpn(group[:, :2]))


def test_ibc_losses_are_label_smoothed_cross_entropies_at_temperature_tau():
    torch.manual_seed(0)
    ibc = IntraBatchConnections(8, 5, heads=2, ff_hidden=16, tau=0.5, dropout=0.0)
    assert not ibc.neck.bias.requires_grad and float(ibc.neck.bias.abs().sum()) == 0
    assert ibc.classifier.bias is None
    assert 0.0005 < float(ibc.classifier.weight.std()) < 0.002
    raw, y = torch.randn(10, 8), torch.arange(10) % 5
    z = F.normalize(raw, dim=1)
    parts = ibc(raw, z, y)
    logits = ibc.backbone_classifier(raw) / 0.5
    logp = logits.log_softmax(1)
    target = torch.full_like(logp, 0.1 / 5).scatter_(1, y[:, None], 0.9 + 0.1 / 5)
    torch.testing.assert_close(parts["ibc_backbone"], -(target * logp).sum(1).mean())
    mpn_logits = ibc.classifier(ibc.neck(ibc.mpn(z))) / 0.5
    torch.testing.assert_close(parts["ibc_mpn"], F.cross_entropy(mpn_logits, y,
                                                                 label_smoothing=0.1))


def ibc_module(**ibc):
    return DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
                     embedding_dim=32, num_classes=24, optimizer=OptimizerConfig(lr=3e-3),
                     loss=LossConfig(name="none"),
                     ibc=IBCConfig(enabled=True, heads=2, ff_hidden=64, **ibc))


def test_evaluation_embeddings_do_not_depend_on_the_mpn(tmp_path):
    torch.manual_seed(0)
    with_mpn = ibc_module()
    without = DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
                        embedding_dim=32, num_classes=24)
    missing = without.load_state_dict(with_mpn.state_dict(), strict=False)
    assert not missing.missing_keys  # every non-IBC weight was copied
    data = small_data()
    results = []
    for module in (with_mpn, without):
        trainer(tmp_path, 1).validate(module, data, verbose=False)
        results.append(module.last_metrics)
    assert results[0] == results[1]
    with torch.no_grad():  # changing the MPN changes nothing at test time
        x = data.eval_datasets["test"].images[:6]
        before = with_mpn.eval()(x)
        for p in with_mpn.ibc.parameters():
            p.add_(1.0)
        torch.testing.assert_close(with_mpn(x), before)


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
                cands = torch.cat([dr[j], dq[i, j:j + 1]])
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


def test_ibc_alone_trains_and_pseudo_test_runs(tmp_path):
    pl.seed_everything(0)
    module, data = ibc_module(), small_data()
    trainer(tmp_path, 2, enable_checkpointing=False).fit(module, data)
    assert module.last_metrics["R@1"] > module.initial_metrics["R@1"] + 0.15
    module.ibc_cfg.pseudo_test = True
    trainer(tmp_path, 1).validate(module, data, verbose=False)
    assert 0 < module.last_metrics["R@1"] <= 1


def test_pseudo_test_embedding_is_the_mpn_output_over_the_reciprocal_neighbourhood():
    torch.manual_seed(0)
    module = ibc_module(pseudo_test_k=4)
    emb = F.normalize(torch.randn(30, 32), dim=1)
    labels = torch.arange(30) % 6
    refined = module.pseudo_test_embeddings({"test": (emb, labels)})["test"][0]
    idx, mask = k_reciprocal_neighbors(emb, 4, backend="torch")
    module.ibc.eval()
    for i in (0, 7, 29):
        group = torch.cat([emb[i:i + 1], emb[idx[i][mask[i]]]])
        with torch.no_grad():
            direct = F.normalize(module.ibc.mpn(group)[0], dim=0)
        torch.testing.assert_close(refined[i], direct, atol=1e-5, rtol=1e-5)


def test_ibc_composes_with_gsp_and_a_metric_loss(tmp_path):
    pl.seed_everything(0)
    module = DMLModule(backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
                       pooling={"name": "gsp", "params": {"num_prototypes": 4}},
                       embedding_dim=16, num_classes=24,
                       loss=LossConfig(name="contrastive"),
                       ibc=IBCConfig(enabled=True, heads=2, ff_hidden=32))
    data = small_data()
    trainer(tmp_path, 1, enable_checkpointing=False, limit_train_batches=2,
            limit_val_batches=0).fit(module, data)
    images, labels, _ = next(iter(data.train_dataloader()))
    parts = module.compute_losses(module.embed(images), labels)
    assert set(parts) == {"metric", "ibc_backbone", "ibc_mpn"}
    assert all(torch.isfinite(v) for v in parts.values())
    assert bool(module.pooling.initialized)
