"""IBC's objective term: the two label-smoothed cross-entropies, evaluation without the MPN, the
pseudo-test refinement, training alone and with GSP and a metric loss."""

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from helpers import small_data, trainer

from dml.evaluation import EvalSet, EvalSets
from dml.losses import IntraBatchConnections
from dml.losses.ibc import pseudo_test_refiner
from dml.metrics import k_reciprocal_neighbors
from dml.models import MessagePassingNetwork
from dml.module import BackboneConfig, DMLModule, IBCConfig, LossConfig, OptimizerConfig


def test_ibc_losses_are_label_smoothed_cross_entropies_at_temperature_tau():
    torch.manual_seed(0)
    mpn = MessagePassingNetwork(8, heads=2, ff_hidden=16, dropout=0.0)
    ibc = IntraBatchConnections(mpn, 8, 5, tau=0.5)
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
    torch.testing.assert_close(
        parts["ibc_mpn"], F.cross_entropy(mpn_logits, y, label_smoothing=0.1)
    )


def ibc_module(**ibc):
    return DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
        embedding_dim=32,
        num_classes=24,
        optimizer=OptimizerConfig(lr=3e-3),
        loss=LossConfig(name="none"),
        ibc=IBCConfig(enabled=True, heads=2, ff_hidden=64, **ibc),
    )


def test_evaluation_embeddings_do_not_depend_on_the_mpn(tmp_path):
    torch.manual_seed(0)
    with_mpn = ibc_module()
    without = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=16),
        embedding_dim=32,
        num_classes=24,
    )
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
        for p in with_mpn.objective.ibc.parameters():
            p.add_(1.0)
        torch.testing.assert_close(with_mpn(x), before)


def test_ibc_alone_trains_and_pseudo_test_runs(tmp_path):
    pl.seed_everything(0)
    module, data = ibc_module(), small_data()
    trainer(tmp_path, 2, enable_checkpointing=False).fit(module, data)
    assert module.last_metrics["R@1"] > module.initial_metrics["R@1"] + 0.15
    module.evaluator.refine = pseudo_test_refiner(module.objective.ibc, 4)
    trainer(tmp_path, 1).validate(module, data, verbose=False)
    assert 0 < module.last_metrics["R@1"] <= 1


def test_pseudo_test_embedding_is_the_mpn_output_over_the_reciprocal_neighbourhood():
    torch.manual_seed(0)
    module = ibc_module(pseudo_test=True, pseudo_test_k=4)
    emb = F.normalize(torch.randn(30, 32), dim=1)
    labels = torch.arange(30) % 6
    test = EvalSet("test", emb, labels, torch.arange(30))
    refined = module.evaluator.refine(EvalSets(test, test)).query.embeddings
    idx, mask = k_reciprocal_neighbors(emb, 4, backend="torch")
    module.objective.ibc.eval()
    for i in (0, 7, 29):
        group = torch.cat([emb[i : i + 1], emb[idx[i][mask[i]]]])
        with torch.no_grad():
            direct = F.normalize(module.objective.ibc.mpn(group)[0], dim=0)
        torch.testing.assert_close(refined[i], direct, atol=1e-5, rtol=1e-5)


def test_ibc_composes_with_gsp_and_a_metric_loss(tmp_path):
    pl.seed_everything(0)
    module = DMLModule(
        backbone=BackboneConfig("small_cnn", pretrained=False, width=8),
        pooling={"name": "gsp", "params": {"num_prototypes": 4}},
        embedding_dim=16,
        num_classes=24,
        loss=LossConfig(name="contrastive"),
        ibc=IBCConfig(enabled=True, heads=2, ff_hidden=32),
    )
    data = small_data()
    trainer(
        tmp_path, 1, enable_checkpointing=False, limit_train_batches=2, limit_val_batches=0
    ).fit(module, data)
    images, labels, _ = next(iter(data.train_dataloader()))
    parts = module.objective(module.embed(images), labels)
    assert set(parts) == {"metric", "ibc_backbone", "ibc_mpn"}
    assert all(torch.isfinite(v) for v in parts.values())
    assert bool(module.pooling.initialized)
