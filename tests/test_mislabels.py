"""Self-influence finds flipped labels: logistic regression on 1,000 digits with 10% of the labels flipped."""

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti


@pytest.fixture(scope="module")
def flipped(digits_lr):
    """The digits training set with 100 labels flipped to another class, the model refit (l2 = 1e-2),
    and six checkpoints of a full-batch gradient-descent run from zero."""
    g = torch.Generator().manual_seed(0)
    x, y = digits_lr.train
    bad = torch.randperm(len(y), generator=g)[:len(y) // 10]
    y = y.clone()
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=g)) % 10
    train = (x, y)
    apply = digits_lr.apply

    def loss(params, batch):
        return F.cross_entropy(apply(params, batch[0]), batch[1], reduction="none")

    R = ti.objective(loss, train, l2=digits_lr.l2)
    params = ti.minimize(R, ti.tree.zeros_like(digits_lr.params), gtol=1e-10, newton_steps=5)
    ckpts, theta = [], ti.tree.zeros_like(params)
    for _ in range(6):
        ckpts.append((theta, 0.5))
        for _ in range(10):
            theta = ti.tree.add_scaled(theta, -0.5, torch.func.grad(R)(theta))
    return loss, R, params, ckpts, train, bad


def _self_influence(method, loss, R, params, ckpts, train):
    if method == "tracin":
        return ti.tracin_self_influence(loss, ckpts, train)
    if method == "grad_norm":
        return ti.tracin_self_influence(loss, [(params, 1.0)], train).sqrt()   # ‖∇ℓ(z; θ̂)‖
    return ti.self_influence(loss, params, train, ihvp=ti.direct(ti.hessian(R, params), damping=0.0))


@pytest.mark.parametrize("method", ["tracin", "grad_norm", "influence"])
def test_top_ten_percent_by_self_influence_finds_flipped_labels(flipped, method):
    loss, R, params, ckpts, train, bad = flipped
    scores = _self_influence(method, loss, R, params, ckpts, train)
    assert scores.shape == (1000,)
    top = torch.argsort(scores, descending=True)[:100]
    found = torch.isin(bad, top).double().mean().item()
    print(f"{method}: top 10% by self-influence holds {found:.0%} of the flipped labels (chance: 10%)")
    assert found >= 0.7
