"""Classic influence against dense formulas and against actual leave-one-out retraining."""

import time

import pytest
import torch
import torch.nn.functional as F

import tinfluence as ti


def _pearson(a, b):
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


def _spearman(a, b):
    rank = lambda x: x.argsort(-1).argsort(-1).to(torch.float64)  # noqa: E731
    return _pearson(rank(a), rank(b))


@pytest.fixture(scope="module")
def H(digits_lr):
    return ti.hessian(digits_lr.objective(digits_lr.train), digits_lr.params)


@pytest.fixture(scope="module")
def test5(digits_lr):
    return ti.take(digits_lr.test, slice(0, 5))


def _dense_scores(m, H, test, damping=0.0, measure=None):
    """(1/n) g_testᵀ (H + λI)⁻¹ g_z from explicit matrices."""
    G_train = ti.ravel(ti.per_example_grads(m.loss, m.params, m.train), batch_ndim=1)             # [n, P]
    G_test = ti.ravel(ti.per_example_grads(measure or m.loss, m.params, test), batch_ndim=1)     # [t, P]
    A = H + damping * torch.eye(H.shape[0])
    return G_test @ torch.linalg.solve(A, G_train.T) / G_train.shape[0]


def test_influence_equals_dense_formula_for_every_chunk_size(digits_lr, H, test5):
    expected = _dense_scores(digits_lr, H, test5, damping=1e-3)
    for chunk_size in (None, 333):
        scores = ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, test5,
                              ihvp=ti.direct(H, damping=1e-3), chunk_size=chunk_size)
        assert scores.shape == (5, 1000) and scores.dtype == torch.float64
        torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-16)
    one = ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, ti.take(test5, slice(2, 3)), ihvp=ti.direct(H, damping=1e-3))
    torch.testing.assert_close(one, expected[2:3], rtol=1e-10, atol=1e-16)


def test_influence_with_measure(digits_lr, H, test5):
    margin = lambda p, b: digits_lr.apply(p, b[0]).gather(1, b[1][:, None])[:, 0]  # noqa: E731
    scores = ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, test5, ihvp=ti.direct(H), measure=margin)
    torch.testing.assert_close(scores, _dense_scores(digits_lr, H, test5, measure=margin), rtol=1e-10, atol=1e-16)


def test_influence_cg_equals_direct(digits_lr, H, test5):
    R = digits_lr.objective(digits_lr.train)
    cg = ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, test5, ihvp=ti.cg(ti.hvp(R, digits_lr.params), tol=1e-10, maxiter=300))
    exact = ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, test5, ihvp=ti.direct(H))
    assert float((cg - exact).norm() / exact.norm()) < 1e-6


def test_self_influence_is_diagonal_of_influence(digits_lr, H):
    part = ti.take(digits_lr.train, slice(0, 50))
    expected = torch.diagonal(_dense_scores(digits_lr, H, part))
    got = ti.self_influence(digits_lr.loss, digits_lr.params, digits_lr.train, ihvp=ti.direct(H), chunk_size=300)
    assert got.shape == (1000,) and bool((got > 0).all())
    torch.testing.assert_close(got[:50], expected, rtol=1e-10, atol=1e-16)


def test_influence_last_layer_subset_with_ggn(digits_lr, generator):
    model = torch.nn.Sequential(torch.nn.Linear(64, 4), torch.nn.Tanh(), torch.nn.Linear(4, 10))
    apply, params = ti.functionalize(model, trainable=lambda name, p: name.startswith("2."))
    train, test = ti.take(digits_lr.train, slice(0, 200)), ti.take(digits_lr.test, slice(0, 3))
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    GN = ti.ggn_vp(lambda p, b: apply(p, b[0]), params, train,
                   output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), l2=1e-2)
    via_cg = ti.influence(loss, params, train, test, ihvp=ti.cg(GN, tol=1e-12, maxiter=300))
    via_dense = ti.influence(loss, params, train, test, ihvp=ti.direct(ti.to_dense(GN, params)))
    assert via_cg.shape == (3, 200)
    torch.testing.assert_close(via_cg, via_dense, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("test, match", [
    ({"x": torch.zeros(3, 64)}, r"ti.influence: `test` must have the structure of `train`"),
    ((torch.zeros(3, 63), torch.zeros(3, dtype=torch.long)), r"ti.influence: `test` leaf \(0,\) must have per-example shape \[64\] like `train`; got \[63\]"),
])
def test_influence_mismatched_test_train(digits_lr, H, test, match):
    with pytest.raises(ValueError, match=match):
        ti.influence(digits_lr.loss, digits_lr.params, digits_lr.train, test, ihvp=ti.direct(H))


@pytest.mark.slow
def test_influence_predicts_leave_one_out_retraining(digits_lr, H):
    """For 3 test points and the 30 training points with the largest |score| each, retrain
    without the point (warm start, Newton polish to gradient 1e-12) and compare the actual
    change in test loss with the score."""
    m = digits_lr
    test = ti.take(m.test, slice(0, 3))
    R = m.objective(m.train)
    scores = {
        "direct": ti.influence(m.loss, m.params, m.train, test, ihvp=ti.direct(H)),
        "cg": ti.influence(m.loss, m.params, m.train, test, ihvp=ti.cg(ti.hvp(R, m.params), tol=1e-10, maxiter=300)),
    }
    top = scores["direct"].abs().topk(30, dim=1).indices                                  # [3, 30]
    removed = torch.unique(top)
    base = m.loss(m.params, test)
    start = time.perf_counter()
    actual = {}
    for i in removed.tolist():
        keep = torch.ones(1000, dtype=torch.bool)
        keep[i] = False
        params = ti.minimize(m.objective(ti.take(m.train, keep)), m.params, gtol=1e-12, newton_steps=5, maxiter=20)
        actual[i] = m.loss(params, test) - base                                              # [3]
    print(f"\nretrained {len(removed)} models in {time.perf_counter() - start:.1f} s")
    for name, s in scores.items():
        predicted = torch.gather(s, 1, top)                                                   # [3, 30]
        truth = torch.stack([torch.stack([actual[i][t] for i in top[t].tolist()]) for t in range(3)])
        r, rho = _pearson(predicted, truth), _spearman(predicted, truth)
        signs = (predicted.sign() == truth.sign()).to(torch.float64).mean(1)
        print(f"{name}: Pearson {r.tolist()} Spearman {rho.tolist()} sign agreement {signs.tolist()}")
        assert bool((r >= 0.95).all()) and float(r.mean()) >= 0.98
        # First order's ceiling on these points (direct: Spearman 0.977, 0.992, 0.977): the Newton
        # step below, on the same retrained models, meets the per-point 0.98 that first order misses.
        assert float(rho.mean()) >= 0.98 and bool((rho >= 0.97).all())
        assert bool((signs == 1).all())
    newton = ti.newton_loo(m.loss, m.params, m.train, test, l2=m.l2, indices=removed)          # [3, |removed|]
    column = {i: j for j, i in enumerate(removed.tolist())}
    predicted = torch.stack([newton[t, [column[i] for i in top[t].tolist()]] for t in range(3)])
    rho = _spearman(predicted, truth)
    print(f"newton_loo: Spearman {rho.tolist()}")
    assert bool((rho >= 0.98).all())


def test_return_info_gives_the_solvers_diagnostics_of_a_successful_run(digits_lr, H, test5):
    m = digits_lr
    ihvp = ti.cg(ti.hvp(m.objective(m.train), m.params), tol=1e-10)
    scores, info = ti.influence(m.loss, m.params, m.train, test5, ihvp=ihvp, return_info=True)
    torch.testing.assert_close(scores, _dense_scores(m, H, test5), rtol=1e-7, atol=1e-12)
    G_test = ti.per_example_grads(m.loss, m.params, test5)
    _, reference = ihvp.solve(G_test)
    assert bool(info.converged.all()) and info.iterations.shape == (5,)
    assert info.iterations.tolist() == reference.iterations.tolist() and 0 < int(info.iterations.max()) < 100
    assert float(info.relative_residual.max()) <= 1e-10
    with pytest.raises(TypeError, match=r"ti.influence: `return_info=True` needs a solver of the library"):
        ti.influence(m.loss, m.params, m.train, test5, ihvp=lambda v: v, return_info=True)
    starved = ti.cg(ti.hvp(m.objective(m.train), m.params), tol=1e-10, maxiter=2)
    with pytest.raises(ti.ConvergenceError):                       # the solver's on_failure policy still applies
        ti.influence(m.loss, m.params, m.train, test5, ihvp=starved, return_info=True)
