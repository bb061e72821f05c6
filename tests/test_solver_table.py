"""Conformance table for the inverse-curvature solvers (in the style of lineax's solver table).

Every solver (direct, cg, cg with a Nyström preconditioner, lissa, and the K-FAC family's `ihvp`
where its factorisation is exact) × one vector / a stack ×
float32 / float64 × operator kind (ti.hvp, ti.ggn_vp, a dense-matrix operator, a plain
function wrapped with ti.LinearOperator) is checked against `torch.linalg.solve` of the
damped dense matrix, built independently by `torch.autograd.functional.hessian` in float64.

Tolerance (the same for every row, from the row's own report): for A x* = v, any x obeys
‖x − x*‖/‖x*‖ ≤ κ(A)·‖A x − v‖/‖v‖, so a solve whose reported relative residual is ρ must be
within κ·(ρ + c·eps) of the reference, where c·eps covers the rounding of the operator in the
row's dtype (its matrix differs from the float64 one by O(eps) relatively). The report is checked
too: the status is converged, and `relative_residual` equals ‖(H + λI)x − v‖/‖v‖ recomputed here
in float64 to within κ·c·eps (the rounding of a residual computed in the row's dtype).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp

import tinfluence as ti

DAMPING = 0.1
N, D, C = 40, 5, 3
KINDS = ["hvp", "ggn", "dense", "wrapped"]
SOLVERS = ["direct", "cg", "cg_nystrom"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-11}
SLACK = 50        # c above


def _loss(apply):
    return lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = torch.randint(C, (N,), generator=g)
    model = torch.nn.Linear(D, C).double()
    apply, params0 = ti.functionalize(model)
    loss = _loss(apply)
    params = ti.minimize(ti.objective(loss, (x, y), l2=1e-2), ti.tree.zeros_like(params0), gtol=1e-12, newton_steps=5)
    return apply, params, (x, y)


def _reference(loss, params, train, l2):
    """(H + λI) in float64, by torch.autograd.functional.hessian on the raveled parameters."""
    flat = ti.ravel(params)
    H = torch.autograd.functional.hessian(lambda f: ti.objective(loss, train, l2=l2)(ti.unravel(f, params)), flat)
    return H + DAMPING * torch.eye(flat.numel(), dtype=flat.dtype)


def _cast(tree, dtype):
    return ti.tree.map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)


def _operator(kind, apply, params, train, A64):
    loss = _loss(apply)
    R = ti.objective(loss, train, l2=1e-2)
    if kind == "hvp":
        return ti.hvp(R, params)
    if kind == "ggn":                                   # equals the Hessian: the model is linear in θ
        return ti.ggn_vp(lambda p, b: apply(p, b[0]), params, train,
                         output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), l2=1e-2)
    if kind == "dense":
        H = (A64 - DAMPING * torch.eye(A64.shape[0], dtype=A64.dtype)).to(ti.ravel(params).dtype)
        return ti.LinearOperator.from_matrix(H, like=params)
    return ti.LinearOperator(lambda v: jvp(grad(R), (params,), (v,))[1], like=params)   # a plain function, wrapped


def _solver(name, op, dtype):
    if name == "direct":
        return ti.direct(op, damping=DAMPING)
    preconditioner = None
    if name == "cg_nystrom":
        preconditioner = ti.nystrom(op, rank=6, generator=torch.Generator().manual_seed(1), damping=DAMPING)
    return ti.cg(op, damping=DAMPING, tol=TOL[dtype], maxiter=200, preconditioner=preconditioner)


def _rhs(params, stacked, dtype):
    g = torch.Generator().manual_seed(2)
    V = ti.tree.random_like(params, generator=g, batch=(4,) if stacked else ())
    return _cast(V, dtype)


def _check(x, info, V, A64, dtype, stacked, tol):
    """The solution against torch.linalg.solve, and the report against a float64 residual."""
    X, B = ti.ravel(x, batch_ndim=int(stacked)).double(), ti.ravel(V, batch_ndim=int(stacked)).double()
    X, B = X.reshape(-1, A64.shape[0]), B.reshape(-1, A64.shape[0])
    expected = torch.linalg.solve(A64, B.T).T
    evals = torch.linalg.eigvalsh(A64)
    kappa, eps = float(evals[-1] / evals[0]), torch.finfo(dtype).eps
    true = (X @ A64 - B).norm(dim=1) / B.norm(dim=1)
    reported = info.relative_residual.reshape(-1).double()
    assert info.status.shape == ((4,) if stacked else ())
    assert bool(info.converged.all()), info.message
    torch.testing.assert_close(reported, true, rtol=0, atol=SLACK * kappa * eps)
    err = (X - expected).norm(dim=1) / expected.norm(dim=1)
    bound = kappa * (reported + SLACK * eps)
    assert bool((err <= bound).all()), (err, bound)
    assert bool((reported <= max(tol, SLACK * eps)).all())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stack"])
def test_solver_table(problem, kind, solver, dtype, stacked):
    apply, params64, train64 = problem
    A64 = _reference(_loss(apply), params64, train64, 1e-2)
    params, train = _cast(params64, dtype), _cast(train64, dtype)
    ihvp = _solver(solver, _operator(kind, apply, params, train, A64), dtype)
    V = _rhs(params, stacked, dtype)
    x, info = ihvp.solve(V)
    assert ti.ravel(x, batch_ndim=int(stacked)).dtype == dtype
    _check(x, info, V, A64, dtype, stacked, TOL[dtype])
    torch.testing.assert_close(ihvp(V), x, rtol=0, atol=0)            # the policy path returns the same x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stack"])
def test_lissa_table(problem, dtype, stacked):
    """One training example makes LiSSA deterministic; it then converges to (H₁ + λI)⁻¹ v (damping 1 makes
    the contraction fast: about 0.6 per step)."""
    apply, params64, train64 = problem
    one64 = ti.take(train64, slice(0, 1))
    A64 = _reference(_loss(apply), params64, one64, 1e-2)
    params, one = _cast(params64, dtype), _cast(one64, dtype)
    A64 = A64 + (1.0 - DAMPING) * torch.eye(A64.shape[0], dtype=A64.dtype)
    ihvp = ti.lissa(_loss(apply), params, one, l2=1e-2, damping=1.0, depth=200, batch_size=1)
    V = _rhs(params, stacked, dtype)
    x, info = ihvp.solve(V)
    _check(x, info, V, A64, dtype, stacked, TOL[dtype])


@pytest.mark.slow
@pytest.mark.parametrize("dtype, stacked", [(torch.float64, False), (torch.float32, True)], ids=["f64-single", "f32-stack"])
def test_compiled_hvp_cg_table(problem, dtype, stacked):
    """ti.cg over ti.hvp(compile=True) (the per-chunk kernel compiled with fullgraph), against the same reference."""
    apply, params64, train64 = problem
    A64 = _reference(_loss(apply), params64, train64, 1e-2)
    params, train = _cast(params64, dtype), _cast(train64, dtype)
    op = ti.hvp(ti.objective(_loss(apply), train, l2=1e-2), params, compile=True)
    V = _rhs(params, stacked, dtype)
    x, info = ti.cg(op, damping=DAMPING, tol=TOL[dtype], maxiter=200).solve(V)
    _check(x, info, V, A64, dtype, stacked, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stack"])
def test_preconditioned_lissa_table(problem, dtype, stacked):
    """LiSSA on one example with a preconditioner M (the inverse of A's diagonal, symmetric positive definite) and a
    warm start: the recursion on M A x = M v still converges to A⁻¹ v."""
    apply, params64, train64 = problem
    one64 = ti.take(train64, slice(0, 1))
    A64 = _reference(_loss(apply), params64, one64, 1e-2) + (1.0 - DAMPING) * torch.eye(params64["weight"].numel() + 3)
    params, one = _cast(params64, dtype), _cast(one64, dtype)
    M = ti.LinearOperator.from_matrix(torch.diag(1 / torch.diagonal(A64)).to(dtype), like=params)
    warm = lambda V: ti.tree.scale(0.5, M(V))                           # noqa: E731
    ihvp = ti.lissa(_loss(apply), params, one, l2=1e-2, damping=1.0, depth=400, batch_size=1, preconditioner=M, x0=warm)
    V = _rhs(params, stacked, dtype)
    x, info = ihvp.solve(V)
    _check(x, info, V, A64, dtype, stacked, TOL[dtype])


@pytest.mark.parametrize("fit", ["kfac", "ekfac"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stacked", [False, True], ids=["single", "stack"])
def test_kronecker_table(problem, fit, dtype, stacked):
    """The K-FAC family's `ihvp` on one training example, where the factorisation is exact: for one
    linear layer (bias folded in) and one example, the Gauss-Newton matrix (here the Hessian of the
    example's loss: the model is linear in θ) is S ⊗ A exactly, and EK-FAC's corrected eigenvalues
    are its own; so `ihvp` must solve (H₁ + λI) x = v against the same float64 reference."""
    apply, params64, train64 = problem
    one64 = ti.take(train64, slice(0, 1))
    A64 = _reference(_loss(apply), params64, one64, 0.0)
    params, one = _cast(params64, dtype), _cast(one64, dtype)
    curvature = getattr(ti, fit)(_loss(apply), params, one, predict=lambda p, b: apply(p, b[0]),
                                 output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), fisher="ggn",
                                 damping=DAMPING)
    V = _rhs(params, stacked, dtype)
    x, info = curvature.ihvp.solve(V)
    assert ti.ravel(x, batch_ndim=int(stacked)).dtype == dtype
    _check(x, info, V, A64, dtype, stacked, TOL[dtype])
