"""tinfluence: which training examples made the model do this?

A PyTorch model becomes a pure function of a parameter dict; per-example gradients,
curvature products and inverse-curvature solvers compose into influence estimators.
Every score follows one sign: score ≈ L_test(θ̂ without z) − L_test(θ̂), positive =
helpful (removing the example would raise the test loss).
"""

from . import data, tree
from .data import chunks, from_loader, num_examples, take
from .errors import ConvergenceError, DivergenceError
from .model import functionalize
from .objective import Objective, objective
from .optimize import minimize
from .transforms import ggn_vp, hessian, hvp, per_example_grad_fn, per_example_grads, to_dense
from .tree import ravel, unravel, vdot

__version__ = "0.1.0"

__all__ = [
    "data", "tree", "chunks", "from_loader", "num_examples", "take",
    "ConvergenceError", "DivergenceError", "functionalize", "minimize", "Objective", "objective",
    "ggn_vp", "hessian", "hvp", "per_example_grad_fn", "per_example_grads", "to_dense",
    "ravel", "unravel", "vdot",
]

from .checkpoints import load_checkpoints  # noqa: E402
from .methods.empirical_if import ReverseCheck, empirical_if, reverse_check  # noqa: E402
from .methods.similarity import grad_cos, grad_dot  # noqa: E402
from .methods.tracin import tracin, tracin_self_influence  # noqa: E402
__all__ += ["load_checkpoints", "ReverseCheck", "empirical_if", "reverse_check", "grad_cos", "grad_dot",
            "tracin", "tracin_self_influence"]

from .validate import (LDSResult, lbfgs_trainer, lds, leave_one_out, pearson, sign_agreement,  # noqa: E402
                       spearman, topk_overlap)
__all__ += ["LDSResult", "lbfgs_trainer", "lds", "leave_one_out", "pearson", "sign_agreement", "spearman",
            "topk_overlap"]

from .solvers import CGState, LissaState, SolveInfo, cg, cg_solve, direct, lissa, lissa_solve, nystrom  # noqa: E402
from .methods.influence import influence, self_influence  # noqa: E402

__all__ += ["direct", "cg", "cg_solve", "nystrom", "lissa", "lissa_solve", "SolveInfo", "CGState", "LissaState",
            "influence", "self_influence"]

from .methods.newton import newton_loo, newton_step_without  # noqa: E402
__all__ += ["newton_loo", "newton_step_without"]
from .validate import newton_trainer  # noqa: E402
__all__ += ["newton_trainer"]
from . import plot  # noqa: E402
__all__ += ["plot"]
from . import distributed  # noqa: E402
__all__ += ["distributed"]
from . import io  # noqa: E402
from .io import influence_to_files  # noqa: E402
__all__ += ["io", "influence_to_files"]
from .knn import knn_candidates  # noqa: E402
__all__ += ["knn_candidates"]
from . import factored  # noqa: E402
__all__ += ["factored"]
from .kfac import ekfac, kfac  # noqa: E402
__all__ += ["kfac", "ekfac"]
