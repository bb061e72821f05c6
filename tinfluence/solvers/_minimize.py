"""Full-batch minimization of an objective, for training convex models to a tight optimum
and for retraining in leave-one-out checks.
"""

from __future__ import annotations

from typing import Callable

import optree
import torch

from ..core import checks
from ..core import tree as tr
from ..core.errors import ConvergenceError
from ..core.transforms import hvp
from ..core.tree import PyTree
from ._cg import cg_solve

__all__ = ["minimize"]


def minimize(f: Callable, params: PyTree, *, gtol: float = 1e-10, maxiter: int = 1000, history_size: int = 50,
             newton_steps: int = 0) -> PyTree:
    """Minimizes `f(params) -> 0-d tensor` by full-batch L-BFGS (strong Wolfe line search).

    L-BFGS alone stalls near 1e-10 in float64; `newton_steps` > 0 then polishes with up to
    that many Newton steps, each solving ∇²f Δ = ∇f by conjugate gradients on `ti.hvp`
    (relative residual 1e-12), which for a convex objective reach machine precision with
    no P×P matrix. Warm-starting from a nearby optimum (leave-one-out retraining)
    converges in a few iterations.

    Args:
      f: `params -> 0-d tensor`, differentiable, e.g. `ti.objective(loss, train, l2=...)`
        (without a process group).
      params: `dict[str, Tensor]`, the starting point (not modified).
      gtol: the bound on the gradient's max-norm, max |∂f/∂θ_i|.
      maxiter: L-BFGS iterations at most.
      history_size: L-BFGS memory (pairs of steps and gradient changes kept).
      newton_steps: Newton-CG polishing steps at most after L-BFGS (0: none).

    Returns:
      `dict[str, Tensor]` like `params` (detached, same dtype and device) whose gradient
      max-norm is <= `gtol`.

    Raises:
      ArgumentError: `params` is not a dict of finite floating tensors of one dtype and device;
        `gtol` is not a finite number > 0, or `maxiter`, `history_size`, `newton_steps` not ints
        in range.
      ValueError: `f` is an objective over a process group (its gradient is one rank's share).
      ConvergenceError: the gradient is still above `gtol` after `maxiter` iterations and the
        Newton steps (`err.info` = the final parameters); raise `maxiter`, or add `l2`.

    Cost: each L-BFGS iteration is one or a few evaluations of f and its gradient, plus
    O(history_size·P) work; memory O(history_size·P). Each Newton step is one gradient and
    up to 1000 HVPs (a few dozen for a well-conditioned convex objective).

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> theta = ti.minimize(R, ti.tree.zeros_like(params), gtol=1e-8)
      >>> gradient = torch.func.grad(R)(theta)
      >>> bool(max(g.abs().max() for g in gradient.values()) <= 1e-8)
      True
    """
    call = "ti.minimize"
    checks.params(call, params)
    checks.number(call, "gtol", gtol, minimum=0.0, exclusive=True)
    checks.integer(call, "maxiter", maxiter, minimum=1)
    checks.integer(call, "history_size", history_size, minimum=1)
    checks.integer(call, "newton_steps", newton_steps, minimum=0)
    if getattr(f, "group", None) is not None:
        raise ValueError("ti.minimize: `f` is an objective over a process group, whose autograd gradient is only this "
                         "rank's share; minimize the full objective in one process (ti.objective without `group`).")
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    opt = torch.optim.LBFGS(list(leaves.values()), lr=1.0, max_iter=maxiter, history_size=history_size,
                            tolerance_grad=gtol, tolerance_change=0.0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = f(leaves)
        value.backward()
        return value

    opt.step(closure)
    result = {k: v.detach() for k, v in leaves.items()}
    g = gradient(f, result)
    for _ in range(newton_steps):
        if max_norm(g) <= gtol:
            break
        step, _ = cg_solve(hvp(f, result), g, tol=1e-12, maxiter=1000)
        result = tr.sub(result, step)
        g = gradient(f, result)
    worst = max_norm(g)
    if not worst <= gtol:
        raise ConvergenceError(
            f"ti.minimize: gradient max-norm {worst:.3e} > gtol={gtol:g} after maxiter={maxiter} iterations; "
            "raise `maxiter` or `newton_steps`, loosen `gtol`, or add `l2` to the objective.", info=result)
    return result


def gradient(f: Callable, params: dict) -> dict:
    """∇f(θ) as a detached `dict` shaped like `params`, by one reverse pass (no functorch transform)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    return dict(zip(leaves, torch.autograd.grad(f(leaves), list(leaves.values()))))


def max_norm(tree) -> float:
    """The largest absolute entry over all leaves (the gradient max-norm that `gtol` bounds)."""
    return max(leaf.abs().max().item() for leaf in optree.tree_leaves(tree, namespace=""))
