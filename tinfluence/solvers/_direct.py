"""Dense inverse-curvature products: damped Cholesky, factorized once at construction."""

from __future__ import annotations

from typing import Callable

import optree
import torch

from ..core import checks
from ..core.operator import LinearOperator
from ._result import InverseOperator, Solution, SolveInfo, Status, check_on_failure, report

__all__ = ["direct"]


def direct(H: torch.Tensor | LinearOperator, *, damping: float = 0.0, on_failure: str = "raise") -> InverseOperator:
    """Returns `ihvp`, which applies (H + λI)⁻¹ with a dense factorization of H + λI.

    H + λI is factorized once, here (Cholesky); each call is two triangular solves with no
    data-dependent branch, so `ihvp(v)` is pure, vmappable and compile-safe. If H + λI is not
    positive definite, that is the solve's status (`Status.BREAKDOWN`, the smallest
    eigenvalue in `info.curvature`): `ihvp(v)` raises, or with on_failure="warn" warns and
    solves with the eigendecomposition (a pseudo-inverse of the nonzero eigenvalues).

    Args:
      H: `[P, P]` symmetric matrix, ordered as `ti.tree.ravel` (e.g. `ti.hessian(R, params)`),
        or a `ti.LinearOperator`, formed densely with `ti.to_dense` (P operator calls)
        unless it holds `.matrix`.
      damping: λ ≥ 0 added to the diagonal.
      on_failure: "raise" or "warn", as in `ti.cg`.

    Returns:
      `ihvp(v) -> x = (H + λI)⁻¹ v` (structure, shapes, dtype and device of `v`), and
      `ihvp.solve(v) -> ti.Solution(x, info)`, never raising for numerical failure. With an
      operator `H`, `v` has its structure (dict keys matched by name) or is a stack of it;
      with a bare matrix, `v` is a tensor `[P]` / `[k, P]` or a pytree of dicts only (their
      order is fixed by the sorted keys; for lists or tuples wrap the matrix with
      `ti.LinearOperator.from_matrix(H, like=params)`).

    Raises:
      TypeError: `H` is neither a tensor nor a `ti.LinearOperator`, or the operator has no
        structure (`like`).
      ValueError: `H` is not square, not symmetric or not finite; `damping` < 0 or
        `on_failure` invalid; at call time, `v` is not shaped like the operator's vectors
        (nor a stack of them), or holds lists or tuples against a bare matrix.
      ConvergenceError: from `ihvp(v)`, when H + λI is not positive definite.

    Cost: P³/3 flops and O(P²) memory to factorize, here (an operator adds P calls to form
    it); each call O(k·P²) for k right-hand sides.

    Examples:
      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)
      >>> ihvp = ti.direct(H, damping=1e-3)
      >>> v = ti.tree.map(torch.ones_like, params)
      >>> A = H + 1e-3 * torch.eye(27, dtype=torch.float64)
      >>> torch.allclose(ti.ravel(ihvp(v)), torch.linalg.solve(A, ti.ravel(v)))
      True
    """
    check_on_failure("ti.direct", on_failure)
    matrix, op = _matrix_and_structure(H)
    A = _checked_matrix(matrix, damping)
    L, failed = torch.linalg.cholesky_ex(A)
    positive = int(failed) == 0
    lowest = torch.full((), float("nan"), dtype=A.dtype, device=A.device)
    if positive:
        solve_flat = lambda B: torch.cholesky_solve(B, L)  # noqa: E731  # B: [P, k]
    else:
        solve_flat, lowest = _eigh_solve(A)
    context = {"damping": damping, "kind": op.kind if op is not None else "dense", "dtype": A.dtype}

    def flat(v):
        """(x, V [k, P] flat, X [k, P] flat, stacked) for one vector or a stack."""
        leaves, spec = optree.tree_flatten(v, namespace="")
        stacked = _is_stack(op, v, leaves, A.shape[0])
        batch = (leaves[0].shape[0],) if stacked else ()
        B = torch.cat([leaf.reshape(*batch, -1) for leaf in leaves], dim=-1)   # [*batch, P]
        X = solve_flat(B.reshape(-1, A.shape[0]).T.to(A.dtype)).T.reshape(B.shape).to(B.dtype)
        parts = torch.split(X, [leaf[(0,) * len(batch)].numel() for leaf in leaves], dim=-1)
        x = optree.tree_unflatten(spec, [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves)])
        return x, B.reshape(-1, A.shape[0]), X.reshape(-1, A.shape[0]), stacked

    def solve(v) -> Solution:
        x, B, X, stacked = flat(v)
        R = X.to(A.dtype) @ A.T - B.to(A.dtype)
        b_norm = B.to(A.dtype).norm(dim=-1)
        residual = R.norm(dim=-1) / torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))
        k = B.shape[0]
        status = torch.full((k,), int(Status.CONVERGED if positive else Status.BREAKDOWN), dtype=torch.long,
                            device=A.device)
        tol = float(torch.finfo(A.dtype).eps ** 0.5)
        info = SolveInfo(status, torch.zeros(k, dtype=torch.long, device=A.device), residual, lowest.expand(k),
                         solver="ti.direct", tol=tol, context=context)
        return Solution(x, info if stacked else info.single())

    def apply(v):
        if not positive:
            report(solve(v).info, on_failure, stacklevel=4)
        return flat(v)[0]

    return InverseOperator(solve, on_failure=on_failure, apply=apply, solver="ti.direct")


def _matrix_and_structure(H) -> tuple[torch.Tensor, LinearOperator | None]:
    """The dense matrix, and the operator whose structure `v` must have (None for a bare matrix)."""
    if isinstance(H, LinearOperator):
        if H.like is None:
            raise TypeError("ti.direct: the operator carries no structure: pass the dense matrix itself, or "
                            "ti.LinearOperator(fn, like=params).")
        matrix = getattr(H, "matrix", None)
        if matrix is None:
            from ..transforms import to_dense
            matrix = to_dense(H, H.like)
        return matrix, H
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"ti.direct: `H` must be a [P, P] tensor (ti.hessian or ti.to_dense) or a ti.LinearOperator; "
                        f"got {type(H).__name__}.")
    return H, None


def _checked_matrix(H, damping) -> torch.Tensor:
    """H + λI, after checking H is a finite, square, symmetric matrix and λ ≥ 0."""
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"ti.direct: `H` must be a square [P, P] matrix; got shape {tuple(H.shape)}.")
    checks.number("ti.direct", "damping", damping, minimum=0.0)
    if not bool(torch.isfinite(H).all()):
        raise ValueError("ti.direct: `H` has non-finite values (nan or inf).")
    asym = (H - H.T).abs().max()
    if asym > 1e-6 * H.abs().max():
        raise ValueError(f"ti.direct: `H` must be symmetric; max |H - Hᵀ| = {asym:.1e}. Use (H + H.T) / 2 if this is round-off.")
    return H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def _eigh_solve(A: torch.Tensor) -> tuple[Callable, torch.Tensor]:
    """(B ↦ A⁺ B, smallest eigenvalue) from the eigendecomposition of a symmetric, not positive-definite A."""
    evals, Q = torch.linalg.eigh(A)
    cutoff = evals.abs().max() * A.shape[0] * torch.finfo(A.dtype).eps
    inverse = torch.where(evals.abs() > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return (lambda B: Q @ (inverse[:, None] * (Q.T @ B))), evals[0]


def _is_stack(op: LinearOperator | None, v, leaves, P: int) -> bool:
    """One vector or a stack: by the operator's structure, or, for a bare matrix, by counting P."""
    if not leaves:
        raise ValueError("ti.direct: `v` has no tensors.")
    if op is not None:
        return op._is_stack(v, "ti.direct")
    if not isinstance(v, torch.Tensor):
        _check_dict_only(v)
    total = sum(leaf.numel() for leaf in leaves)
    firsts = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
    if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == P:
        return True
    if total == P and not (isinstance(v, torch.Tensor) and v.dim() != 1):
        return False
    first = next(iter(firsts)) if len(firsts) == 1 else None
    if not isinstance(v, torch.Tensor) and first is not None and total == first * P:
        return True
    raise ValueError(
        f"ti.direct: `v` must hold P={P} numbers (one vector shaped like the parameters) or k·P with a common "
        f"leading axis k (a stack); got leaves {[tuple(leaf.shape) for leaf in leaves]} ({total} numbers).")


def _check_dict_only(v) -> None:
    """A bare matrix can be matched only to pytrees whose order is fixed by names: dicts (sorted keys)."""
    accessors = optree.tree_flatten_with_accessor(v, namespace="")[0]
    ordered = [a for a in accessors if any(not isinstance(e, optree.MappingEntry) for e in a)]
    if ordered:
        raise ValueError(
            f"ti.direct: `v` holds lists or tuples (leaf {ordered[0].codify('v')}), whose order cannot be checked against a bare "
            "[P, P] matrix: a right-hand side in another order would be solved silently wrong. Pass the structure: "
            "ti.direct(ti.LinearOperator.from_matrix(H, like=params)), or an operator from ti.hvp / ti.ggn_vp.")
