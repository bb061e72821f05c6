"""Dense inverse-curvature products: damped Cholesky, factorized once at construction."""

from __future__ import annotations

import warnings
from typing import Callable

import optree
import torch

from ..core.errors import check_positive

__all__ = ["direct"]


def direct(H: torch.Tensor, *, damping: float = 0.0) -> Callable:
    """Returns a function that applies (H + λI)⁻¹ with a dense factorization of H + λI.

    H + λI is factorized once, here (Cholesky, P³/3 flops); each call is then two
    triangular solves, P² flops per right-hand side, with no data-dependent branch, so
    the returned function is pure, vmappable and compile-safe.

    A matrix carries no pytree structure, so the returned function reads it from `v`:
    all leaves of `v` are flattened in optree order (the order of `ti.tree.ravel`, which
    `ti.hessian` and `ti.to_dense` use) and the result is reshaped back to `v`'s leaves.
    If `v` holds P numbers it is one vector; if its leaves share a leading axis k and
    hold k·P numbers it is a stack of k right-hand sides, solved together. (A stack of
    one holds P numbers too; both readings give the same numbers.) A plain tensor `[P]`
    or `[k, P]` works the same way.

    If H + λI is not positive definite, the solve falls back to its eigendecomposition
    (inverting the nonzero eigenvalues, a pseudo-inverse) with a warning: an indefinite
    curvature makes influence scores unreliable, and the fix is more damping or the
    Gauss-Newton matrix.

    Args:
      H: `[P, P]` symmetric matrix, e.g. `ti.hessian(R, params)` or `ti.to_dense(op, params)`.
      damping: λ ≥ 0 added to the diagonal.

    Returns:
      `ihvp(v) -> x = (H + λI)⁻¹ v`: `x` has the structure, shapes, dtype and device of `v`.

    Raises:
      TypeError: `H` is not a tensor.
      ValueError: `H` is not square, not symmetric or not finite; `damping` < 0; at call
        time, `v` holds neither P nor k·P numbers.

    Warns:
      UserWarning: H + λI is not positive definite; the eigendecomposition is used.

    Example:
      >>> H = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> ti.direct(H)(torch.tensor([1., 2.], dtype=torch.float64))
      tensor([0.0909, 0.6364], dtype=torch.float64)
    """
    A = _checked_matrix(H, damping)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        solve = lambda B: torch.cholesky_solve(B, L)  # noqa: E731  # B: [P, k]
    else:
        solve = _eigh_solve(A, damping)

    def ihvp(v):
        leaves, spec = optree.tree_flatten(v, namespace="")
        batch = _batch_shape(leaves, A.shape[0])
        B = torch.cat([leaf.reshape(*batch, -1) for leaf in leaves], dim=-1)   # [*batch, P]
        X = solve(B.reshape(-1, A.shape[0]).T.to(A.dtype)).T.reshape(B.shape).to(B.dtype)
        parts = torch.split(X, [leaf[(0,) * len(batch)].numel() for leaf in leaves], dim=-1)
        return optree.tree_unflatten(spec, [p.reshape(leaf.shape) for p, leaf in zip(parts, leaves)])

    return ihvp


def _checked_matrix(H, damping) -> torch.Tensor:
    """H + λI, after checking H is a finite, square, symmetric matrix and λ ≥ 0."""
    if not isinstance(H, torch.Tensor):
        raise TypeError(f"ti.direct: `H` must be a [P, P] tensor (ti.hessian or ti.to_dense); got {type(H).__name__}.")
    if H.dim() != 2 or H.shape[0] != H.shape[1]:
        raise ValueError(f"ti.direct: `H` must be a square [P, P] matrix; got shape {tuple(H.shape)}.")
    check_positive("ti.direct", "damping", damping, allow_zero=True)
    if not bool(torch.isfinite(H).all()):
        raise ValueError("ti.direct: `H` has non-finite values (nan or inf).")
    asym = (H - H.T).abs().max()
    if asym > 1e-6 * H.abs().max():
        raise ValueError(f"ti.direct: `H` must be symmetric; max |H - Hᵀ| = {asym:.1e}. Use (H + H.T) / 2 if this is round-off.")
    return H + damping * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def _eigh_solve(A: torch.Tensor, damping: float) -> Callable:
    """B ↦ A⁺ B from the eigendecomposition of a symmetric, not positive-definite A."""
    evals, Q = torch.linalg.eigh(A)
    lowest = float(evals[0])
    warnings.warn(
        f"ti.direct: H + λI is not positive definite (smallest eigenvalue {lowest:.3e} with damping={damping:g}); "
        "solving with its eigendecomposition (a pseudo-inverse), which makes influence scores unreliable. "
        f"Raise `damping` above {max(-lowest, 0.0):.3e}, or use the Gauss-Newton matrix (ti.ggn_vp), "
        "which is positive semi-definite.", stacklevel=3)
    cutoff = evals.abs().max() * A.shape[0] * torch.finfo(A.dtype).eps
    inverse = torch.where(evals.abs() > cutoff, 1.0 / evals, torch.zeros_like(evals))
    return lambda B: Q @ (inverse[:, None] * (Q.T @ B))


def _batch_shape(leaves, P: int) -> tuple:
    """() when the leaves hold P numbers, (k,) when they share a leading axis k and hold k·P."""
    total = sum(leaf.numel() for leaf in leaves)
    if not leaves:
        raise ValueError("ti.direct: `v` has no tensors.")
    if total == P:
        return ()
    firsts = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
    if len(firsts) == 1 and None not in firsts and total == firsts.pop() * P:
        return (leaves[0].shape[0],)
    raise ValueError(
        f"ti.direct: `v` must hold P={P} numbers (one vector shaped like the parameters) or k·P with a common "
        f"leading axis k (a stack); got leaves {[tuple(leaf.shape) for leaf in leaves]} ({total} numbers).")
