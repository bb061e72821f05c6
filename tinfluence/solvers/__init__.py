"""Inverse-curvature products v ↦ (H + λI)⁻¹ v: dense (`direct`), conjugate gradients
(`cg`, many right-hand sides together, optionally preconditioned by `nystrom`) and the stochastic LiSSA recursion (`lissa`).

Each factory takes a `ti.LinearOperator` (or a matrix, for `direct`) and returns an
`InverseOperator`: `ihvp(v) -> x` on parameter pytrees (a leading axis k on `v` means k
right-hand sides solved together), and `ihvp.solve(v) -> Solution(x, info)` with one
`SolveInfo` for every solver. `eigenvalues` estimates the extreme eigenvalues (Lanczos).
"""

from ..core.errors import ConvergenceError, DivergenceError
from ._cg import cg, cg_solve
from ._direct import direct
from ._kfac import Curvature, ekfac, kfac
from ._lanczos import Eigenvalues, eigenvalues
from ._lissa import lissa, lissa_solve
from ._minimize import minimize
from ._nystrom import nystrom
from ._result import InverseOperator, Solution, SolveInfo, Status

__all__ = ["direct", "cg", "cg_solve", "nystrom", "kfac", "ekfac", "Curvature", "lissa", "lissa_solve", "eigenvalues", "Eigenvalues",
           "InverseOperator", "Solution", "SolveInfo", "Status", "minimize", "ConvergenceError", "DivergenceError"]
