"""Extreme eigenvalues of a symmetric operator by Lanczos: to choose damping, and LiSSA's scale."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ..core import tree as tr
from ..core.operator import as_operator

__all__ = ["eigenvalues", "Eigenvalues"]


class Eigenvalues(NamedTuple):
    """The k smallest and k largest Ritz values of `ti.eigenvalues`, each `[k]`, ascending.

    Attributes:
      smallest: the k smallest, `[k]`.
      largest: the k largest, `[k]`.
    """

    smallest: torch.Tensor
    largest: torch.Tensor


def eigenvalues(operator: Callable, *, k: int = 1, generator: torch.Generator, iterations: int | None = None) -> Eigenvalues:
    """Estimates of the k smallest and k largest eigenvalues of a symmetric operator, by Lanczos.

    Runs `iterations` Lanczos steps, fully re-orthogonalized (which keeps the estimates free
    of spurious copies), from a random start drawn from a copy of `generator` (not
    advanced), then takes the extreme eigenvalues of the tridiagonal matrix. The extreme
    Ritz values converge first and from inside the spectrum (`smallest` ≥ λ_min,
    `largest` ≤ λ_max), so a few dozen steps give a good estimate; with `iterations` = P
    they are exact up to round-off. Use it to choose damping (H + λI is positive definite
    when λ > −λ_min(H)) and LiSSA's `scale` (above half of λ_max(H + λI)).

    Args:
      operator: a symmetric `ti.LinearOperator` carrying its structure (`ti.hvp`,
        `ti.ggn_vp`, or `ti.LinearOperator(fn, like=params)`).
      k: how many eigenvalues at each end, 1 ≤ k ≤ P.
      generator: `torch.Generator` for the start vector.
      iterations: Lanczos steps m, k ≤ m ≤ P; default min(P, max(40, 4k)).

    Returns:
      `Eigenvalues(smallest [k], largest [k])`, ascending, in the operator's dtype (fewer
      than k when the start vector spans an invariant subspace of dimension < k).

    Raises:
      TypeError: the operator carries no structure, or `generator` is not a torch.Generator.
      ValueError: `k` or `iterations` out of range.

    Cost: m operator calls on one vector, O(m²·P) for the re-orthogonalization, O(m·P)
    memory for the Lanczos basis.

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> ev = ti.eigenvalues(ti.hvp(R, params), k=1, generator=torch.Generator().manual_seed(0))
      >>> exact = torch.linalg.eigvalsh(ti.hessian(R, params))
      >>> torch.allclose(ev.smallest, exact[:1]) and torch.allclose(ev.largest, exact[-1:])
      True

    References:
      Lanczos, An iteration method for the solution of the eigenvalue problem of linear
      differential and integral operators, 1950; Golub & Van Loan, Matrix Computations, §10.1.
    """
    where = "ti.eigenvalues"
    op = as_operator(operator, where=where)
    if op.like is None:
        raise TypeError(f"{where}: cannot tell the shapes of the vectors: wrap the function as "
                        "ti.LinearOperator(fn, like=params) (like=torch.zeros(P) on tensors).")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: `generator` must be a torch.Generator; got {type(generator).__name__}.")
    like = op.like
    P = tr.size(like)
    if isinstance(k, bool) or not (isinstance(k, int) and 1 <= k <= P):
        raise ValueError(f"{where}: `k` must be an int in [1, P={P}]; got {k!r}.")
    m = min(P, max(40, 4 * k)) if iterations is None else iterations
    if isinstance(m, bool) or not (isinstance(m, int) and k <= m <= P):
        raise ValueError(f"{where}: `iterations` must be an int in [k={k}, P={P}]; got {iterations!r}.")
    flat = tr.ravel(like)
    apply = lambda q: tr.ravel(op.fn(tr.unravel(q, like)))  # noqa: E731
    q = torch.randn(P, generator=tr.fork_generator(generator), dtype=flat.dtype, device=generator.device).to(flat.device)
    Q = torch.zeros(m, P, dtype=flat.dtype, device=flat.device)
    alphas, betas = [], []
    q = q / q.norm()
    for j in range(m):
        Q[j] = q
        w = apply(q)
        alphas.append(torch.dot(w, q))
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)                 # full re-orthogonalization, twice
        w = w - Q[: j + 1].T @ (Q[: j + 1] @ w)
        beta = w.norm()
        if j + 1 == m or not float(beta) > torch.finfo(flat.dtype).eps * float(abs(alphas[0]) + 1):
            break                                               # an invariant subspace: its Ritz values are exact
        betas.append(beta)
        q = w / beta
    T = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    ritz = torch.linalg.eigvalsh(T)
    k = min(k, ritz.numel())
    return Eigenvalues(ritz[:k], ritz[-k:])
