"""GSP's zero-shot prototype loss: the ridge solution, the split by label, and that it learns."""

import torch

from dml.losses.zero_shot import ZeroShotPrototypeLoss, ridge_weights, split_by_label


def test_ridge_solution_equals_least_squares():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(10, 6, generator=g, dtype=torch.float64)
    y = torch.randn(10, 4, generator=g, dtype=torch.float64)
    lam = 0.05
    # ridge as an augmented least-squares problem: [A; sqrt(lam) I] w = [Y; 0]
    a_aug = torch.cat([a, lam**0.5 * torch.eye(6, dtype=a.dtype)])
    y_aug = torch.cat([y, torch.zeros(6, 4, dtype=y.dtype)])
    expected = torch.linalg.lstsq(a_aug, y_aug).solution
    assert torch.allclose(ridge_weights(a, y, lam), expected, atol=1e-10)


def test_split_by_label_gives_disjoint_classes():
    labels = torch.tensor([5, 5, 2, 2, 9, 9, 7, 7])
    first, second = split_by_label(labels)
    assert set(labels[first].tolist()).isdisjoint(labels[second].tolist())
    assert (first | second).all() and first.any() and second.any()


def test_zero_shot_loss_decreases_on_separable_attributes():
    torch.manual_seed(0)
    classes, m = 8, 16
    prototypes = torch.softmax(3 * torch.randn(classes, m), 1)  # one attribute profile a class
    labels = torch.arange(classes).repeat_interleave(4)
    attributes = prototypes[labels] + 0.01 * torch.rand(len(labels), m)
    loss = ZeroShotPrototypeLoss(classes, 12)
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = loss(attributes, labels).item()
    for _ in range(100):
        opt.zero_grad()
        value = loss(attributes, labels)
        value.backward()
        opt.step()
    assert value.item() < 0.5 * first
