"""Conjugate gradients on many right-hand sides at once, each with its own step sizes."""

from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import optree
import torch

from ..core import tree as tr
from ..core.errors import ConvergenceError, check_positive

__all__ = ["cg", "cg_solve", "SolveInfo", "CGState"]


class SolveInfo(NamedTuple):
    """Per-right-hand-side diagnostics of an iterative solve; each field is a tensor `[k]`
    (0-d for a single right-hand side).

    iterations: iterations this right-hand side ran (operator calls it took part in).
    residual: final relative residual ‖r‖ / ‖v‖ (CG's recursively updated residual).
    converged: whether it met the tolerance without breakdown.
    """

    iterations: torch.Tensor
    residual: torch.Tensor
    converged: torch.Tensor


class CGState(NamedTuple):
    """CG iterate for k right-hand sides: pytrees with leaves `[k, ...]`, per-RHS tensors `[k]`."""

    x: object
    r: object
    p: object
    rs: torch.Tensor          # ‖r‖², [k]
    rz: torch.Tensor          # rᵀ P⁻¹ r (= rs without a preconditioner), [k]
    active: torch.Tensor      # still iterating, [k] bool
    iterations: torch.Tensor  # [k]
    curvature: torch.Tensor   # first pᵀ(H + λI)p <= 0 met, else +inf, [k]
    broke_at: torch.Tensor    # iteration of that breakdown, else -1, [k]


def _per_rhs(s: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    """A per-right-hand-side tensor `[k]` shaped to broadcast against a leaf `[k, ...]`."""
    return s.reshape(s.shape + (1,) * (leaf.dim() - 1))


def _axpy(x, alpha: torch.Tensor, y):
    """x + alpha[k] · y for stacks."""
    return tr.map(lambda a, b: a + _per_rhs(alpha, b) * b, x, y)


def _dots(x, y) -> torch.Tensor:
    """Per-right-hand-side inner products of two stacks, `[k]`."""
    leaves = optree.tree_leaves(tr.map(lambda a, b: (a * b).reshape(a.shape[0], -1).sum(-1), x, y), namespace="")
    return torch.stack(leaves).sum(0)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a / b where b != 0, else 0 (a right-hand side whose residual is exactly zero stays put)."""
    nonzero = b != 0
    return torch.where(nonzero, a / torch.where(nonzero, b, torch.ones_like(b)), torch.zeros_like(a))


def _cg_step(apply, precondition, state: CGState, bound: torch.Tensor | None, it: int) -> CGState:
    """One (preconditioned) CG iteration for every active right-hand side; pure, no host synchronization."""
    Ap = apply(state.p)
    pAp = _dots(state.p, Ap)
    moving = state.active & (state.rs > 0)
    broke = moving & (pAp <= 0) & (state.broke_at < 0)
    active = state.active & ~broke
    alpha = torch.where(active, _safe_div(state.rz, pAp), torch.zeros_like(pAp))
    x = _axpy(state.x, alpha, state.p)
    r = _axpy(state.r, -alpha, Ap)
    rs = torch.where(active, _dots(r, r), state.rs)
    z = r if precondition is None else precondition(r)
    rz = rs if precondition is None else torch.where(active, _dots(r, z), state.rz)
    beta = _safe_div(rz, state.rz)
    p = tr.map(lambda zi, pi: torch.where(_per_rhs(active, pi), zi + _per_rhs(beta, pi) * pi, pi), z, state.p)
    iterations = state.iterations + active.to(state.iterations.dtype)
    if bound is not None:
        active = active & (rs > bound)
    return CGState(x, r, p, rs, rz, active, iterations,
                   torch.where(broke, pAp, state.curvature),
                   torch.where(broke, torch.full_like(state.broke_at, it), state.broke_at))


def _check_options(where, damping, tol, atol, maxiter, check_every, on_failure):
    check_positive(where, "damping", damping, allow_zero=True)
    if tol is not None:
        check_positive(where, "tol", tol, allow_zero=True)
    check_positive(where, "atol", atol, allow_zero=True)
    if not (isinstance(maxiter, int) and maxiter >= 1):
        raise ValueError(f"{where}: `maxiter` must be an int >= 1; got {maxiter!r}.")
    if check_every is not None and not (isinstance(check_every, int) and check_every >= 1):
        raise ValueError(f"{where}: `check_every` must be None or an int >= 1; got {check_every!r}.")
    if on_failure not in ("raise", "warn"):
        raise ValueError(f'{where}: `on_failure` must be "raise" or "warn"; got {on_failure!r}.')


def _check_preconditioner(where, preconditioner):
    if preconditioner is not None and not callable(preconditioner):
        raise TypeError(f"{where}: `preconditioner` must be None or a function V -> P⁻¹V on stacks, e.g. "
                        f"ti.nystrom(operator, rank=50, generator=g); got {type(preconditioner).__name__}.")


def _is_stack(v, like, operator) -> bool:
    """Whether `v` is a stack of k vectors shaped like `like` (default: the operator's parameters)."""
    if like is None and isinstance(v, torch.Tensor) and v.dim() in (1, 2):
        return v.dim() == 2
    like = like if like is not None else _operator_params(operator)
    if like is None:
        raise TypeError(
            "ti.cg: cannot tell whether `v` is one vector or a stack of k vectors: pass `like=params` to ti.cg / "
            "ti.cg_solve (the parameters the operator acts on), or use an operator from ti.hvp or ti.ggn_vp.")
    try:
        return tr.has_leading_axis(v, like)
    except ValueError as err:
        raise ValueError(f"ti.cg: {err}") from None


def _operator_params(operator):
    """The parameters an operator from ti.hvp / ti.ggn_vp was built at, or None."""
    return getattr(operator, "params", None)


def _run(operator, v, *, damping, tol, atol, maxiter, check_every, like, preconditioner):
    """The CG driver: returns (x, info, state) with the final state for breakdown reports."""
    stacked = _is_stack(v, like, operator)
    V = v if stacked else tr.map(lambda leaf: leaf.unsqueeze(0), v)
    op = operator if stacked else (lambda P: tr.map(lambda leaf: leaf.unsqueeze(0), operator(tr.map(lambda leaf: leaf[0], P))))
    apply = (lambda P: tr.add_scaled(op(P), damping, P)) if damping else op
    norms_sq = _dots(V, V)                                               # [k]
    k = norms_sq.shape[0]
    bound = None if tol is None else torch.clamp(tol**2 * norms_sq, min=atol**2)
    z = V if preconditioner is None else preconditioner(V)
    state = CGState(
        x=tr.zeros_like(V), r=V, p=z, rs=norms_sq, rz=norms_sq if preconditioner is None else _dots(V, z),
        active=norms_sq > (0 if bound is None else bound),
        iterations=torch.zeros(k, dtype=torch.long, device=norms_sq.device),
        curvature=torch.full_like(norms_sq, float("inf")),
        broke_at=torch.full((k,), -1, dtype=torch.long, device=norms_sq.device))
    if check_every is None:                                              # a host sync is free on CPU
        check_every = 1 if norms_sq.device.type == "cpu" else 10
    for it in range(maxiter):
        state = _cg_step(apply, preconditioner, state, bound, it)
        if tol is not None and (it + 1) % check_every == 0 and not bool(state.active.any()):
            break
    residual = torch.sqrt(_safe_div(state.rs, norms_sq))
    ok = state.broke_at < 0
    converged = ok if bound is None else ok & (state.rs <= bound)
    info = SolveInfo(state.iterations, residual, converged)
    x = state.x
    if not stacked:
        x, info = tr.map(lambda leaf: leaf[0], x), SolveInfo(*(t[0] for t in info))
    return x, info, state


def cg_solve(operator: Callable, v, *, damping: float = 0.0, tol: float | None = 1e-6, atol: float = 0.0,
             maxiter: int = 100, check_every: int | None = None, like=None, preconditioner: Callable | None = None):
    """Returns `(x, info)`: x ≈ (H + λI)⁻¹ v by conjugate gradients, and its diagnostics.

    Same algorithm and options as `ti.cg`, but it never raises for a numerical failure:
    a right-hand side that meets negative curvature stops there, and every right-hand
    side reports in `info` whether it converged. Matches `scipy.sparse.linalg.cg`
    iterate for iterate (started from x₀ = 0).

    Args:
      operator: `u -> H u` on pytrees shaped like the parameters and on stacks of them
        (leading axis k), e.g. `ti.hvp(R, params)` or `ti.ggn_vp(...)`, or on tensors `[P]`/`[k, P]`.
      v: one right-hand side shaped like the parameters, or a stack with leaves `[k, ...]`.
      damping, tol, atol, maxiter, check_every, like, preconditioner: as in `ti.cg`.

    Returns:
      x: like `v` (structure, shapes, dtype, device).
      info: `SolveInfo(iterations, residual, converged)`, tensors `[k]` (0-d for one vector).

    Raises:
      ValueError: invalid options, or `v` shaped neither like the parameters nor a stack of them.
      TypeError: `v` is a pytree and the parameters are unknown (pass `like=params`).
    """
    _check_options("ti.cg_solve", damping, tol, atol, maxiter, check_every, "raise")
    _check_preconditioner("ti.cg_solve", preconditioner)
    x, info, _ = _run(operator, v, damping=damping, tol=tol, atol=atol, maxiter=maxiter, check_every=check_every, like=like,
                      preconditioner=preconditioner)
    return x, info


def cg(operator: Callable, *, damping: float = 0.0, tol: float | None = 1e-6, atol: float = 0.0, maxiter: int = 100,
       check_every: int | None = None, on_failure: str = "raise", like=None,
       preconditioner: Callable | None = None) -> Callable:
    """Returns a function that applies (H + λI)⁻¹ by conjugate gradients.

    Solves (H + λI) x = v for all right-hand sides at once: `v` may carry a leading
    axis of k vectors, each with its own step sizes, so k test points cost ONE operator
    call per iteration (one pass over the training data for `ti.hvp`), not k. A
    right-hand side stops once ‖r‖ ≤ max(tol·‖v‖, atol); the loop ends when all have
    stopped (checked every `check_every` iterations, one host sync each) or at `maxiter`.

    Single vector or stack: the returned function compares `v`'s leaf shapes with the
    parameters the operator acts on: `like=params` when given, else those of an operator
    from `ti.hvp` / `ti.ggn_vp`; a plain tensor is one vector if 1-D, a stack if 2-D.

    Args:
      operator: `u -> H u`, e.g. `ti.hvp(R, params)` or `ti.ggn_vp(...)`; it must accept a
        stack (leading axis k) and H + λI must be symmetric positive definite.
      damping: λ ≥ 0, added to the diagonal.
      tol: relative residual per right-hand side. `None` runs exactly `maxiter`
        iterations with no data-dependent branch and no check (safe under
        `torch.func.vmap` and `torch.compile(fullgraph=True)`); nothing is raised then.
      atol: absolute residual floor (for right-hand sides near zero).
      maxiter: iterations, each one operator call.
      check_every: iterations between checks for "all done" (each is one host sync);
        the per-right-hand-side stopping itself is exact at every iteration. `None`:
        every iteration on CPU (a sync costs nothing there), every 10th on an accelerator.
      on_failure: "raise" a `ConvergenceError`, or "warn" and return the iterate.
      like: the parameter pytree, to tell a single vector from a stack.
      preconditioner: `V -> P⁻¹ V` on stacks (leading axis k), symmetric positive
        definite, e.g. `ti.nystrom(operator, rank=50, generator=g, damping=λ)`: the
        iteration becomes preconditioned CG, stopping on the unpreconditioned ‖r‖ all the
        same. It pays when a few large eigenvalues set the condition number.

    Returns:
      `ihvp(v) -> x`, pure; `x` has the structure, shapes, dtype and device of `v`.

    Raises:
      ValueError: at construction, for damping < 0, tol < 0, atol < 0, maxiter < 1,
        check_every < 1 or an unknown on_failure.
      ConvergenceError: at call time, if a right-hand side misses `tol` within `maxiter`
        or meets pᵀ(H + λI)p ≤ 0; `err.info` is the `SolveInfo`.

    Example:
      >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> ihvp = ti.cg(lambda u: u @ A.T, tol=1e-12)
      >>> ihvp(torch.tensor([1., 2.], dtype=torch.float64))
      tensor([0.0909, 0.6364], dtype=torch.float64)

    References:
      Hestenes & Stiefel, Methods of conjugate gradients for solving linear systems, 1952.
      Frangella, Tropp & Udell, Randomized Nyström Preconditioning, 2023 (`ti.nystrom`).
    """
    _check_options("ti.cg", damping, tol, atol, maxiter, check_every, on_failure)
    _check_preconditioner("ti.cg", preconditioner)

    def ihvp(v):
        x, info, state = _run(operator, v, damping=damping, tol=tol, atol=atol, maxiter=maxiter,
                              check_every=check_every, like=like, preconditioner=preconditioner)
        if tol is not None:
            _report(state, info, tol=tol, maxiter=maxiter, damping=damping, on_failure=on_failure)
        return x

    return ihvp


def _report(state: CGState, info: SolveInfo, *, tol, maxiter, damping, on_failure) -> None:
    """Raises (or warns) on negative curvature or a right-hand side that missed `tol`."""
    broke = state.broke_at >= 0
    if bool(broke.any()):
        j = int(torch.nonzero(broke)[0])
        message = (
            f"ti.cg: negative curvature pᵀ(H + λI)p = {float(state.curvature[j]):.3e} at iteration {int(state.broke_at[j])} "
            f"(right-hand side {j}): H + λI is not positive definite at these parameters (damping={damping:g}). "
            "Raise `damping` above the magnitude of the most negative eigenvalue of H, or use ti.ggn_vp, "
            "which is positive semi-definite.")
    elif not bool(info.converged.all()):
        failed = ~info.converged.reshape(-1)
        message = (
            f"ti.cg: {int(failed.sum())} of {failed.numel()} right-hand sides did not converge in maxiter={maxiter} "
            f"iterations (worst relative residual {float(info.residual.max()):.1e} > tol={tol:g}). Raise `maxiter` or "
            "`damping`, or use ti.ggn_vp, which is positive semi-definite. Per-right-hand-side diagnostics: err.info.")
    else:
        return
    if on_failure == "raise":
        raise ConvergenceError(message, info=info)
    warnings.warn(message, stacklevel=3)
