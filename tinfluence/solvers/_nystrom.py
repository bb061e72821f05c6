"""Randomized Nyström preconditioner for conjugate gradients (Frangella, Tropp & Udell 2023)."""

from __future__ import annotations

from typing import Callable

import torch

from ..core import checks
from ..core import tree as tr
from ..core.operator import LinearOperator, as_operator

__all__ = ["nystrom"]


def nystrom(operator: Callable, *, rank: int, generator: torch.Generator, damping: float = 0.0) -> LinearOperator:
    """Returns `P⁻¹`, a preconditioner for (C + λI) from a rank-r Nyström sketch of C, for `ti.cg`.

    C ≈ U Λ Uᵀ is sketched from ONE operator call on r random directions (a stack of r
    vectors, i.e. the cost of one CG iteration with r right-hand sides); then

        P⁻¹ v = (λ_r + λ) U (Λ + λI)⁻¹ Uᵀ v + (v − U Uᵀ v),

    which maps the r largest eigenvalues of C + λI onto about λ_r + λ: CG then converges
    at the rate of the condition number (λ_r + λ)/(λ_min + λ) instead of
    (λ_max + λ)/(λ_min + λ). It pays when the spectrum of C has a few large eigenvalues
    above a flat tail (Hessians and Gauss-Newton matrices of trained networks, logistic
    regression on images). The directions come from a copy of `generator` (not
    advanced), so the same call gives the same preconditioner.

    Args:
      operator: `u -> C u`, a `ti.LinearOperator` with its structure (`ti.hvp(R, params)`,
        `ti.ggn_vp(...)`, or `ti.LinearOperator(fn, like=params)`; `like=torch.zeros(P)` for
        an operator on tensors), symmetric positive semi-definite, accepting a stack.
      rank: r ≥ 1, the number of sketched directions (at most P).
      generator: `torch.Generator` for the random directions.
      damping: λ ≥ 0, the same damping passed to `ti.cg`.

    Returns:
      `P⁻¹`, a `ti.LinearOperator` (kind "preconditioner", positive definite) on vectors
      shaped like the operator's and on stacks of them, for `ti.cg(..., preconditioner=)`.

    Raises:
      ValueError: `rank` not an int in [1, P], `damping` < 0, or a sketch in which C + λI
        is numerically singular (add damping).
      TypeError: `generator` is not a `torch.Generator`, or the operator carries no structure.

    Cost: the sketch is one operator call on a stack of r vectors plus O(P·r²) for a QR,
    a Cholesky and an SVD; each application 4·r·P flops per right-hand side. Memory `[P, r]`.

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> pre = ti.nystrom(ti.hvp(R, params), rank=10, generator=torch.Generator().manual_seed(0))
      >>> x, info = ti.cg_solve(ti.hvp(R, params), ti.per_example_grads(loss, params, test), tol=1e-10,
      ...                       preconditioner=pre)
      >>> bool(info.converged.all())
      True

    References:
      Frangella, Tropp & Udell, Randomized Nyström Preconditioning, SIAM J. Matrix Anal.
      Appl. 44(2), 2023 (Algorithm 2.1 and eq. 5.3).
    """
    where = "ti.nystrom"
    checks.number(where, "damping", damping, minimum=0.0)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: `generator` must be a torch.Generator; got {type(generator).__name__}.")
    op = as_operator(operator, where=where)
    like = op.like
    if like is None:
        raise TypeError(f"{where}: cannot tell the shapes of the vectors: wrap the function as "
                        "ti.LinearOperator(fn, like=params) (like=torch.zeros(P) on tensors), or use an operator "
                        "from ti.hvp or ti.ggn_vp.")
    flat = tr.ravel(like)
    P = flat.shape[-1]
    if not (isinstance(rank, int) and 1 <= rank <= P):
        raise ValueError(f"{where}: `rank` must be an int in [1, P={P}]; got {rank!r}.")

    omega = torch.randn(P, rank, generator=tr.fork_generator(generator), dtype=flat.dtype, device=generator.device)
    omega = torch.linalg.qr(omega.to(flat.device)).Q                               # [P, r], orthonormal
    Y = tr.ravel(op.many(tr.unravel(omega.T, like)), batch_ndim=1).T                # [P, r] = C Ω
    shift = torch.finfo(flat.dtype).eps * torch.linalg.matrix_norm(Y)
    Y = Y + shift * omega
    L, info = torch.linalg.cholesky_ex(omega.T @ Y)
    if int(info) != 0:
        raise ValueError(f"{where}: the sketch ΩᵀCΩ is not positive definite: the operator is zero or not positive "
                         "semi-definite (use ti.ggn_vp, or add l2 to the objective).")
    B = torch.linalg.solve_triangular(L, Y.T, upper=False).T                        # Y L⁻ᵀ, [P, r]
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    eigenvalues = torch.clamp(sigma**2 - shift, min=0.0)                            # descending
    floor = eigenvalues[-1] + damping
    if not float(floor) > 10 * float(shift):                                        # zero at working precision
        raise ValueError(f"{where}: sketched eigenvalue {rank} plus damping is {float(floor):.1e}: C + λI is "
                         "numerically singular on the sketch; pass damping > 0 (the same as ti.cg's) or a smaller rank.")
    scale = floor / (eigenvalues + damping) - 1.0                                   # [r]

    def precondition(V):
        X = tr.ravel(V, batch_ndim=1)                                               # [k, P]
        return tr.unravel(X + ((X @ U) * scale) @ U.T, like)

    def one(v):
        return tr.map(lambda leaf: leaf[0], precondition(tr.map(lambda leaf: leaf[None], v)))

    return LinearOperator(one, like, many=precondition, symmetric=True, psd=True, kind="preconditioner")
