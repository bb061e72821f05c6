"""Exceptions for numerical failures; bad arguments raise `checks.ArgumentError`.

Every message starts with the public call (`ti.cg: ...`), says what was expected and what
was got, and where there is one, the fix.
"""


class ConvergenceError(RuntimeError):
    """A solver missed its tolerance or met a breakdown; `.info` holds its diagnostics (a `ti.SolveInfo`
    from `ti.cg`, `ti.lissa` and `ti.direct`).
    """

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info


class DivergenceError(RuntimeError):
    """An iteration blew up (non-finite or exploding iterate, or no better than x = 0); `.info` holds its
    diagnostics (a `ti.SolveInfo` from `ti.lissa`).
    """

    def __init__(self, message: str, info=None):
        super().__init__(message)
        self.info = info
