"""Newton-corrected removal estimates against actual retraining, dense reference steps and
exact quadratic cases."""

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import tinfluence as ti
from tinfluence import tree as tr
from tinfluence.methods.newton import newton_loo, newton_step_without


def retrain(loss, params, train, keep, l2):
    """Ground truth: the objective on the kept examples (mean over them, same l2), warm-started.

    A few L-BFGS iterations, then exact Newton polish to gradient max-norm 1e-12 (the same
    minimizer as a long L-BFGS run, reached sooner).
    """
    return ti.minimize(ti.objective(loss, ti.take(train, keep), l2=l2), params, gtol=1e-12, maxiter=3, newton_steps=5)


def keep_mask(n, removed):
    keep = torch.ones(n, dtype=torch.bool)
    keep[torch.as_tensor(removed)] = False
    return keep


def first_order(lr, test):
    """Reference first-order influence from the dense Hessian: (1/n) g_testᵀ H⁻¹ g_z, `[n_test, n]`."""
    H = ti.hessian(lr.objective(lr.train), lr.params)
    G = ti.ravel(ti.per_example_grads(lr.loss, lr.params, lr.train), batch_ndim=1)
    g_test = ti.ravel(ti.per_example_grads(lr.loss, lr.params, test), batch_ndim=1)
    return g_test @ torch.linalg.solve(H, G.T) / G.shape[0]


def pearson(a, b):
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def gauss_newton(lr):
    return dict(predict=lambda p, b: lr.apply(p, b[0]),
                output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"))


@pytest.fixture(scope="module")
def digits_loo(digits_lr):
    """Three test points (the two highest-loss ones and test example 0), first-order scores,
    the 30+ training points with the largest |first-order score|, and their actual retraining deltas."""
    lr = digits_lr
    n = ti.num_examples(lr.train)
    losses = lr.loss(lr.params, lr.test)
    test_ids = torch.cat([losses.topk(2).indices, torch.tensor([0])])
    test = ti.take(lr.test, test_ids)
    fo = first_order(lr, test)                                                  # [3, n]
    k = 10
    top = torch.unique(torch.cat([row.abs().topk(k).indices for row in fo]))
    while top.numel() < 30:
        k += 1
        top = torch.unique(torch.cat([row.abs().topk(k).indices for row in fo]))
    base = lr.loss(lr.params, test)
    actual = torch.stack([lr.loss(retrain(lr.loss, lr.params, lr.train, keep_mask(n, i), lr.l2), test) - base
                          for i in top.tolist()], dim=1)                        # [3, len(top)]
    return test_ids, test, fo, top, actual


def test_newton_loo_matches_retraining_and_beats_first_order(digits_lr, digits_loo):
    lr = digits_lr
    test_ids, test, fo, top, actual = digits_loo
    newton = newton_loo(lr.loss, lr.params, lr.train, test, l2=lr.l2, indices=top, **gauss_newton(lr))
    assert newton.shape == (3, top.numel())
    for j in range(3):
        r_newton, r_first = pearson(newton[j], actual[j]), pearson(fo[j, top], actual[j])
        err_newton = ((newton[j] - actual[j]).norm() / actual[j].norm()).item()
        err_first = ((fo[j, top] - actual[j]).norm() / actual[j].norm()).item()
        print(f"test {int(test_ids[j])}: {top.numel()} removals, Pearson newton {r_newton:.6f} first-order {r_first:.6f}; "
              f"relative error newton {err_newton:.2e} first-order {err_first:.2e}")
        assert r_newton >= 0.999
        assert r_newton > r_first
        assert err_newton < err_first
        largest = actual[j].abs().topk(10).indices                              # sign, not only correlation
        assert torch.equal(torch.sign(newton[j, largest]), torch.sign(actual[j, largest]))


def test_exact_per_example_hessians_equal_gauss_newton_for_logistic_regression(digits_lr, digits_loo):
    lr = digits_lr
    _, test, _, top, _ = digits_loo
    ids = top[:4]
    via_gn = newton_loo(lr.loss, lr.params, lr.train, test, l2=lr.l2, indices=ids, **gauss_newton(lr))
    via_hessian = newton_loo(lr.loss, lr.params, lr.train, test, l2=lr.l2, indices=ids)
    torch.testing.assert_close(via_hessian, via_gn, rtol=1e-9, atol=1e-13)


def test_group_removal_beats_summed_first_order(digits_lr):
    lr = digits_lr
    n = ti.num_examples(lr.train)
    of_class = (lr.train[1] == 3).nonzero().flatten()
    groups = [of_class[:size] for size in (10, 50, 100)]
    fo = first_order(lr, lr.test)                                               # [n_test, n]
    newton = newton_loo(lr.loss, lr.params, lr.train, lr.test, l2=lr.l2, groups=groups, **gauss_newton(lr))
    assert newton.shape == (ti.num_examples(lr.test), 3)
    base = lr.loss(lr.params, lr.test)
    for j, group in enumerate(groups):
        actual = lr.loss(retrain(lr.loss, lr.params, lr.train, keep_mask(n, group), lr.l2), lr.test) - base
        summed = fo[:, group].sum(1)
        err_newton = ((newton[:, j] - actual).norm() / actual.norm()).item()
        err_first = ((summed - actual).norm() / actual.norm()).item()
        print(f"remove {len(group)} of class 3: relative error over the test set newton {err_newton:.3e}, "
              f"summed first-order {err_first:.3e}")
        assert err_newton < err_first


@functools.lru_cache
def _linear_regression(n=120):
    """Squared error on a linear model of digits pixels: the objective is quadratic."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X[:n], dtype=torch.float64) / 16
    y = torch.tensor(y[:n], dtype=torch.float64)
    apply, params = ti.functionalize(nn.Linear(64, 1).double())
    predict = lambda p, b: apply(p, b[0])[:, 0]                                 # noqa: E731
    output_loss = lambda o, b: 0.5 * (o - b[1]) ** 2                            # noqa: E731
    loss = lambda p, b: output_loss(predict(p, b), b)                           # noqa: E731
    return loss, params, (X, y), dict(predict=predict, output_loss=output_loss)


def _frozen_features(n=120):
    """A tanh hidden layer kept frozen, squared error on the trainable last layer only: quadratic in it."""
    torch.manual_seed(0)
    loss, _, (X, y), _ = _linear_regression(n)
    module = nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    apply, params = ti.functionalize(module, trainable=lambda name, p: name.startswith("2."))
    predict = lambda p, b: apply(p, b[0])[:, 0]                                 # noqa: E731
    output_loss = lambda o, b: 0.5 * (o - b[1]) ** 2                            # noqa: E731
    loss = lambda p, b: output_loss(predict(p, b), b)                           # noqa: E731
    return loss, params, (X, y), dict(predict=predict, output_loss=output_loss)


@pytest.mark.parametrize("build", [_linear_regression, _frozen_features], ids=["linear", "last_layer"])
@pytest.mark.parametrize("factors", ["gauss_newton", "hessian"])
def test_quadratic_objective_newton_equals_retraining(build, factors):
    loss, params0, train, gn = build()
    kw = gn if factors == "gauss_newton" else {}
    l2 = 1e-2
    params = ti.minimize(ti.objective(loss, train, l2=l2), params0, gtol=1e-12, newton_steps=5)
    test = (train[0][:7] + 0.1, train[1][:7])
    n = ti.num_examples(train)
    P = tr.size(params)
    singles = torch.tensor([0, 5, 17, 99])
    groups = [torch.arange(3, 6), torch.arange(10, 10 + P + 5)]                 # Woodbury rank 3 < P; dense, rank > P
    base = loss(params, test)
    for ids, kind in ((singles, "indices"), (groups, "groups")):
        removed = [[i] for i in ids.tolist()] if kind == "indices" else ids
        delta = newton_loo(loss, params, train, test, l2=l2, **{kind: ids}, **kw)
        for j, S in enumerate(removed):
            retrained = retrain(loss, params, train, keep_mask(n, S), l2)
            stepped = newton_step_without(loss, params, train, l2=l2, remove=S, **kw)
            for name in params:
                torch.testing.assert_close(stepped[name], retrained[name], rtol=0, atol=1e-10)
            torch.testing.assert_close(delta[:, j], loss(retrained, test) - base, rtol=0, atol=1e-10)


@functools.lru_cache
def _mlp_classifier(n=40):
    """A small non-convex classifier: tanh MLP with cross-entropy, trained to a tight optimum."""
    torch.manual_seed(0)
    X = torch.randn(n, 3)
    y = (X[:, 0] * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    apply, params = ti.functionalize(module)
    predict = lambda p, b: apply(p, b[0])                                       # noqa: E731
    output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")       # noqa: E731
    loss = lambda p, b: output_loss(predict(p, b), b)                           # noqa: E731
    params = ti.minimize(ti.objective(loss, (X, y), l2=1e-2), params, gtol=1e-12, newton_steps=5)
    return loss, params, (X, y), dict(predict=predict, output_loss=output_loss)


@pytest.mark.parametrize("factors", ["gauss_newton", "hessian"])
def test_step_equals_dense_newton_step_on_the_kept_objective(factors):
    """Non-convex model: the step is −(C + λI)⁻¹ ∇R₋S(θ̂) with C the dense Hessian (or GGN) of the kept objective."""
    loss, params, train, gn = _mlp_classifier()
    l2, damping = 1e-2, 1e-3
    kw = gn if factors == "gauss_newton" else {}
    n, P = ti.num_examples(train), tr.size(params)
    groups = [[7], torch.arange(0, 4), torch.arange(4, 4 + P // 3 + 1)]        # ranks 3, 12 < P = 31; 36 >= P
    E = torch.eye(P)
    read_params = lambda p, b: b @ tr.ravel(p)                                  # noqa: E731, measure = coordinates of θ
    delta = newton_loo(loss, params, train, E, l2=l2, groups=groups, measure=read_params, damping=damping, **kw)
    for j, S in enumerate(groups):
        kept = ti.take(train, keep_mask(n, S))
        R = ti.objective(loss, kept, l2=l2)
        if factors == "gauss_newton":
            C = ti.to_dense(ti.ggn_vp(gn["predict"], params, kept, output_loss=gn["output_loss"], l2=l2), params)
        else:
            C = ti.hessian(R, params)
        expected = -torch.linalg.solve(C + damping * torch.eye(P), tr.ravel(torch.func.grad(R)(params)))
        torch.testing.assert_close(delta[:, j], expected, rtol=1e-10, atol=1e-13)
        stepped = newton_step_without(loss, params, train, l2=l2, remove=S, damping=damping, **kw)
        torch.testing.assert_close(tr.ravel(stepped) - tr.ravel(params), delta[:, j], rtol=0, atol=1e-13)


def test_same_size_groups_equal_one_at_a_time():
    loss, params, train, gn = _mlp_classifier()
    groups = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([8, 9]), torch.tensor([30])]
    test = ti.take(train, slice(0, 5))
    together = newton_loo(loss, params, train, test, l2=1e-2, groups=groups, **gn)
    alone = torch.cat([newton_loo(loss, params, train, test, l2=1e-2, groups=[g], **gn) for g in groups], dim=1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-14)
    singles = newton_loo(loss, params, train, test, l2=1e-2, indices=[3, 30], **gn)
    torch.testing.assert_close(singles, together[:, [1, 3]], rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(indices=[1, 40]), ValueError, r"ti.newton_loo: `indices` ids must lie in \[0, n=40\); got 40 at position 1"),
    (dict(indices=[-1]), ValueError, r"`indices` ids must lie in \[0, n=40\); got -1 at position 0"),
    (dict(indices=[]), ValueError, r"ti.newton_loo: `indices` is empty"),
    (dict(indices=[0.5]), TypeError, r"ti.newton_loo: `indices` must hold integer training ids; got dtype torch.float"),
    (dict(indices=[[1, 2]]), ValueError, r"`indices` must be 1-D .* got shape \[1, 2\]"),
    (dict(groups=[[1, 2], []]), ValueError, r"ti.newton_loo: `groups\[1\]` is empty"),
    (dict(groups=[]), ValueError, r"`groups` must be a non-empty list of id lists; got an empty list"),
    (dict(groups=torch.zeros(2, 3, dtype=torch.long)), ValueError, r"got a tensor. For same-size groups pass list\(ids_2d\)"),
    (dict(groups=[[1, 1]]), ValueError, r"`groups\[0\]` repeats a training id"),
    (dict(groups=[list(range(40))]), ValueError, r"`groups\[0\]` removes all n=40 training examples"),
    (dict(indices=[1], groups=[[1]]), ValueError, r"give exactly one of `indices` .* or `groups` .*; got both"),
    (dict(), ValueError, r"give exactly one of `indices` .* or `groups` .*; got neither"),
    (dict(indices=[1], damping=-1.0), ValueError, r"ti.newton_loo: `damping` must be >= 0; got -1.0"),
    (dict(indices=[1], l2=-1.0), ValueError, r"ti.newton_loo: `l2` must be >= 0; got -1.0"),
    (dict(indices=[1], predict=lambda p, b: b[0]), ValueError, r"give both `predict` and `output_loss` .*; got only `predict`"),
])
def test_errors(kwargs, error, match):
    loss, params, train, _ = _mlp_classifier()
    kwargs = {"l2": 1e-2, **kwargs}
    with pytest.raises(error, match=match):
        newton_loo(loss, params, train, ti.take(train, slice(0, 2)), **kwargs)


def test_step_errors():
    loss, params, train, _ = _mlp_classifier()
    with pytest.raises(ValueError, match=r"ti.newton_step_without: `remove` is empty"):
        newton_step_without(loss, params, train, l2=1e-2, remove=[])
    with pytest.raises(ValueError, match=r"ti.newton_step_without: `remove` ids must lie in \[0, n=40\); got 41"):
        newton_step_without(loss, params, train, l2=1e-2, remove=[3, 41])


def test_singular_curvature_is_reported():
    """l2 = 0 and pixels that are 0 in every image: the weights on them have no curvature."""
    loss, params, train, gn = _linear_regression()
    assert bool((train[0] == 0).all(0).any())
    with pytest.raises(ti.ConvergenceError, match=r"ti.newton_loo: a Newton step is not finite: .* Raise `damping`"):
        newton_loo(loss, params, train, train, l2=0.0, groups=[torch.arange(70)], **gn)


# --- over a process group: `train` sharded unevenly over 2 gloo ranks gives every rank one process's result ---

GROUP_L2 = 1e-2
SHARDS = [0, 70, 120]                                            # 70 and 50 examples: the ranks' chunks differ
REMOVED = dict(indices=[0, 69, 70, 119, 33],                     # ids on both sides of the shard boundary
               groups=[[1, 2], [68, 71], [5], [100, 110, 119], [69, 70]])


def _lr_predict(params, batch):
    return batch[0] @ params["weight"].T + params["bias"]


def _lr_output_loss(outputs, batch):
    return F.cross_entropy(outputs, batch[1], reduction="none")


def _lr_loss(params, batch):
    return _lr_output_loss(_lr_predict(params, batch), batch)


def _lr_class0(params, batch):
    """A measure on a dict test set {"x"}: the probability of class 0."""
    return _lr_predict(params, (batch["x"],)).softmax(1)[:, 0]


def _newton_cases(params, train, test, group):
    """`newton_loo` with Gauss-Newton factors (single and group removals) and with exact Hessians and a measure."""
    gn = dict(predict=_lr_predict, output_loss=_lr_output_loss)
    return {
        "indices": newton_loo(_lr_loss, params, train, test, l2=GROUP_L2, indices=REMOVED["indices"], group=group,
                              chunk_size=32, **gn),
        "groups": newton_loo(_lr_loss, params, train, test, l2=GROUP_L2, groups=REMOVED["groups"], group=group, **gn),
        "exact_measure": newton_loo(_lr_loss, params, train, {"x": test[0]}, l2=GROUP_L2, groups=REMOVED["groups"],
                                    measure=_lr_class0, damping=1e-3, group=group),
    }


def _sharded_newton(rank, world, params, train, test):
    group = dist.group.WORLD
    shard = ti.take(train, slice(SHARDS[rank], SHARDS[rank + 1]))
    out = _newton_cases(params, shard, test, group)
    try:                                                          # the removed ids must be the same on every rank
        newton_loo(_lr_loss, params, shard, test, l2=GROUP_L2, indices=[3, 4 + rank], group=group)
    except ValueError as err:
        out["mismatch"] = str(err)
    return out


@pytest.fixture(scope="module")
def small_problem(digits_lr):
    """Logistic regression on 16 digits pixels (P = 170), 120 training and 4 test points, at its optimum."""
    x, y = ti.take(digits_lr.train, slice(0, 120))
    train = (x[:, :16].contiguous(), y)
    test = (digits_lr.test[0][:4, :16].contiguous(), digits_lr.test[1][:4])
    params = ti.minimize(ti.objective(_lr_loss, train, l2=GROUP_L2), {"weight": torch.zeros(10, 16), "bias": torch.zeros(10)},
                         gtol=1e-12, newton_steps=5)
    return params, train, test


@pytest.mark.slow
def test_newton_loo_over_a_group_equals_one_process(small_problem, tmp_path):
    from test_distributed import _spawn

    params, train, test = small_problem
    expected = _newton_cases(params, train, test, None)
    for rank, got in enumerate(_spawn(2, _sharded_newton, (params, train, test), tmp_path)):
        assert got is not None, f"rank {rank} died"
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10 * float(value.abs().max()),
                                       msg=lambda m, name=name, rank=rank: f"{name} (rank {rank}): {m}")
        assert got["mismatch"].startswith("ti.newton_loo: with `group`, every rank must pass the same"), got["mismatch"]
        assert "`indices` differs from rank 0's on rank(s) [1]" in got["mismatch"], got["mismatch"]

