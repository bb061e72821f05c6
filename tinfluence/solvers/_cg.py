"""Conjugate gradients on many right-hand sides at once, each with its own step sizes."""

from __future__ import annotations

from typing import Callable, NamedTuple

import optree
import torch

from ..core import checks
from ..core import tree as tr
from ..core.operator import as_operator
from ..core.tree import PyTree
from ._result import InverseOperator, Solution, SolveInfo, Status, check_on_failure

__all__ = ["cg", "cg_solve"]


class _State(NamedTuple):
    """CG iterate for k right-hand sides: pytrees with leaves `[k, ...]`, per-RHS tensors `[k]`."""

    x: object
    r: object
    p: object
    rs: torch.Tensor          # ‖r‖², [k]
    rz: torch.Tensor          # rᵀ P⁻¹ r (= rs without a preconditioner), [k]
    active: torch.Tensor      # still updating, [k] bool
    iterations: torch.Tensor  # updates made, [k]
    curvature: torch.Tensor   # first pᵀ(H + λI)p / ‖p‖² <= 0 met, else NaN, [k]
    broke: torch.Tensor       # met that breakdown, [k] bool


def _per_rhs(s: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A per-right-hand-side tensor `[k]` shaped to broadcast against a leaf `[k, ...]`."""
    return s.reshape(s.shape + (1,) * (leaf.dim() - 1))


def _axpy(x, alpha: torch.Tensor, y):
    """X + alpha[k] · y for stacks."""
    return tr.map(lambda a, b: a + _per_rhs(alpha, b) * b, x, y)


def _dots(x, y) -> torch.Tensor:
    """Per-right-hand-side inner products of two stacks, `[k]`."""
    leaves = optree.tree_leaves(tr.map(lambda a, b: (a * b).reshape(a.shape[0], -1).sum(-1), x, y), namespace="")
    return torch.stack(leaves).sum(0)


def _where(mask: torch.Tensor, new, old):
    """Per right-hand side: `new` where `mask`, else `old` (stacks)."""
    return tr.map(lambda a, b: torch.where(_per_rhs(mask, a), a, b), new, old)


def _cg_step(apply, precondition, s: _State, stop: torch.Tensor) -> _State:
    """One (preconditioned) CG iteration; pure, no host synchronization.

    Masked: a right-hand side updates only while it is active, and it stops for good once
    its recursive residual is at or below `stop` (its tolerance, or round-off), at
    negative curvature, or when a step size is not finite. A converged right-hand side
    therefore stays at its solution however many iterations follow.
    """
    Ap = apply(s.p)
    pAp = _dots(s.p, Ap)
    broke = s.active & ~(pAp > 0)
    step = s.active & ~broke
    alpha = s.rz / torch.where(step, pAp, torch.ones_like(pAp))
    step = step & torch.isfinite(alpha)
    alpha = torch.where(step, alpha, torch.zeros_like(alpha))
    x = _axpy(s.x, alpha, s.p)
    r = _axpy(s.r, -alpha, Ap)
    rs = torch.where(step, _dots(r, r), s.rs)
    z = r if precondition is None else precondition(r)
    rz = rs if precondition is None else torch.where(step, _dots(r, z), s.rz)
    beta = rz / torch.where(step, s.rz, torch.ones_like(s.rz))
    moving = step & torch.isfinite(beta) & (rs > stop)
    p = _where(moving, _axpy(z, torch.where(moving, beta, torch.zeros_like(beta)), s.p), s.p)
    curvature = torch.where(broke, pAp / _dots(s.p, s.p), s.curvature)
    return _State(x, r, p, rs, rz, moving, s.iterations + step.to(s.iterations.dtype), curvature, s.broke | broke)


def _check_options(where, damping, tol, atol, maxiter, check_every, on_failure):
    checks.number(where, "damping", damping, minimum=0.0)
    if tol is not None:
        checks.number(where, "tol", tol, minimum=0.0)
    checks.number(where, "atol", atol, minimum=0.0)
    checks.integer(where, "maxiter", maxiter, minimum=1)
    checks.integer(where, "check_every", check_every, minimum=1, none=True)
    check_on_failure(where, on_failure)


def _check_preconditioner(where, preconditioner):
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError(f"{where}: `preconditioner` must be None or a function V -> P⁻¹V on stacks, e.g. "
                        f"ti.nystrom(operator, rank=50, generator=g); got {type(preconditioner).__name__}.")


def under_transform(v: PyTree) -> bool:
    """Whether `v` is being traced by `torch.func.vmap` or `torch.compile` (no host sync possible)."""
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._functorch.is_batchedtensor(leaf) for leaf in optree.tree_leaves(v, namespace="")
               if isinstance(leaf, torch.Tensor))


def _check_traceable(where: str, tol, v) -> None:
    """A tolerance needs data-dependent stopping, which vmap and torch.compile cannot trace."""
    if tol is not None and under_transform(v):
        raise ValueError(
            f"{where}: under torch.func.vmap or torch.compile, `tol` must be None: stopping at a tolerance is "
            f"data-dependent control flow (got tol={tol:g}). Pass ti.cg(..., tol=None, maxiter=N) to run exactly N "
            "iterations (a converged right-hand side stays at its solution); check convergence outside the "
            "transform with ihvp.solve(v).info.")


def _run(op, v, *, damping, tol, atol, maxiter, check_every, preconditioner, where):
    """The CG driver: returns (X, state, V, apply, stacked) on stacks."""
    stacked = op._is_stack(v, where)
    V = v if stacked else tr.map(lambda leaf: leaf.unsqueeze(0), v)
    base = op.on_stacks(stacked)
    apply = (lambda P: tr.add_scaled(base(P), damping, P)) if damping else base
    norms_sq = _dots(V, V)                                               # [k]
    k = norms_sq.shape[0]
    eps = torch.finfo(norms_sq.dtype).eps
    stop = eps**2 * norms_sq                                             # recursive residual at round-off
    if tol is not None:
        stop = torch.maximum(stop, torch.clamp(tol**2 * norms_sq, min=atol**2))
    z = V if preconditioner is None else preconditioner(V)
    state = _State(
        x=tr.zeros_like(V), r=V, p=z, rs=norms_sq, rz=norms_sq if preconditioner is None else _dots(V, z),
        active=norms_sq > stop, iterations=torch.zeros(k, dtype=torch.long, device=norms_sq.device),
        curvature=torch.full_like(norms_sq, float("nan")), broke=torch.zeros_like(norms_sq, dtype=torch.bool))
    if check_every is None:                                              # a host sync is free on CPU
        check_every = 1 if norms_sq.device.type == "cpu" else 10
    for it in range(maxiter):
        state = _cg_step(apply, preconditioner, state, stop)
        if tol is not None and (it + 1) % check_every == 0 and not bool(state.active.any()):
            break
    return state, V, apply, stacked, stop


def true_residual(apply: Callable, X: PyTree, V: PyTree) -> torch.Tensor:
    """‖(H + λI)x − v‖ / ‖v‖ per right-hand side, `[k]` (0 for v = 0 solved by x = 0): one operator call."""
    R = tr.sub(apply(X), V)
    v_sq = _dots(V, V)
    return torch.sqrt(_dots(R, R) / torch.where(v_sq > 0, v_sq, torch.ones_like(v_sq)))


def judged_tol(tol: float | None, atol: float, dtype: torch.dtype) -> float:
    """The relative residual a status is judged against: `tol`, or √eps of the dtype for fixed iterations."""
    return float(torch.finfo(dtype).eps ** 0.5) if tol is None else tol


def _solve(op, v, *, damping, tol, atol, maxiter, check_every, preconditioner, where) -> Solution:
    state, V, apply, stacked, stop = _run(op, v, damping=damping, tol=tol, atol=atol, maxiter=maxiter,
                                          check_every=check_every, preconditioner=preconditioner, where=where)
    residual = true_residual(apply, state.x, V)
    judged = judged_tol(tol, atol, residual.dtype)
    v_norm = torch.sqrt(_dots(V, V))
    met = (residual <= judged) | (residual * v_norm <= atol)
    status = torch.where(state.broke, Status.BREAKDOWN, torch.where(met, Status.CONVERGED, Status.MAX_ITERATIONS))
    # the recursive residual met tol but the true one did not: tol is below the attainable accuracy
    stalled = ~met & ~state.broke & (state.rs <= stop) if tol is not None else torch.zeros_like(met)
    info = SolveInfo(status.to(torch.long), state.iterations, residual, state.curvature, solver=where, tol=judged,
                     context={"maxiter": maxiter, "damping": damping, "kind": op.kind, "dtype": residual.dtype,
                              "stalled": stalled})
    if stacked:
        return Solution(state.x, info)
    return Solution(tr.map(lambda leaf: leaf[0], state.x), info.single())


def cg_solve(operator: Callable, v: PyTree, *, damping: float = 0.0, tol: float | None = 1e-6, atol: float = 0.0,
             maxiter: int = 100, check_every: int | None = None, preconditioner: Callable | None = None) -> Solution:
    """`ti.cg(operator, ...).solve(v)`: returns `Solution(x, info)` and never raises for a numerical failure.

    Same algorithm and options as `ti.cg`; matches `scipy.sparse.linalg.cg` iterate for
    iterate (started from x₀ = 0). Unpacks as `x, info = ti.cg_solve(...)`.

    Cost: as `ti.cg`: one operator call per iteration on the whole stack, plus one for
    the true residual.

    Args:
      operator: `u -> H u`, as `ti.cg`.
      v: one vector shaped like the operator's, or a stack of k (leading axis k).
      damping: λ ≥ 0, as `ti.cg`.
      tol: relative residual per right-hand side, or None for exactly `maxiter` iterations.
      atol: absolute residual floor.
      maxiter: iterations, each one operator call.
      check_every: iterations between checks for "all done", as `ti.cg`.
      preconditioner: `V -> P⁻¹ V` on stacks, as `ti.cg`.

    Returns:
      `Solution(x, info)`: x like `v`; `info` a `ti.SolveInfo` (fields `[k]`, 0-d for one
      vector): status, iterations per right-hand side, true relative residual.

    Raises:
      ValueError: invalid options, or `v` shaped neither like the operator's vectors nor a stack of them.
      TypeError: `v` is a pytree and the operator is a plain function on tensors.

    Examples:
      >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> x, info = ti.cg_solve(lambda u: u @ A.T, torch.ones(3, 2, dtype=torch.float64), tol=1e-10)
      >>> info.iterations.tolist(), bool(info.converged.all())
      ([2, 2, 2], True)
    """
    return _cg(operator, damping=damping, tol=tol, atol=atol, maxiter=maxiter, check_every=check_every,
              preconditioner=preconditioner, where="ti.cg_solve").solve(v)


def _cg(operator: Callable, *, damping: float = 0.0, tol: float | None = 1e-6, atol: float = 0.0, maxiter: int = 100,
       check_every: int | None = None, on_failure: str = "raise", preconditioner: Callable | None = None,
       where: str = "ti.cg") -> InverseOperator:
    """`ti.cg` for the public call `where` (the name its errors and diagnostics give)."""
    _check_options(where, damping, tol, atol, maxiter, check_every, on_failure)
    _check_preconditioner(where, preconditioner)
    op = as_operator(operator, where=where)
    options = dict(damping=damping, tol=tol, atol=atol, maxiter=maxiter, check_every=check_every,
                   preconditioner=preconditioner, where=where)

    def solve(v) -> Solution:
        _check_traceable(where, tol, v)
        return _solve(op, v, **options)

    def apply(v):
        state, _, _, stacked, _ = _run(op, v, **options)
        return state.x if stacked else tr.map(lambda leaf: leaf[0], state.x)

    return InverseOperator(solve, on_failure=on_failure, apply=apply if tol is None else None, solver=where)


def cg(operator: Callable, *, damping: float = 0.0, tol: float | None = 1e-6, atol: float = 0.0, maxiter: int = 100,
       check_every: int | None = None, on_failure: str = "raise", preconditioner: Callable | None = None) -> InverseOperator:
    """Returns `ihvp`, which applies (H + λI)⁻¹ by conjugate gradients.

    Solves (H + λI) x = v for all right-hand sides at once: `v` may carry a leading axis
    of k vectors, each with its own step sizes, so k test points cost ONE operator call
    per iteration, not k. A right-hand side stops once ‖r‖ ≤ max(tol·‖v‖, atol)
    (recursive residual), at round-off, at negative curvature or at a non-finite step;
    the loop ends when all have stopped or at `maxiter`. The status is judged on the TRUE
    residual ‖(H + λI)x − v‖ / ‖v‖ (one more operator call). A plain function on tensors
    takes a 1-D `v` as one vector and a 2-D `v` as a stack.

    Args:
      operator: `u -> H u`, a `ti.LinearOperator` (`ti.hvp`, `ti.ggn_vp`, ...) or a plain
        function on tensors; it must accept a stack, and H + λI must be symmetric positive definite.
      damping: λ ≥ 0, added to the diagonal.
      tol: relative residual per right-hand side. `None` runs exactly `maxiter` iterations
        with no data-dependent branch (safe under `torch.func.vmap` and
        `torch.compile(fullgraph=True)`); `ihvp.solve(v)` then judges against √eps.
      atol: absolute residual floor (for right-hand sides near zero).
      maxiter: iterations, each one operator call.
      check_every: iterations between "all done?" checks (one host sync each); `None`: every
        iteration on CPU, every 10th on an accelerator (per-vector stopping stays exact).
      on_failure: "raise" a `ConvergenceError`, or "warn" and return the iterate.
      preconditioner: `V -> P⁻¹ V` on stacks, symmetric positive definite:
        `ti.nystrom(operator, rank=r, generator=g, damping=λ)` or `curv.preconditioner`
        from `ti.ekfac` (which pays where is in docs/design.md); the iteration still stops
        on the unpreconditioned ‖r‖.

    Returns:
      `ihvp`: `ihvp(v) -> x` (structure, shapes, dtype and device of `v`), and
      `ihvp.solve(v) -> ti.Solution(x, info)`, which never raises for numerical failure.

    Raises:
      ValueError: at construction, a negative damping, tol or atol, maxiter or check_every
        < 1, an unknown on_failure; at call time, a `tol` under vmap or torch.compile.
      ConvergenceError: from `ihvp(v)`, if a right-hand side misses `tol` within `maxiter`
        or meets pᵀ(H + λI)p ≤ 0; `err.info` is the `SolveInfo`.

    Cost: per iteration one operator call on the k-stack (for `ti.hvp` / `ti.ggn_vp` one
    pass over the data), one preconditioner call and O(k·P) vector work; about
    √κ · log(1/tol) iterations, κ the (preconditioned) condition number. Memory O(k·P).

    Examples:
      >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> ihvp = ti.cg(lambda u: u @ A.T, tol=1e-12)
      >>> x = ihvp(torch.tensor([1., 2.], dtype=torch.float64))
      >>> torch.allclose(A @ x, torch.tensor([1., 2.], dtype=torch.float64))
      True

    References:
      Hestenes & Stiefel, Methods of conjugate gradients for solving linear systems, 1952.
      Frangella, Tropp & Udell, Randomized Nyström Preconditioning, 2023 (`ti.nystrom`).
    """
    return _cg(operator, damping=damping, tol=tol, atol=atol, maxiter=maxiter, check_every=check_every,
               on_failure=on_failure, preconditioner=preconditioner, where="ti.cg")
