"""One solve result for every solver: `Solution(x, info)`, `SolveInfo`, and the inverse operator `ihvp`.

Every solver factory (`ti.direct`, `ti.cg`, `ti.lissa`) returns an `InverseOperator`:
`ihvp(v) -> x` applies the `on_failure` policy ("raise" or "warn"), and
`ihvp.solve(v) -> Solution(x, info)` never raises for a numerical failure.
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
from typing import Callable, NamedTuple

import torch

from ..core.errors import ConvergenceError, DivergenceError
from ..core.tree import PyTree

__all__ = ["Status", "SolveInfo", "Solution", "InverseOperator", "check_on_failure"]


class Status(enum.IntEnum):
    """Per-right-hand-side outcome of a solve (the integer codes of `SolveInfo.status`).

    CONVERGED (0): the true relative residual meets the tolerance. MAX_ITERATIONS (1): the
    budget (maxiter, depth) ran out, or CG stalled above an unattainable tol. BREAKDOWN (2):
    negative or zero curvature, H + λI is not positive definite. DIVERGED (3): the
    iteration blew up (non-finite, or no better than x = 0). Higher is worse.

    Examples:
      >>> A = torch.tensor([[1., 0.], [0., -1.]], dtype=torch.float64)   # indefinite
      >>> x, info = ti.direct(A).solve(torch.ones(2, dtype=torch.float64))
      >>> ti.Status(int(info.status))
      <Status.BREAKDOWN: 2>
    """

    CONVERGED = 0        # the true relative residual meets the tolerance
    MAX_ITERATIONS = 1   # not converged: the budget (maxiter, depth) ran out, or CG stalled above an unattainable tol
    BREAKDOWN = 2        # negative or zero curvature: H + λI is not positive definite
    DIVERGED = 3         # the iteration blew up (non-finite, or no better than x = 0)


@dataclasses.dataclass(frozen=True)
class SolveInfo:
    """Diagnostics of one solve, per right-hand side: tensors `[k]`, 0-d for one vector.

    Attributes:
      status: `Status` codes (int64).
      iterations: iterations actually used (operator calls this right-hand side took part
        in; LiSSA: recursion steps summed over repeats; direct: 0), int64.
      relative_residual: the TRUE relative residual ‖(H + λI)x − v‖ / ‖v‖, recomputed from
        x with one more operator call (LiSSA: with the full-data Hessian), not a
        recursion's estimate.
      curvature: at a breakdown, the Rayleigh quotient pᵀ(H + λI)p / ‖p‖² met (direct: the
        smallest eigenvalue of H + λI); NaN elsewhere.
      solver: the public call ("ti.cg", "ti.lissa", "ti.direct").
      tol: the tolerance the status was judged against.
      context: the options the message needs (maxiter, damping, scale, operator kind, dtype).

    Examples:
      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)
      >>> x, info = ti.direct(H).solve(torch.ones(4, 27, dtype=torch.float64))
      >>> info.status.shape, info.ok, bool((info.relative_residual <= info.tol).all())
      (torch.Size([4]), True, True)
    """

    status: torch.Tensor
    iterations: torch.Tensor
    relative_residual: torch.Tensor
    curvature: torch.Tensor
    solver: str
    tol: float
    context: dict = dataclasses.field(default_factory=dict)

    @property
    def converged(self) -> torch.Tensor:
        """Bool tensor, like `status`: the right-hand sides that converged."""
        return self.status == Status.CONVERGED

    @property
    def ok(self) -> bool:
        """Whether every right-hand side converged (one host sync)."""
        return bool(self.converged.all())

    def single(self) -> SolveInfo:
        """The info of a stack of one as that of one vector (0-d fields; the first right-hand side's)."""
        return dataclasses.replace(self, status=self.status[0], iterations=self.iterations[0],
                                   relative_residual=self.relative_residual[0], curvature=self.curvature[0])

    @property
    def message(self) -> str:
        """What happened, for the worst right-hand side, and the remedy for its status (a str starting with `solver`)."""
        status = self.status.reshape(-1)
        worst = int(status.max()) if status.numel() else 0
        return _MESSAGES[Status(worst)](self)


class Solution(NamedTuple):
    """`x` (like `v`) and its `SolveInfo`; unpacks as `x, info = ihvp.solve(v)`.

    Attributes:
      x: the solution, with the structure, shapes, dtype and device of `v`.
      info: its `SolveInfo`.

    Examples:
      >>> A = torch.tensor([[4., 1.], [1., 3.]], dtype=torch.float64)
      >>> solution = ti.direct(A).solve(torch.tensor([1., 2.], dtype=torch.float64))
      >>> x, info = solution
      >>> torch.allclose(A @ x, torch.tensor([1., 2.], dtype=torch.float64)) and solution.info is info
      True
    """

    x: object
    info: SolveInfo


def check_on_failure(where: str, on_failure) -> None:
    """Raises ValueError unless `on_failure` is "raise" or "warn".

    Args:
      where: the public call named in the message.
      on_failure: the value checked.

    Raises:
      ValueError: `on_failure` is neither "raise" nor "warn".

    Examples:
      >>> from tinfluence.solvers._result import check_on_failure
      >>> check_on_failure("ti.cg", "warn") is None
      True
    """
    if on_failure not in ("raise", "warn"):
        raise ValueError(f'{where}: `on_failure` must be "raise" or "warn"; got {on_failure!r}.')


def report(info: SolveInfo, on_failure: str, stacklevel: int = 3) -> None:
    """Raises (`DivergenceError` for a divergence, else `ConvergenceError`) or warns unless every
    right-hand side converged; the error carries the info as `err.info`.
    """
    if info.ok:
        return
    message = info.message
    if on_failure == "warn":
        warnings.warn(message, stacklevel=stacklevel)
        return
    diverged = bool((info.status == Status.DIVERGED).any())
    raise (DivergenceError if diverged else ConvergenceError)(message, info=info)


class InverseOperator:
    """`ihvp`: v ↦ (H + λI)⁻¹ v, callable, with `ihvp.solve(v) -> Solution(x, info)`; built by
    `ti.direct`, `ti.cg` and `ti.lissa`.

    `ihvp(v)` returns `x` like `v` (one vector or a stack, leading axis k) and applies the
    solver's `on_failure` policy: it raises `ConvergenceError` / `DivergenceError` (the
    `SolveInfo` as `err.info`) or warns. `ihvp.solve(v)` returns the diagnostics and never
    raises for a numerical failure (only for invalid input). For `ti.cg(tol=None)` and
    `ti.direct` (positive definite), `ihvp(v)` computes `x` with no host synchronization,
    so it composes with `torch.func.vmap` and `torch.compile`.

    Args:
      solve: `v -> Solution(x, info)`.
      on_failure: "raise" or "warn".
      apply: `v -> x` applying the policy itself (e.g. without a host sync); None: `solve`
        then the policy.
      solver: the public call that built it ("ti.cg", ...), for its repr.

    Attributes:
      on_failure: the policy `ihvp(v)` applies.
      solver: the public call that built it.

    Examples:
      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)
      >>> ihvp = ti.direct(H)
      >>> V = torch.ones(3, 27, dtype=torch.float64)
      >>> torch.equal(ihvp(V), ihvp.solve(V).x)
      True
    """

    def __init__(self, solve: Callable, *, on_failure: str, apply: Callable | None = None, solver: str):
        self._solve = solve
        self._apply = apply
        self.on_failure = on_failure
        self.solver = solver

    def solve(self, v: PyTree) -> Solution:
        """`Solution(x, info)` for one vector or a stack (leading axis k: `info` fields `[k]`); never
        raises for numerical failure, only for invalid input.
        """
        return self._solve(v)

    def __call__(self, v: PyTree) -> PyTree:
        if self._apply is not None:
            return self._apply(v)
        x, info = self._solve(v)
        report(info, self.on_failure, stacklevel=3)
        return x

    def __repr__(self) -> str:
        return f"InverseOperator({self.solver}, on_failure={self.on_failure!r})"


# ---------------------------------------------------------------- messages


def _counts(info: SolveInfo, status: Status) -> tuple[int, int, int]:
    """(how many right-hand sides have `status`, how many there are, the first such index)."""
    hit = (info.status == status).reshape(-1)
    return int(hit.sum()), hit.numel(), int(torch.nonzero(hit)[0]) if bool(hit.any()) else -1


def _worst_residual(info: SolveInfo) -> float:
    return float(info.relative_residual.reshape(-1).max())


def _ggn_advice(info: SolveInfo) -> str:
    """The Gauss-Newton suggestion, unless the operator already is one (or a dense matrix of unknown origin)."""
    if info.context.get("kind") in ("ggn", "preconditioner"):
        return ""
    return ", or use ti.ggn_vp, which is positive semi-definite"


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _reach_advice(info: SolveInfo) -> str:
    """Says when `tol` is below what the dtype can reach for any operator: the attainable relative
    residual is about eps·cond(H + λI), never below ~100·eps, and float32 rarely gets under 1e-6.
    """
    dtype = info.context.get("dtype")
    if dtype is None or info.tol is None:
        return ""
    eps = torch.finfo(dtype).eps
    if info.tol < 100 * eps or (dtype == torch.float32 and info.tol < 1e-6):
        return (f" tol={info.tol:g} is below what {_dtype_name(dtype)} can reach (the attainable "
                f"relative residual is about eps·cond(H + λI) with eps={eps:.1e}): raise `tol`, or solve in float64.")
    return ""


def _stalled(info: SolveInfo) -> str:
    """CG's recursive residual met `tol` but the true residual stalled above it: the attainable accuracy."""
    stalled = info.context["stalled"].reshape(-1)
    dtype = info.context["dtype"]
    eps = torch.finfo(dtype).eps
    worst = float(info.relative_residual.reshape(-1)[stalled].max())
    wider = ", or solve in float64" if dtype != torch.float64 else ""
    return (f"{info.solver}: {int(stalled.sum())} of {stalled.numel()} right-hand sides cannot reach tol={info.tol:g} "
            f"in {_dtype_name(dtype)}: the recursive residual met it, but the true relative residual stalled at "
            f"{worst:.1e}, the attainable accuracy for this condition number (about eps·cond(H + λI), eps={eps:.1e}). "
            f"Raise `tol`, or `damping` (which lowers the condition number){wider}. Per-right-hand-side "
            "diagnostics: err.info.")


def _converged(info: SolveInfo) -> str:
    k = info.status.numel()
    return (f"{info.solver}: {'all ' if k > 1 else ''}{k} right-hand side{'s' if k > 1 else ''} converged "
            f"(worst relative residual {_worst_residual(info):.1e} <= tol={info.tol:g}).")


def _max_iterations(info: SolveInfo) -> str:
    failed, k, _ = _counts(info, Status.MAX_ITERATIONS)
    stalled = info.context.get("stalled")
    if stalled is not None and bool(stalled.any()):
        return _stalled(info)
    if info.solver == "ti.lissa":
        return (f"ti.lissa: {failed} of {k} right-hand sides did not meet tol={info.tol:g} (relative change of the "
                f"recursion) within depth={info.context.get('depth')}; true relative residual up to "
                f"{_worst_residual(info):.1e}. Raise `depth` or `damping`, lower `scale` towards the largest "
                "eigenvalue of H + λI, or raise `repeats`. Per-right-hand-side diagnostics: err.info.")
    return (f"{info.solver}: {failed} of {k} right-hand sides did not converge in maxiter={info.context.get('maxiter')} "
            f"iterations (worst relative residual {_worst_residual(info):.1e} > tol={info.tol:g}). Raise `maxiter` or "
            f"`damping`{_ggn_advice(info)}.{_reach_advice(info)} Per-right-hand-side diagnostics: err.info.")


def _breakdown(info: SolveInfo) -> str:
    _, _, j = _counts(info, Status.BREAKDOWN)
    curvature = float(info.curvature.reshape(-1)[j])
    damping = info.context.get("damping", 0.0)
    eigen = ("estimate the extreme eigenvalues with ti.eigenvalues(operator, k=1, generator=g)")
    if info.solver == "ti.direct":
        return (f"ti.direct: H + λI is not positive definite (smallest eigenvalue {curvature:.3e} with "
                f"damping={damping:g}): influence scores from it are unreliable. Raise `damping` above "
                f"{max(-curvature, 0.0) + damping:.3e}{_ggn_advice(info)}. With on_failure=\"warn\" the solve uses "
                "the eigendecomposition (a pseudo-inverse).")
    return (f"{info.solver}: negative curvature pᵀ(H + λI)p/‖p‖² = {curvature:.3e} at iteration "
            f"{int(info.iterations.reshape(-1)[j])} (right-hand side {j}): H + λI is not positive definite at these "
            f"parameters (damping={damping:g}). Raise `damping` by more than {max(-curvature, 0.0):.3e} (the most "
            f"negative eigenvalue of H + λI is at most this Rayleigh quotient; {eigen}){_ggn_advice(info)}.")


def _diverged(info: SolveInfo) -> str:
    _, _, j = _counts(info, Status.DIVERGED)
    scale = info.context.get("scale")
    residual = float(info.relative_residual.reshape(-1)[j])
    return (f"{info.solver}: the recursion diverged at depth {int(info.iterations.reshape(-1)[j])} (right-hand side "
            f"{j}: relative residual ‖(H + λI)x − v‖/‖v‖ = {residual:.1e}, no better than x = 0). `scale`={scale:g} "
            "must exceed half the largest eigenvalue of H + λI on every mini-batch (LiSSA contracts only then); "
            "raise `scale` (or use scale=\"auto\"); ti.eigenvalues(operator, k=1, generator=g) estimates it.")


_MESSAGES = {Status.CONVERGED: _converged, Status.MAX_ITERATIONS: _max_iterations, Status.BREAKDOWN: _breakdown,
             Status.DIVERGED: _diverged}
