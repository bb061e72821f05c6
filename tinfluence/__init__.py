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
