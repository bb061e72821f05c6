"""Exceptions for numerical failures; bad arguments raise `checks.ArgumentError`.

Every message starts with the public call (`ti.cg: ...`), says what was expected and what
was got, and where there is one, the fix.
"""

from typing import Any


class ConvergenceError(RuntimeError):
    """A solver missed its tolerance or met a breakdown; `.info` holds its diagnostics (a `ti.SolveInfo`
    from `ti.cg`, `ti.lissa` and `ti.direct`; the final parameters from `ti.minimize`).

    Args:
      message: what happened and the remedy, starting with the public call.
      info: the diagnostics, or None.

    Examples:
      >>> A = torch.tensor([[1., 0.], [0., -1.]], dtype=torch.float64)   # not positive definite
      >>> try:
      ...     ti.direct(A)(torch.ones(2, dtype=torch.float64))
      ... except ti.ConvergenceError as err:
      ...     print(err.info.status.item() == ti.Status.BREAKDOWN)
      True
    """

    def __init__(self, message: str, info: Any = None):
        super().__init__(message)
        self.info = info


class DivergenceError(RuntimeError):
    """An iteration blew up (non-finite or exploding iterate, or no better than x = 0); `.info` holds its
    diagnostics (a `ti.SolveInfo` from `ti.lissa`).

    Args:
      message: what happened and the remedy, starting with the public call.
      info: the diagnostics, or None.

    Examples:
      >>> ihvp = ti.lissa(loss, params, train, l2=1e-2, scale=1e-3, depth=10)   # scale far too small
      >>> try:
      ...     ihvp(ti.tree.map(torch.ones_like, params))
      ... except ti.DivergenceError as err:
      ...     print(err.info.status.item() == ti.Status.DIVERGED)
      True
    """

    def __init__(self, message: str, info: Any = None):
        super().__init__(message)
        self.info = info
