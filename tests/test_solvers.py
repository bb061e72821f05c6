"""Inverse-HVP solvers against dense linear algebra: direct, cg (batched right-hand sides), lissa."""

import pytest
import scipy.sparse.linalg
import torch
import torch.nn.functional as F

import tinfluence as ti


def _spd(P, generator, cond=50.0):
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=generator))
    return Q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(cond)), P)) @ Q.T


def _pearson(a, b):
    a, b = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))


@pytest.fixture(scope="module")
def digits_H(digits_lr):
    return ti.hessian(digits_lr.objective(digits_lr.train), digits_lr.params)


@pytest.fixture(scope="module")
def G_test(digits_lr):
    return ti.per_example_grads(digits_lr.loss, digits_lr.params, ti.take(digits_lr.test, slice(0, 10)))


# ---------------------------------------------------------------- direct

def test_direct_equals_linalg_solve_single_and_stacked(digits_lr, digits_H, G_test):
    ihvp = ti.direct(digits_H, damping=1e-3)
    A = digits_H + 1e-3 * torch.eye(digits_H.shape[0])
    B = ti.ravel(G_test, batch_ndim=1)                                   # [10, P]
    expected = torch.linalg.solve(A, B.T).T
    X = ihvp(G_test)
    assert X.keys() == G_test.keys() and X["weight"].shape == G_test["weight"].shape
    torch.testing.assert_close(ti.ravel(X, batch_ndim=1), expected, rtol=1e-10, atol=1e-14)
    one = ihvp(ti.tree.map(lambda t: t[3], G_test))
    torch.testing.assert_close(ti.ravel(one), expected[3], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ihvp(B), expected, rtol=1e-10, atol=1e-14)   # plain [k, P] tensor


def test_direct_vmaps():
    g = torch.Generator().manual_seed(0)
    A = _spd(6, g)
    V = torch.randn(4, 6, generator=g)
    torch.testing.assert_close(torch.func.vmap(ti.direct(A))(V), torch.linalg.solve(A, V.T).T, rtol=1e-10, atol=0)


def test_direct_indefinite_is_a_reported_status():
    A = torch.diag(torch.tensor([2.0, -1.0, 4.0]))
    v = torch.tensor([1.0, 1.0, 1.0])
    match = r"ti.direct: H \+ λI is not positive definite \(smallest eigenvalue -1.000e\+00.*Raise `damping` above 1.000e\+00"
    with pytest.raises(ti.ConvergenceError, match=match) as err:
        ti.direct(A)(v)
    assert err.value.info.status.item() == ti.Status.BREAKDOWN
    with pytest.warns(UserWarning, match=match):
        x = ti.direct(A, on_failure="warn")(v)
    torch.testing.assert_close(x, torch.tensor([0.5, -1.0, 0.25]), rtol=1e-12, atol=0)
    x, info = ti.direct(A).solve(v)                                          # never raises
    assert info.status.item() == ti.Status.BREAKDOWN and not bool(info.converged)
    assert float(info.curvature) == -1.0


@pytest.mark.parametrize("H, kwargs, error, match", [
    ([[1.0]], {}, TypeError, r"ti.direct: `H` must be a \[P, P\] tensor .* or a ti.LinearOperator"),
    (torch.ones(2, 3), {}, ValueError, r"ti.direct: `H` must be a square \[P, P\] matrix; got shape \(2, 3\)"),
    (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), {}, ValueError, r"ti.direct: `H` must be symmetric"),
    (torch.eye(2), {"damping": -1.0}, ValueError, r"ti.direct: `damping` must be >= 0; got -1.0"),
    (torch.tensor([[float("nan")]]), {}, ValueError, r"ti.direct: `H` has non-finite values"),
])
def test_direct_bad_inputs(H, kwargs, error, match):
    with pytest.raises(error, match=match):
        ti.direct(H, **kwargs)


def test_direct_bad_v():
    with pytest.raises(ValueError, match=r"ti.direct: `v` must hold P=3 numbers .* got leaves \[\(5,\)\]"):
        ti.direct(torch.eye(3))(torch.ones(5))


# ---------------------------------------------------------------- cg

def test_cg_matches_direct_on_digits(digits_lr, digits_H, G_test):
    Hv = ti.hvp(digits_lr.objective(digits_lr.train), digits_lr.params)
    x, info = ti.cg_solve(Hv, G_test, damping=1e-3, tol=1e-10, maxiter=300)
    expected = ti.ravel(ti.direct(digits_H, damping=1e-3)(G_test), batch_ndim=1)
    got = ti.ravel(x, batch_ndim=1)
    assert bool(info.converged.all()) and info.iterations.shape == (10,) and bool((info.relative_residual <= 1e-10).all())
    assert float((got - expected).norm(dim=1).div(expected.norm(dim=1)).max()) < 1e-6


def test_cg_iterates_equal_scipy():
    g = torch.Generator().manual_seed(1)
    A, v = _spd(8, g), torch.randn(8, generator=g)
    for iterations in (1, 3):
        x, _ = ti.cg_solve(lambda u: u @ A.T, v, tol=None, maxiter=iterations)
        ref, _ = scipy.sparse.linalg.cg(A.numpy(), v.numpy(), x0=torch.zeros(8).numpy(), rtol=0.0, atol=0.0, maxiter=iterations)
        torch.testing.assert_close(x, torch.as_tensor(ref), rtol=1e-12, atol=1e-12)


def test_cg_100_rhs_one_operator_call_per_iteration():
    g = torch.Generator().manual_seed(2)
    A, V = _spd(30, g), torch.randn(100, 30, generator=g)
    calls = []

    def operator(u):
        calls.append(u.shape)
        return (u.unsqueeze(-2) * A).sum(-1)       # the same rounding for one row or a stack

    x, info = ti.cg_solve(operator, V, tol=1e-10, maxiter=200, check_every=1)
    # one call per iteration, and one more for the true residual
    assert len(calls) == int(info.iterations.max()) + 1 and all(shape == (100, 30) for shape in calls)
    separate = torch.stack([ti.cg_solve(operator, v, tol=1e-10, maxiter=200, check_every=1)[0] for v in V])
    torch.testing.assert_close(x, separate, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, V.T).T, rtol=1e-8, atol=1e-10)


def test_cg_default_check_every_stops_at_once_on_cpu():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    calls = []

    def operator(u):
        calls.append(1)
        return u @ A

    _, info = ti.cg_solve(operator, torch.ones(2, 4), tol=1e-12, maxiter=50)
    assert len(calls) - 1 == int(info.iterations.max()) == 4                # + 1: the true residual
    calls.clear()
    ti.cg_solve(operator, torch.ones(2, 4), tol=1e-12, maxiter=50, check_every=10)
    assert len(calls) - 1 == 10


def test_cg_per_rhs_stopping_and_zero_rhs():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    V = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    x, info = ti.cg_solve(lambda u: u @ A, V, tol=1e-12, maxiter=10, check_every=1)
    assert info.iterations.tolist() == [1, 4, 0] and info.converged.tolist() == [True, True, True]
    torch.testing.assert_close(x, V / torch.diag(A), rtol=1e-12, atol=0)


def _mlp(generator):
    model = torch.nn.Sequential(torch.nn.Linear(64, 3), torch.nn.Tanh(), torch.nn.Linear(3, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=generator))
    return ti.functionalize(model)


def test_cg_on_damped_ggn_of_mlp_matches_direct(digits_lr, generator):
    apply, params = _mlp(generator)
    train = ti.take(digits_lr.train, slice(0, 200))
    GN = ti.ggn_vp(lambda p, b: apply(p, b[0]), params, train,
                   output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), l2=1e-3)
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    V = ti.per_example_grads(loss, params, ti.take(digits_lr.test, slice(0, 5)))
    x = ti.cg(GN, damping=1e-2, tol=1e-12, maxiter=500)(V)
    expected = ti.direct(ti.to_dense(GN, params), damping=1e-2)(V)
    err = ti.ravel(ti.tree.sub(x, expected), batch_ndim=1).norm(dim=1) / ti.ravel(expected, batch_ndim=1).norm(dim=1)
    assert float(err.max()) < 1e-6


def test_cg_negative_curvature_raises(digits_lr, generator):
    apply, params = _mlp(generator)
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    R = ti.objective(loss, ti.take(digits_lr.train, slice(0, 50)))
    evals, Q = torch.linalg.eigh(ti.hessian(R, params))
    assert evals[0] < 0
    v = ti.unravel(Q[:, 0], params)                                   # most negative direction
    with pytest.raises(ti.ConvergenceError, match=r"ti.cg: negative curvature pᵀ\(H \+ λI\)p/‖p‖² = -.* at iteration 0 \(right-hand side 0\).*Raise `damping`.*ti.eigenvalues.*ti.ggn_vp") as err:
        ti.cg(ti.hvp(R, params))(v)
    assert not bool(err.value.info.converged)
    # v is the unit eigenvector of the most negative eigenvalue: the Rayleigh quotient is that eigenvalue
    torch.testing.assert_close(err.value.info.curvature, evals[0], rtol=1e-8, atol=0)
    with pytest.warns(UserWarning, match="ti.cg: negative curvature"):
        ti.cg(ti.hvp(R, params), on_failure="warn")(v)


def test_cg_nonconvergence_raises_with_info():
    A = _spd(40, torch.Generator().manual_seed(3), cond=1e4)
    V = torch.randn(20, 40, generator=torch.Generator().manual_seed(4))
    with pytest.raises(ti.ConvergenceError, match=r"ti.cg: 20 of 20 right-hand sides did not converge in maxiter=3 iterations \(worst relative residual .* > tol=1e-08\). Raise `maxiter` or `damping`") as err:
        ti.cg(lambda u: u @ A, tol=1e-8, maxiter=3)(V)
    info = err.value.info
    assert info.iterations.tolist() == [3] * 20 and info.relative_residual.shape == (20,)
    assert info.status.tolist() == [ti.Status.MAX_ITERATIONS] * 20


@pytest.mark.parametrize("kwargs, match", [
    ({"damping": -1e-3}, r"ti.cg: `damping` must be >= 0; got -0.001"),
    ({"tol": -1.0}, r"ti.cg: `tol` must be >= 0; got -1.0"),
    ({"maxiter": 0}, r"ti.cg: `maxiter` must be an int >= 1; got 0"),
    ({"check_every": 0}, r"ti.cg: `check_every` must be None or an int >= 1; got 0"),
    ({"on_failure": "ignore"}, r'ti.cg: `on_failure` must be "raise" or "warn"; got \'ignore\''),
])
def test_cg_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ti.cg(lambda u: u, **kwargs)


def test_cg_pytree_needs_parameters():
    with pytest.raises(TypeError, match=r"ti.cg: a plain operator acts on tensors.*ti.LinearOperator\(fn, like=params\)"):
        ti.cg(lambda u: u)({"a": torch.ones(3)})
    with pytest.raises(ValueError, match=r"ti.cg: `v` leaves must have the parameter shapes"):
        ti.cg(ti.LinearOperator(lambda u: u, like={"a": torch.ones(3)}))({"a": torch.ones(4)})


def test_cg_fixed_iterations_vmap_and_compile_equal_eager(generator):
    A = _spd(12, generator)
    V = torch.randn(5, 12, generator=generator)
    ihvp = ti.cg(lambda u: u @ A, damping=0.1, tol=None, maxiter=5)
    eager = ihvp(V)
    torch.testing.assert_close(torch.func.vmap(ihvp)(V), eager, rtol=1e-12, atol=1e-14)
    compiled = torch.compile(ihvp, fullgraph=True)
    # compiled kernels fuse and reorder float64 reductions; CG's recurrences amplify that round-off to ~1e-12
    torch.testing.assert_close(compiled(V), eager, rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- lissa

LISSA = dict(damping=0.05, depth=300, batch_size=64)   # converges: error (1 - λmin/scale)^300 < 1e-3


def test_lissa_agrees_with_direct(digits_lr, digits_H, G_test):
    ihvp = ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2, generator=torch.Generator().manual_seed(0), **LISSA)
    expected = ti.direct(digits_H, damping=LISSA["damping"])(G_test)
    got = ihvp(G_test)
    got, expected = ti.ravel(got, batch_ndim=1), ti.ravel(expected, batch_ndim=1)
    r = _pearson(got.flatten(), expected.flatten())
    print(f"lissa vs direct Pearson {float(r):.4f}")
    assert r >= 0.99
    # the scale too, not only the direction: the bias (1 − λmin/scale)^300 is < 1e-3, the rest is mini-batch
    # noise (batch 64), measured at 8% overall and 7–17% per right-hand side; a wrong factor (2×, 1/scale) is ≥ 50%
    rel = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert float((got - expected).norm() / expected.norm()) < 0.12 and float(rel.max()) < 0.25
    assert float((got.norm(dim=1) / expected.norm(dim=1) - 1).abs().max()) < 0.15


def test_lissa_same_generator_same_result_and_not_advanced(digits_lr, G_test):
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    V = ti.tree.map(lambda t: t[:2], G_test)
    make = lambda: ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2, damping=0.05,  # noqa: E731
                            scale=2.0, depth=20, batch_size=8, generator=g)
    a, b = make()(V), make()(V)
    assert torch.equal(g.get_state(), state)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    single = make()(ti.tree.map(lambda t: t[1], V))
    torch.testing.assert_close(single, ti.tree.map(lambda t: t[1], a), rtol=1e-12, atol=1e-15)


def test_lissa_too_small_scale_diverges(digits_lr, G_test):
    ihvp = ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2, scale=0.05, depth=200,
                    generator=torch.Generator().manual_seed(0))
    with pytest.raises(ti.DivergenceError, match=r"ti.lissa: the recursion diverged at depth \d+ .*`scale`=0.05 must exceed .*raise `scale`"):
        ihvp(G_test)


def test_lissa_tol_stops_early(digits_lr, G_test):
    one = ti.take(digits_lr.train, slice(0, 1))        # every mini-batch is this example: a deterministic recursion
    x, info = ti.lissa_solve(digits_lr.loss, digits_lr.params, one, G_test, l2=digits_lr.l2, damping=0.5,
                             scale=3.0, depth=2000, tol=1e-10)
    assert bool(info.converged.all()) and int(info.iterations.max()) < 2000
    H = ti.hessian(digits_lr.objective(one), digits_lr.params)
    torch.testing.assert_close(x, ti.direct(H, damping=0.5)(G_test), rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("kwargs, match", [
    ({"scale": 0.0}, r'ti.lissa: `scale` must be "auto" or a finite number > 0'),
    ({"scale": float("inf")}, r'ti.lissa: `scale` must be "auto" or a finite number > 0 .*got inf'),
    ({"scale": float("nan")}, r'ti.lissa: `scale` must be "auto" or a finite number > 0 .*got nan'),
    ({"on_failure": "ignore"}, r'ti.lissa: `on_failure` must be "raise" or "warn"'),
    ({"depth": 0}, r"ti.lissa: `depth` must be an int >= 1; got 0"),
    ({"damping": -1.0}, r"ti.lissa: `damping` must be >= 0; got -1.0"),
])
def test_lissa_bad_options(digits_lr, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, **kwargs)


# ---------------------------------------------------------------- nystrom preconditioner

def test_preconditioned_cg_iterates_equal_scipy():
    g = torch.Generator().manual_seed(3)
    A, v = _spd(8, g, cond=1e3), torch.randn(8, generator=g)
    M = torch.diag(1.0 / torch.diag(A)) + 0.01 * torch.ones(8, 8) / 8      # any symmetric positive definite P⁻¹
    for iterations in (1, 3):
        x, _ = ti.cg_solve(lambda u: u @ A.T, v, tol=None, maxiter=iterations, preconditioner=lambda V: V @ M.T)
        ref, _ = scipy.sparse.linalg.cg(A.numpy(), v.numpy(), x0=torch.zeros(8).numpy(), rtol=0.0, atol=0.0,
                                        maxiter=iterations, M=M.numpy())
        torch.testing.assert_close(x, torch.as_tensor(ref), rtol=1e-12, atol=1e-12)


def test_nystrom_equals_formula_with_exact_eigenvectors_for_low_rank_operator():
    g = torch.Generator().manual_seed(4)
    Q = torch.linalg.qr(torch.randn(30, 5, generator=g)).Q
    C = Q @ torch.diag(torch.tensor([50.0, 20.0, 8.0, 3.0, 1.0])) @ Q.T       # rank 5: the sketch is exact
    damping, V = 0.1, torch.randn(4, 30, generator=g)
    precondition = ti.nystrom(ti.LinearOperator(lambda u: u @ C, like=torch.zeros(30)), rank=5, generator=g,
                              damping=damping)
    lam, U = torch.linalg.eigh(C)
    lam, U = lam[-5:], U[:, -5:]
    expected = (lam[0] + damping) * U @ torch.diag(1 / (lam + damping)) @ U.T + torch.eye(30) - U @ U.T
    torch.testing.assert_close(precondition(V), V @ expected, rtol=1e-9, atol=1e-10)


def test_nystrom_cuts_cg_iterations_and_keeps_the_solution(digits_lr, G_test):
    R = ti.objective(digits_lr.loss, digits_lr.train, l2=1e-4)                 # ill-conditioned
    Hv = ti.hvp(R, digits_lr.params)
    plain, info_plain = ti.cg_solve(Hv, G_test, tol=1e-8, maxiter=1000)
    g = torch.Generator().manual_seed(0)
    precondition = ti.nystrom(Hv, rank=100, generator=g)
    x, info = ti.cg_solve(Hv, G_test, tol=1e-8, maxiter=1000, preconditioner=precondition)
    assert bool(info.converged.all()) and bool(info_plain.converged.all())
    assert int(info.iterations.max()) < 0.5 * int(info_plain.iterations.max())
    expected = ti.ravel(ti.direct(ti.hessian(R, digits_lr.params))(G_test), batch_ndim=1)
    got = ti.ravel(x, batch_ndim=1)
    assert float((got - expected).norm(dim=1).div(expected.norm(dim=1)).max()) < 1e-6
    assert ti.ravel(precondition(G_test), batch_ndim=1).shape == (10, 650)
    state = g.get_state()
    again = ti.nystrom(Hv, rank=100, generator=g)
    torch.testing.assert_close(again(G_test), precondition(G_test), rtol=0, atol=0)
    assert torch.equal(g.get_state(), state)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"rank": 0}, ValueError, r"ti.nystrom: `rank` must be an int in \[1, P=30\]; got 0"),
    ({"rank": 31}, ValueError, r"ti.nystrom: `rank` must be an int in \[1, P=30\]; got 31"),
    ({"rank": 3, "damping": -1.0}, ValueError, r"ti.nystrom: `damping` must be >= 0; got -1.0"),
    ({"rank": 3, "generator": 0}, TypeError, r"ti.nystrom: `generator` must be a torch.Generator; got int"),
    ({"rank": 3, "operator": lambda u: u}, TypeError,
     r"ti.nystrom: cannot tell the shapes of the vectors: wrap the function as ti.LinearOperator\(fn, like=params\)"),
])
def test_nystrom_bad_options(kwargs, error, match):
    options = {"operator": ti.LinearOperator(lambda u: u, like=torch.zeros(30)),
               "generator": torch.Generator().manual_seed(0), **kwargs}
    with pytest.raises(error, match=match):
        ti.nystrom(**options)


def test_nystrom_singular_operator_needs_damping():
    C = torch.diag(torch.tensor([2.0, 1.0] + [0.0] * 28))                    # rank 2
    with pytest.raises(ValueError, match=r"ti.nystrom: sketched eigenvalue 3 plus damping is .*pass damping > 0"):
        ti.nystrom(ti.LinearOperator(lambda u: u @ C, like=torch.zeros(30)), rank=3,
                   generator=torch.Generator().manual_seed(0))
    precondition = ti.nystrom(ti.LinearOperator(lambda u: u @ C, like=torch.zeros(30)), rank=3,
                              generator=torch.Generator().manual_seed(0), damping=0.5)
    assert bool(torch.isfinite(precondition(torch.ones(2, 30))).all())


def test_cg_preconditioner_must_be_callable():
    with pytest.raises(TypeError, match=r"ti.cg: `preconditioner` must be None or a function V -> P⁻¹V"):
        ti.cg(lambda u: u, preconditioner=3)


# ---------------------------------------------------------------- fixed-iteration CG past convergence (defect 3)

def _cast(tree, dtype):
    return ti.tree.map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maxiter", [100, 400, pytest.param(2000, marks=pytest.mark.slow)])
def test_cg_fixed_iterations_stay_at_the_solution(digits_lr, G_test, dtype, maxiter):
    """tol=None runs all `maxiter` iterations; a converged right-hand side must stay at its solution."""
    train64 = ti.take(digits_lr.train, slice(0, 300))
    H = ti.hessian(digits_lr.objective(train64), digits_lr.params)                      # float64 reference
    params, train, V = _cast(digits_lr.params, dtype), _cast(train64, dtype), _cast(G_test, dtype)
    Hv = ti.hvp(ti.objective(digits_lr.loss, train, l2=digits_lr.l2), params)
    ihvp = ti.cg(Hv, tol=None, maxiter=maxiter)
    expected = torch.linalg.solve(H, ti.ravel(G_test, batch_ndim=1).T).T
    got = ti.ravel(ihvp(V), batch_ndim=1).double()
    # attainable accuracy of any solve in this dtype: about eps·cond(H) (round-off in V and in H v itself)
    evals = torch.linalg.eigvalsh(H)
    bound = 20 * torch.finfo(dtype).eps * float(evals[-1] / evals[0])
    err = (got - expected).norm(dim=1) / expected.norm(dim=1)
    assert bool(torch.isfinite(got).all()) and float(err.max()) < bound, (float(err.max()), bound)
    x, info = ihvp.solve(V)
    assert torch.equal(ti.ravel(x, batch_ndim=1), ti.ravel(ihvp(V), batch_ndim=1))
    assert bool(info.converged.all()) and int(info.iterations.max()) < maxiter       # stopped updating early
    true = ti.ravel(ti.tree.sub(Hv(x), V), batch_ndim=1).norm(dim=1) / ti.ravel(V, batch_ndim=1).norm(dim=1)
    torch.testing.assert_close(info.relative_residual, true, rtol=1e-3, atol=10 * torch.finfo(dtype).eps)


def test_cg_fixed_iterations_report_the_true_state():
    A = _spd(40, torch.Generator().manual_seed(3), cond=1e6)
    V = torch.randn(3, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x, info = ti.cg(lambda u: u @ A, tol=None, maxiter=5).solve(V)          # far too few iterations
    true = (x @ A - V).norm(dim=1) / V.norm(dim=1)
    torch.testing.assert_close(info.relative_residual, true, rtol=1e-10, atol=0)
    assert not bool(info.converged.any()) and info.status.tolist() == [ti.Status.MAX_ITERATIONS] * 3
    assert info.iterations.tolist() == [5, 5, 5]


def test_cg_solve_never_raises_and_unpacks():
    A = _spd(40, torch.Generator().manual_seed(3), cond=1e6)
    V = torch.randn(3, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    solution = ti.cg_solve(lambda u: u @ A, V, tol=1e-8, maxiter=5)
    x, info = solution
    assert isinstance(solution, ti.Solution) and solution.x is x and isinstance(info, ti.SolveInfo)
    assert not bool(info.converged.any())
    assert "ti.cg_solve: 3 of 3 right-hand sides did not converge in maxiter=5" in info.message
    with pytest.raises(ti.ConvergenceError) as err:
        ti.cg(lambda u: u @ A, tol=1e-8, maxiter=5)(V)
    assert err.value.info.status.tolist() == info.status.tolist()


def test_cg_solve_contract_for_other_code():
    """`getattr(ihvp, "solve", None)` gives `Solution(x, info)` for every solver factory."""
    A = _spd(6, torch.Generator().manual_seed(0))
    for ihvp in (ti.cg(lambda u: u @ A, tol=1e-10), ti.direct(A)):
        solve = getattr(ihvp, "solve", None)
        x, info = solve(torch.ones(2, 6))
        torch.testing.assert_close(x, torch.linalg.solve(A, torch.ones(6, 2)).T, rtol=1e-8, atol=1e-10)
        assert info.converged.tolist() == [True, True] and info.solver in ("ti.cg", "ti.direct")


# ---------------------------------------------------------------- LiSSA reports failure (defect 6)

def test_lissa_slow_divergence_just_below_the_threshold_raises(digits_lr, G_test):
    """scale = 0.498 λ_max: (I − A/scale) has eigenvalue −1.008, a slow blow-up the growth check misses (×2900 over depth 1000). One training example makes every mini-batch the
    same, so the recursion is deterministic."""
    one = ti.take(digits_lr.train, slice(0, 1))
    lam_max = float(torch.linalg.eigvalsh(ti.hessian(digits_lr.objective(one), digits_lr.params))[-1])
    make = lambda **kw: ti.lissa(digits_lr.loss, digits_lr.params, one, l2=digits_lr.l2, scale=0.498 * lam_max,  # noqa: E731
                                 depth=1000, **kw)
    V = ti.tree.map(lambda t: t[:2], G_test)
    with pytest.raises(ti.DivergenceError, match=r"ti.lissa: the recursion diverged at depth 1000 .*relative residual "
                                                 r".*no better than x = 0.*raise `scale`") as err:
        make()(V)
    assert err.value.info.status.tolist() == [ti.Status.DIVERGED] * 2
    assert bool((err.value.info.relative_residual > 10).all())
    with pytest.warns(UserWarning, match="ti.lissa: the recursion diverged"):
        make(on_failure="warn")(V)
    # just above the threshold it contracts and is reported converged
    x, info = ti.lissa_solve(digits_lr.loss, digits_lr.params, one, V, l2=digits_lr.l2, scale=0.6 * lam_max, depth=1000)
    assert bool(info.converged.all()) and bool((info.relative_residual < 1).all())


def test_lissa_residual_is_the_true_residual_and_unmet_tol_raises(digits_lr, digits_H, G_test):
    V = ti.tree.map(lambda t: t[:3], G_test)
    ihvp = ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2, damping=0.05, depth=20,
                    batch_size=64, tol=1e-12, generator=torch.Generator().manual_seed(0))
    x, info = ihvp.solve(V)
    A = digits_H + 0.05 * torch.eye(digits_H.shape[0])
    X, B = ti.ravel(x, batch_ndim=1), ti.ravel(V, batch_ndim=1)
    torch.testing.assert_close(info.relative_residual, (X @ A - B).norm(dim=1) / B.norm(dim=1), rtol=1e-8, atol=0)
    assert info.status.tolist() == [ti.Status.MAX_ITERATIONS] * 3 and info.iterations.tolist() == [20] * 3
    with pytest.raises(ti.ConvergenceError, match=r"ti.lissa: 3 of 3 right-hand sides did not meet tol=1e-12 .*"
                                                  r"within depth=20.*Raise `depth`"):
        ihvp(V)


# ---------------------------------------------------------------- direct: right-hand sides matched by structure (defect 7)

def _two_leaf_problem():
    """A dict of two parameters of different shapes, its dense SPD matrix, and a right-hand side."""
    g = torch.Generator().manual_seed(7)
    params = {"weight": torch.zeros(2, 3, dtype=torch.float64), "bias": torch.zeros(2, dtype=torch.float64)}
    A = _spd(8, g).double()
    v = ti.unravel(torch.randn(8, generator=g, dtype=torch.float64), params)
    return params, A, v


def test_direct_dict_in_another_insertion_order_is_matched_by_key():
    params, A, v = _two_leaf_problem()
    expected = ti.unravel(torch.linalg.solve(A, ti.ravel(v)), params)
    swapped = {"weight": v["weight"], "bias": v["bias"]} if list(v) == ["bias", "weight"] else {"bias": v["bias"], "weight": v["weight"]}
    assert list(swapped) != list(v)
    for ihvp in (ti.direct(A), ti.direct(ti.LinearOperator.from_matrix(A, like=params))):
        x = ihvp(swapped)
        for key in params:
            torch.testing.assert_close(x[key], expected[key], rtol=1e-12, atol=1e-14)


def test_direct_list_in_another_order_raises():
    params, A, v = _two_leaf_problem()
    like = [params["bias"], params["weight"]]                    # ravel order: bias, weight
    op = ti.LinearOperator.from_matrix(A, like=like)
    good = [v["bias"], v["weight"]]
    expected = torch.linalg.solve(A, ti.ravel(good))
    torch.testing.assert_close(ti.ravel(ti.direct(op)(good)), expected, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match=r"ti.direct: `v` leaves must have the parameter shapes \[\(2,\), \(2, 3\)\]"):
        ti.direct(op)([v["weight"], v["bias"]])                  # 8 numbers, but in another order
    with pytest.raises(ValueError, match=r"ti.direct: `v` must have the structure of the parameters"):
        ti.direct(op)((v["bias"], v["weight"]))                  # a tuple, not a list
    with pytest.raises(ValueError, match=r"ti.direct: `v` holds lists or tuples .*ti.LinearOperator.from_matrix"):
        ti.direct(A)([v["weight"], v["bias"]])                   # a bare matrix cannot check a list's order


def test_direct_of_an_operator_forms_its_matrix(digits_lr, digits_H, G_test):
    Hv = ti.hvp(digits_lr.objective(digits_lr.train), digits_lr.params)
    expected = torch.linalg.solve(digits_H + 1e-3 * torch.eye(650), ti.ravel(G_test, batch_ndim=1).T).T
    x = ti.direct(Hv, damping=1e-3)(G_test)
    torch.testing.assert_close(ti.ravel(x, batch_ndim=1), expected, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match=r"ti.direct: `v` must have the structure of the parameters"):
        ti.direct(Hv)({"w": G_test["weight"], "b": G_test["bias"]})


# ---------------------------------------------------------------- the operator type

def test_operator_is_stack_in_one_place_and_survives_wrapping(digits_lr, G_test):
    Hv = ti.hvp(digits_lr.objective(digits_lr.train), digits_lr.params)
    assert isinstance(Hv, ti.LinearOperator) and Hv.kind == "hessian" and Hv.symmetric and Hv.size == 650
    assert Hv.is_stack(G_test) and not Hv.is_stack(digits_lr.params)
    with pytest.raises(ValueError, match=r"ti.cg: `v` leaves must have the parameter shapes"):
        ti.cg(Hv)({"weight": torch.zeros(3, 10, 64), "bias": torch.zeros(2, 10)})
    # a plain wrapper loses nothing once wrapped with `like=`
    wrapped = ti.LinearOperator(lambda v: ti.tree.scale(2.0, Hv(v)), like=digits_lr.params)
    torch.testing.assert_close(ti.ravel(wrapped(G_test), batch_ndim=1), 2 * ti.ravel(Hv(G_test), batch_ndim=1))
    x = ti.cg(wrapped, tol=1e-10, maxiter=300)(G_test)
    y = ti.cg(Hv, tol=1e-10, maxiter=300)(G_test)
    torch.testing.assert_close(ti.ravel(x, batch_ndim=1), ti.ravel(y, batch_ndim=1) / 2, rtol=1e-7, atol=1e-10)


def test_operator_composition_against_dense():
    g = torch.Generator().manual_seed(8)
    A, B = _spd(5, g).double(), _spd(5, g).double()
    like = torch.zeros(5, dtype=torch.float64)
    a, b = ti.LinearOperator.from_matrix(A, psd=True), ti.LinearOperator(lambda u: B @ u, like=like, psd=True)
    V = torch.randn(3, 5, generator=g, dtype=torch.float64)
    for op, M in ((a + b, A + B), (2.5 * a, 2.5 * A), (a.damped(0.3), A + 0.3 * torch.eye(5, dtype=torch.float64))):
        torch.testing.assert_close(op(V), V @ M.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op(V[0]), M @ V[0], rtol=1e-12, atol=1e-12)
        assert op.psd is True
    assert (a + b).kind == "custom" and a.damped(0.3).kind == "dense" and (-1.0 * a).psd is False


def test_ggn_and_distributed_operators_carry_their_kind(digits_lr):
    GN = ti.ggn_vp(lambda p, b: digits_lr.apply(p, b[0]), digits_lr.params, ti.take(digits_lr.train, slice(0, 50)),
                   output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"))
    assert isinstance(GN, ti.LinearOperator) and GN.kind == "ggn" and GN.like is digits_lr.params


# ---------------------------------------------------------------- diagnostics (issue 15)

def test_eigenvalues_match_eigvalsh_of_the_dense_matrix(digits_lr, generator):
    apply, params = _mlp(generator)
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    R = ti.objective(loss, ti.take(digits_lr.train, slice(0, 50)))
    evals = torch.linalg.eigvalsh(ti.hessian(R, params))
    assert evals[0] < 0
    Hv = ti.hvp(R, params)
    exact = ti.eigenvalues(Hv, k=3, generator=torch.Generator().manual_seed(0), iterations=ti.tree.size(params))
    torch.testing.assert_close(exact.smallest, evals[:3], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(exact.largest, evals[-3:], rtol=1e-8, atol=1e-10)
    cheap = ti.eigenvalues(Hv, k=1, generator=torch.Generator().manual_seed(0))     # 40 products
    assert float(cheap.largest) <= float(evals[-1]) * (1 + 1e-10)                  # Ritz values lie inside
    assert float(cheap.largest) > float(evals[-1]) * (1 - 1e-6)


def test_cg_advice_fits_the_context(digits_lr):
    A = _spd(40, torch.Generator().manual_seed(3), cond=1e4)
    V = torch.randn(2, 40, generator=torch.Generator().manual_seed(4))
    ggn = ti.LinearOperator(lambda u: A @ u, like=torch.zeros(40), kind="ggn")
    with pytest.raises(ti.ConvergenceError) as err:
        ti.cg(ggn, tol=1e-8, maxiter=3)(V)
    assert "ti.ggn_vp" not in str(err.value)
    with pytest.raises(ti.ConvergenceError, match="ti.ggn_vp"):
        ti.cg(lambda u: u @ A, tol=1e-8, maxiter=3)(V)
    assert "can reach" not in str(err.value)                             # float64 reaches 1e-8
    A32 = A.to(torch.float32)
    with pytest.raises(ti.ConvergenceError, match=r"tol=1e-08 is below what float32 can reach.*solve in float64"):
        ti.cg(lambda u: u @ A32, tol=1e-8, maxiter=3)(V.to(torch.float32))


@pytest.mark.parametrize("transform", ["vmap", "compile"])
def test_cg_default_tol_under_a_transform_says_to_pass_tol_none(transform):
    A = _spd(6, torch.Generator().manual_seed(0))
    ihvp = ti.cg(lambda u: u @ A, damping=0.1)
    V = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    run = torch.func.vmap(ihvp) if transform == "vmap" else torch.compile(ihvp, fullgraph=True)
    with pytest.raises(Exception, match=r"ti.cg: under torch.func.vmap or torch.compile, `tol` must be None.*tol=None"):
        run(V)


def test_cg_says_when_tol_is_below_the_attainable_accuracy():
    """cond 1e8 in float64: the true residual stalls near eps·cond ≈ 1e-8 while the recursive one reaches 1e-13."""
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    A = Q @ torch.diag(torch.logspace(0, 8, 40)) @ Q.T
    V = torch.randn(2, 40, generator=g)
    with pytest.raises(ti.ConvergenceError, match=r"ti.cg: 2 of 2 right-hand sides cannot reach tol=1e-13 in float64: "
                                                  r"the recursive residual met it, but the true relative residual "
                                                  r"stalled at .*Raise `tol`, or `damping`") as err:
        ti.cg(lambda u: u @ A, tol=1e-13, maxiter=3000)(V)
    info = err.value.info
    assert "float64" not in str(err.value).split("damping")[-1] and int(info.iterations.max()) < 3000
    with pytest.warns(UserWarning, match="cannot reach"):
        x = ti.cg(lambda u: u @ A, tol=1e-13, maxiter=3000, on_failure="warn")(V)
    torch.testing.assert_close(info.relative_residual, (x @ A - V).norm(dim=1) / V.norm(dim=1), rtol=1e-10, atol=0)
    assert bool((info.relative_residual > 1e-13).all())


# ---------------------------------------------------------------- LiSSA preconditioned by EK-FAC, warm-started

def _one_example_ekfac(digits_lr):
    """One training example (every mini-batch is it: a deterministic recursion) and EK-FAC fitted on it with the
    exact output Hessian: for one linear layer and one example F̂ is the exact Hessian, so M = (F̂ + l2 I)⁻¹ = A⁻¹."""
    one = ti.take(digits_lr.train, slice(0, 1))
    curv = ti.ekfac(digits_lr.loss, digits_lr.params, one, predict=lambda p, b: digits_lr.apply(p, b[0]),
                    output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), fisher="ggn",
                    damping=digits_lr.l2)
    A = ti.hessian(digits_lr.objective(one), digits_lr.params)          # includes l2 I
    return one, curv, A


def test_lissa_preconditioned_by_ekfac_reaches_the_direct_solve_in_a_few_steps(digits_lr, G_test):
    one, curv, A = _one_example_ekfac(digits_lr)
    V = ti.tree.map(lambda t: t[:3], G_test)
    expected = ti.ravel(ti.direct(A)(V), batch_ndim=1)
    run = lambda **kw: ti.lissa_solve(digits_lr.loss, digits_lr.params, one, V, l2=digits_lr.l2, depth=60,  # noqa: E731
                                      tol=1e-10, **kw)
    x, info = run(preconditioner=curv)
    assert bool(info.converged.all()), info.message
    assert int(info.iterations.max()) <= 60 and float(info.relative_residual.max()) < 1e-8
    torch.testing.assert_close(ti.ravel(x, batch_ndim=1), expected, rtol=1e-7, atol=1e-10)
    assert info.context["preconditioned"]
    # without it the same depth is far from the solve: κ(H₁ + l2 I) is in the thousands
    _, plain = run()
    assert plain.status.tolist() == [ti.Status.MAX_ITERATIONS] * 3 and float(plain.relative_residual.min()) > 1e-2


def test_lissa_warm_start_and_iterations_per_right_hand_side(digits_lr, G_test):
    """x0 = the exact solution for the first two right-hand sides, 0 for the third: the warm ones stop at the first
    check (10 steps), the cold one runs on, and every one ends at the direct solve."""
    one, _, A = _one_example_ekfac(digits_lr)
    V = ti.tree.map(lambda t: t[:3], G_test)
    exact = ti.direct(A, damping=0.5)
    mask = torch.tensor([1.0, 1.0, 0.0])
    warm = lambda U: ti.tree.map(lambda t: t * mask.view(-1, *[1] * (t.dim() - 1)), exact(U))  # noqa: E731
    lam = torch.linalg.eigvalsh(A)
    x, info = ti.lissa_solve(digits_lr.loss, digits_lr.params, one, V, l2=digits_lr.l2, damping=0.5,
                             scale=float(lam[-1]), depth=3000, tol=1e-12, x0=warm)
    assert bool(info.converged.all()), info.message
    assert info.iterations.tolist()[:2] == [10, 10] and int(info.iterations[2]) >= 30
    torch.testing.assert_close(ti.ravel(x, batch_ndim=1), ti.ravel(exact(V), batch_ndim=1), rtol=1e-8, atol=1e-12)


def test_lissa_bad_preconditioner_or_warm_start(digits_lr):
    with pytest.raises(TypeError, match=r"ti.lissa: `preconditioner` must be None or a function"):
        ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, preconditioner="ekfac")
    with pytest.raises(TypeError, match=r"ti.lissa: `x0` must be None or a function V -> X0 on stacks.*got dict"):
        ti.lissa(digits_lr.loss, digits_lr.params, digits_lr.train, x0=dict(digits_lr.params))
