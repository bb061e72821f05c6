"""tinfluence: which training examples made the model do this?

A PyTorch model becomes a pure function of a parameter dict; per-example gradients,
curvature products and inverse-curvature solvers compose into influence estimators.
Every score follows one sign: score ≈ L_test(θ̂ without z) − L_test(θ̂), positive =
helpful (removing the example would raise the test loss).

The package folders are the layers of docs/design.md: `core` (pytrees, model, data,
objective, kernels), `solvers`, `methods` (the estimators), `validate`, then the edges
(`io`, `plot`, `distributed`, `cli`, `demo`).
"""

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version

from . import distributed, io, plot, text
from .core import data, factored, optim, tree
from .core.data import chunks, from_loader, num_examples, take
from .core.errors import ConvergenceError, DivergenceError
from .core.model import Checkpoint, functionalize
from .core.objective import Objective, objective
from .core.operator import LinearOperator
from .core.transforms import ggn_vp, hessian, hvp, per_example_grad_fn, per_example_grads, to_dense
from .core.tree import ravel, unravel, vdot
from .io import influence_to_files, load_checkpoints
from .methods.compressed import (ProjectedCurvature, Projector, compressed_grad_fn, compressed_grads,
                                 compressed_influence, projected_curvature, projector)
from .methods.tokens import query_token_influence, token_grads, train_token_influence
from .methods.empirical_if import ReverseCheck, empirical_if, reverse_check
from .methods.influence import influence, self_influence
from .methods.knn import knn_candidates
from .methods.newton import newton_loo, newton_step_without
from .methods.similarity import grad_cos, grad_dot
from .methods.tracin import tracin, tracin_self_influence
from .methods.trajectory import TrainingRun, group_influence, replay_effect, training_run, trajectory_influence
from .solvers import (Curvature, Eigenvalues, InverseOperator, Solution, SolveInfo, Status, cg, cg_solve, direct, ekfac,
                      eigenvalues, kfac, lissa, lissa_solve, minimize, nystrom)
from .validate import (LDSResult, lbfgs_trainer, lds, leave_one_out, newton_trainer, pearson, sign_agreement,
                       spearman, topk_overlap)

try:
    __version__ = version("tinfluence")
except PackageNotFoundError:   # run from a source tree that was never installed
    __version__ = "0+unknown"

# The import paths of the modules that moved into `core` keep working (`tinfluence.tree`, ...).
for _name in ("data", "errors", "factored", "model", "objective", "operator", "optim", "scoring", "transforms", "tree"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"{__name__}.core.{_name}")
del _name

__all__ = [
    # namespaces
    "data", "tree", "factored", "optim", "distributed", "io", "plot", "text",
    # core: model, data, objective, kernels
    "functionalize", "chunks", "from_loader", "num_examples", "take", "Objective", "objective",
    "per_example_grad_fn", "per_example_grads", "hvp", "ggn_vp", "hessian", "to_dense", "ravel", "unravel", "vdot",
    # solvers
    "LinearOperator", "direct", "cg", "cg_solve", "nystrom", "lissa", "lissa_solve", "kfac", "ekfac", "Curvature",
    "minimize", "eigenvalues",
    "Eigenvalues", "InverseOperator", "Solution", "SolveInfo", "Status", "ConvergenceError", "DivergenceError",
    # estimators
    "influence", "self_influence", "tracin", "tracin_self_influence", "empirical_if", "reverse_check", "ReverseCheck",
    "grad_dot", "grad_cos", "newton_loo", "newton_step_without", "knn_candidates",
    "training_run", "TrainingRun", "trajectory_influence", "group_influence", "replay_effect",
    # validation and result files
    "leave_one_out", "lbfgs_trainer", "newton_trainer", "pearson", "spearman", "topk_overlap", "sign_agreement",
    "lds", "LDSResult", "influence_to_files", "load_checkpoints", "Checkpoint",
    # compressed gradients (LoGra), projected curvature
    "Projector", "projector", "compressed_grad_fn", "compressed_grads", "ProjectedCurvature", "projected_curvature",
    "compressed_influence", "token_grads", "query_token_influence", "train_token_influence",
]
