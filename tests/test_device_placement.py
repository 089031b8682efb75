"""Every tensor the package creates follows its inputs' device.

The check works on any machine: inside ``strict_device()`` the default device is ``meta``, so a
tensor created without ``device=`` (``torch.zeros(n)``, ``torch.arange(n)``) lands there, and the
first operation that mixes it with the real inputs fails ("Tensor on device meta is not on the
expected device cpu"). Inputs are on the CPU, and on every CUDA device where the machine has
one. Every evaluation back end, the k-reciprocal neighbours, and for every method config the
objective's terms, their backward, XBN's transform, CCP's proxy picking and proximal term,
GSP's prototype initialisation and IBC's pseudo-test run under it.
"""

from contextlib import contextmanager

import pytest
import torch
from test_configs import METHODS, TINY_RUN

from dml.callbacks import CrossBatchNormalization
from dml.cli import DMLCLI
from dml.compose import config_args
from dml.data import DMLDataModule
from dml.evaluation import EvalSet, EvalSets, Evaluator
from dml.metrics import faiss_available, k_reciprocal_neighbors, retrieval_metrics
from dml.module import DMLModule

DEVICES = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
BACKENDS = ["rank", "torch"] + (["faiss"] if faiss_available() else [])


@contextmanager
def strict_device():
    """Tensors created without a device go to ``meta``, where they cannot mix with inputs."""
    with torch.device("meta"):
        yield


def test_the_check_catches_a_tensor_created_without_a_device():
    x = torch.ones(3, device="cpu")
    with strict_device(), pytest.raises(RuntimeError, match="meta"):
        x + torch.zeros(3)


def clustered(device, n=120, d=8, classes=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = torch.randn(classes, d, generator=g)
    x = torch.nn.functional.normalize(centers[labels] + 0.7 * torch.randn(n, d, generator=g), dim=1)
    return x.to(device), labels.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_retrieval_metrics_on_the_inputs_device(device, backend):
    x, y = clustered(device)
    expected = retrieval_metrics(x.cpu(), y.cpu(), [1, 4, 16], backend="rank", chunk_size=7)
    with strict_device():
        same = retrieval_metrics(x, y, [1, 4, 16], backend=backend, chunk_size=32)
        split = retrieval_metrics(
            x[:50],
            y[:50],
            [1, 4],
            gallery_embeddings=x[50:],
            gallery_labels=y[50:],
            backend=backend,
        )
    assert same == expected
    assert split == retrieval_metrics(
        x[:50].cpu(),
        y[:50].cpu(),
        [1, 4],
        gallery_embeddings=x[50:].cpu(),
        gallery_labels=y[50:].cpu(),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_k_reciprocal_neighbours_and_the_evaluator_on_the_inputs_device(device):
    x, y = clustered(device)
    expected = k_reciprocal_neighbors(x.cpu(), 5, backend="torch")
    test = EvalSet("test", x, y, torch.arange(len(x), device=device))
    with strict_device():
        found = k_reciprocal_neighbors(x, 5, backend="torch")
        scored = Evaluator(nmi=True).score(EvalSets(test, test), [1, 2], torch.device(device))
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(found, expected))
    assert found[1].any()  # some pairs are reciprocal
    assert 0.0 < scored["R@1"] <= 1.0 and 0.0 < scored["NMI"] <= 1.0


def build(method):
    cli = DMLCLI(
        DMLModule,
        DMLDataModule,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=config_args("synthetic", method) + TINY_RUN,
    )
    cli.datamodule.setup("fit")
    return cli


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS)
def test_every_objective_path_on_the_inputs_device(method, device):
    cli = build(method)
    module = cli.model.to(device)
    images, labels, _ = next(iter(cli.datamodule.train_dataloader()))
    images, labels = images.to(device), labels.to(device)
    xbn = [c for c in cli.trainer.callbacks if isinstance(c, CrossBatchNormalization)]
    for callback in xbn:
        if callback.enabled:
            callback.setup(cli.trainer, module, "fit")
            if callback.kalman is not None:
                callback.kalman.to(device)
    objective = module.objective
    g = torch.Generator().manual_seed(0)
    dim = module.head.linear.out_features
    candidates = torch.randn(64, dim, generator=g).to(device)  # GSP's prototype candidates
    if objective.has_multi_proxy():  # CCP's per-class candidate pool (C, P, D)
        pool = torch.randn(
            objective.metric_loss.num_classes, 2 * objective.metric_loss.per_class, dim, generator=g
        ).to(device)
    with strict_device():
        if module.pooling.wants_initialization():
            module.pooling.initialize(candidates)
        if objective.has_multi_proxy():
            proxies = objective.proxies()
            objective.set_proxies(objective.pick_proxies(pool, proxies.detach()))
            objective.anchor_proximal(
                {n: p.detach().clone() for n, p in module.network_parameters()}, 0.1
            )
        for _ in range(3):  # the memory (start_iteration 0) fills and its term runs
            terms = objective(module.embed(images), labels)
            sum(terms.values()).backward()
        if module.evaluator.refine is not None:  # IBC's pseudo-test at evaluation
            z = module(images).detach()
            s = EvalSet("test", z, labels, torch.arange(len(z), device=device))
            refined = module.evaluator.refine(EvalSets(s, s))
            assert refined.query.embeddings.device == z.device
    assert all(t.device == images.device and torch.isfinite(t) for t in terms.values())
    if objective.memory is not None:
        assert "memory" in terms and objective.memory.stored.device == images.device
    if objective.proximal is not None:
        assert "proximal" in terms
