"""Inverse-curvature products v ↦ (H + λI)⁻¹ v: dense (`direct`), conjugate gradients
(`cg`, many right-hand sides together, optionally preconditioned by `nystrom`) and the stochastic LiSSA recursion (`lissa`).

Each factory returns a pure `ihvp(v)` on parameter pytrees; a leading axis k on `v`
means k right-hand sides solved together.
"""

from ..core.errors import ConvergenceError, DivergenceError
from ._cg import CGState, SolveInfo, cg, cg_solve
from ._direct import direct
from ._lissa import LissaState, lissa, lissa_solve
from ._minimize import minimize
from ._nystrom import nystrom

__all__ = ["direct", "cg", "cg_solve", "nystrom", "SolveInfo", "CGState", "lissa", "lissa_solve", "LissaState", "minimize", "ConvergenceError", "DivergenceError"]
