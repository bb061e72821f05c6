"""TracIn against an explicit per-example autograd loop; the random-projection variant against exact TracIn."""

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti


def loop_grads(loss, params, data):
    """[n, P]: one torch.autograd.grad call per example (the reference, never the library's vmap)."""
    rows = []
    for i in range(ti.num_examples(data)):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        grads = torch.autograd.grad(loss(leaves, ti.take(data, slice(i, i + 1))).sum(), list(leaves.values()))
        rows.append(ti.ravel(dict(zip(leaves.keys(), grads))))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def run(digits_lr):
    """A 64-32-10 tanh MLP, three checkpoints from full-batch gradient descent with a decaying step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    apply, params = ti.functionalize(model)

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    train = ti.take(digits_lr.train, slice(0, 200))
    test = ti.take(digits_lr.test, slice(0, 10))
    R = ti.objective(loss, train)
    ckpts = []
    for lr in (0.5, 0.3, 0.1):
        for _ in range(10):
            params = ti.tree.add_scaled(params, -lr, torch.func.grad(R)(params))
        ckpts.append((params, lr))
    return loss, ckpts, train, test


def test_one_checkpoint_is_lr_times_loop_dot_product(run):
    loss, ckpts, train, test = run
    params, lr = ckpts[0]
    expected = lr * loop_grads(loss, params, test) @ loop_grads(loss, params, ti.take(train, slice(0, 40))).T
    got = ti.tracin(loss, [(params, lr)], ti.take(train, slice(0, 40)), test)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_checkpoints_sum_with_their_learning_rates(run):
    loss, ckpts, train, test = run
    small = ti.take(train, slice(0, 30))
    expected = sum(lr * loop_grads(loss, p, test) @ loop_grads(loss, p, small).T for p, lr in ckpts)
    torch.testing.assert_close(ti.tracin(loss, ckpts, small, test), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ti.tracin(loss, ckpts, small, test, chunk_size=7), expected, rtol=1e-10, atol=1e-12)


def test_self_influence_is_the_diagonal(run):
    loss, ckpts, train, _ = run
    small = ti.take(train, slice(0, 30))
    expected = sum(lr * loop_grads(loss, p, small).pow(2).sum(1) for p, lr in ckpts)
    torch.testing.assert_close(ti.tracin_self_influence(loss, ckpts, small, chunk_size=8), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ti.tracin(loss, ckpts, small, small).diagonal(), expected, rtol=1e-10, atol=1e-12)


def test_projection_correlates_and_is_unbiased(run):
    loss, ckpts, train, test = run
    exact = ti.tracin(loss, ckpts, train, test)
    one = ti.tracin(loss, ckpts, train, test, projection_dim=300, generator=torch.Generator().manual_seed(1), chunk_size=64)
    pearson = torch.corrcoef(torch.stack([one.flatten(), exact.flatten()]))[0, 1]
    print(f"projection d=300: Pearson with exact TracIn {pearson:.4f}")
    assert pearson >= 0.95
    seeds = [ti.tracin(loss, ckpts, train, test, projection_dim=100, generator=torch.Generator().manual_seed(s)) for s in range(16)]
    single = torch.stack([(s - exact).norm() for s in seeds]).mean()
    averaged = (torch.stack(seeds).mean(0) - exact).norm()
    print(f"projection d=100: error of one seed {single:.4e}, of the mean of 16 seeds {averaged:.4e} (1/sqrt(16) = 0.25 expected ratio)")
    assert averaged <= 0.4 * single


def test_projection_same_generator_same_scores_and_not_advanced(run):
    loss, ckpts, train, test = run
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    a = ti.tracin(loss, ckpts, train, test, projection_dim=50, generator=g)
    b = ti.tracin(loss, ckpts, train, test, projection_dim=50, generator=g)
    assert torch.equal(a, b)
    assert torch.equal(g.get_state(), state)
    assert not torch.equal(a, ti.tracin(loss, ckpts, train, test, projection_dim=50, generator=torch.Generator().manual_seed(4)))


def test_errors(run):
    loss, ckpts, train, test = run
    params, _ = ckpts[0]
    with pytest.raises(ValueError, match=r"ti.tracin: `checkpoints` must be a non-empty list of \(params, lr\) pairs"):
        ti.tracin(loss, [], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: `checkpoints\[0\]` must be a \(params, lr\) pair; got dict"):
        ti.tracin(loss, [params], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: the learning rate of checkpoint 1 must be finite and > 0; got -0.1"):
        ti.tracin(loss, [(params, 0.1), (params, -0.1)], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: checkpoint 1 does not have the parameter names and shapes of checkpoint 0"):
        ti.tracin(loss, [(params, 0.1), ({"0.weight": params["0.weight"]}, 0.1)], train, test)
    with pytest.raises(ValueError, match=r"ti.tracin: `projection_dim` needs an explicit `generator`"):
        ti.tracin(loss, ckpts, train, test, projection_dim=10)
    with pytest.raises(ValueError, match=r"ti.tracin: `projection_dim` must be an int >= 1; got 0"):
        ti.tracin(loss, ckpts, train, test, projection_dim=0, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.tracin: `generator` is only used with `projection_dim`"):
        ti.tracin(loss, ckpts, train, test, generator=torch.Generator())
    with pytest.raises(ValueError, match=r"ti.tracin_self_influence: `chunk_size` must be None or an int >= 1"):
        ti.tracin_self_influence(loss, ckpts, train, chunk_size=-1)
