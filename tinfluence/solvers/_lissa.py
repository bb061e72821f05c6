"""LiSSA (Agarwal, Bullins & Hazan, 2017): a stochastic Neumann-series recursion for (H + λI)⁻¹ v."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from tqdm.auto import tqdm

from ..core import checks
from ..core import collectives as dd
from ..core import data as D
from ..core import tree as tr
from ..core.objective import objective, per_example
from ..core.transforms import hvp
from ..core.tree import PyTree
from ._cg import _check_preconditioner, _dots, _where, true_residual, under_transform
from ._result import InverseOperator, Solution, SolveInfo, Status, check_on_failure

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["lissa", "lissa_solve"]

POWER_ITERATIONS = 20
SAFETY = 1.5          # scale = SAFETY × (largest eigenvalue estimate of H + λI, full data and mini-batches)
BATCHES_CHECKED = 10  # mini-batches whose curvature enters scale="auto"
CHECK_EVERY = 10      # depth steps between divergence / tolerance checks (one host sync each)
GROWTH = 10.0         # ‖h_j‖ > GROWTH·(j+1)·‖v‖ means divergence (a contraction keeps ‖h_j‖ ≤ (j+1)‖v‖)


class LissaState(NamedTuple):
    """The recursion's iterate for k right-hand sides (leaves `[k, ...]`) and its depth."""

    h: object
    depth: int


def _batch_hvp(loss: Callable, params: dict) -> Callable:
    """`(batch, U) -> ∇²(mean loss on batch) U` for a stack U (leading axis k), in one call.

    Reverse over reverse: the gradient's graph is built once per batch and pulled back
    along all k directions together (`is_grads_batched`), one product per step for all k;
    measured against `vmap(jvp(grad))` in docs/costs.md. The Hessian is symmetric, so the
    vector-Jacobian product of the gradient is the Hessian-vector product.
    """
    names = list(params)

    def apply(batch, U):
        with torch.enable_grad():
            leaves = [params[name].detach().requires_grad_(True) for name in names]
            value = loss(dict(zip(names, leaves)), batch).mean()
            g = torch.autograd.grad(value, leaves, create_graph=True, materialize_grads=True)
            HU = torch.autograd.grad(g, leaves, grad_outputs=[U[name] for name in names], is_grads_batched=True,
                                     allow_unused=True, materialize_grads=True)
        return dict(zip(names, (t.detach() for t in HU)))

    return apply


def _ids_hvp(loss: Callable, params: dict, train, group) -> Callable:
    """`(ids, U) -> ∇²(mean loss on the examples with global ids `ids`) U`, for a stack U.

    With a process group, `train` is this rank's shard: each rank takes the part of the
    mini-batch it holds (weighted by its share of the batch) and the products are summed
    over ranks, so every rank gets the product one process would.
    """
    batch_hvp = _batch_hvp(loss, params)
    if group is None:
        return lambda ids, U: batch_hvp(D.take(train, ids), U)
    n_local = D.num_examples(train)
    start, _ = dd.offset(n_local, group)

    def apply(ids, U):
        held = ids[(ids >= start) & (ids < start + n_local)] - start
        local = tr.scale(held.numel() / ids.numel(), batch_hvp(D.take(train, held), U)) if held.numel() else tr.zeros_like(U)
        return dd.all_reduce(local, group)

    return apply


def _lissa_step(batch_hvp: Callable, b, shift: float, scale: float, state: LissaState, batch,
                precondition: Callable) -> LissaState:
    """H ← b + h − P⁻¹(H_batch + shift·I) h / scale, with b = P⁻¹v (P = I: `precondition` the identity); pure."""
    Ah = precondition(tr.add_scaled(batch_hvp(batch, state.h), shift, state.h))
    return LissaState(tr.sub(tr.add(b, state.h), tr.scale(1.0 / scale, Ah)), state.depth + 1)


def _on_one(f: Callable) -> Callable:
    """A function on stacks as one on a single vector (a stack of one)."""
    return lambda u: tr.map(lambda t: t[0], f(tr.map(lambda t: t[None], u)))


def _power_iteration(apply: Callable, params, generator) -> float:
    """Estimate of the largest |eigenvalue| of a symmetric operator, by POWER_ITERATIONS products."""
    u = tr.random_like(params, generator=generator, kind="sphere")
    for _ in range(POWER_ITERATIONS):
        Au = apply(u)
        estimate = tr.norm(Au)
        u = tr.scale(1.0 / estimate, Au)
    return float(estimate)


def _auto_scale(loss, params, train, idx, *, full, shift, generator, group, preconditioner) -> float:
    """SAFETY × the largest eigenvalue estimate of P⁻¹(H + λI) (P = I without a preconditioner) over the
    full data (`full`) and the first BATCHES_CHECKED mini-batches the recursion will use.

    P⁻¹(H + λI) is similar to the symmetric P^{-1/2}(H + λI)P^{-1/2}: its eigenvalues are real and
    positive, and the power iteration's ‖P⁻¹A u‖ converges to the largest.
    """
    batch_hvp = _ids_hvp(loss, params, train, group)
    damped = lambda f: (lambda u: tr.add_scaled(_on_one(f)(u), shift, u))  # noqa: E731
    operators = [full.fn]
    operators += [damped(lambda U, i=i: batch_hvp(i, U)) for i in idx.reshape(-1, idx.shape[-1])[:BATCHES_CHECKED]]
    if preconditioner is not None:
        precondition = _on_one(preconditioner)
        operators = [lambda u, op=op: precondition(op(u)) for op in operators]
    return SAFETY * max(_power_iteration(op, params, generator) for op in operators)


def _prepare(where, loss, params, train, *, l2, damping, scale, depth, repeats, batch_size, generator, tol, chunk_size,
             group, preconditioner, x0):
    """Checks the options, draws every mini-batch index (global ids) up front, resolves `scale` and
    builds the full-data operator H + λI (for `scale="auto"` and the true residual).
    """
    checks.params(where, params)
    n_local = D._count_examples(train, name="train", call=where)
    n = dd.global_size(n_local, group)
    checks.number(where, "l2", l2, minimum=0.0)
    checks.number(where, "damping", damping, minimum=0.0)
    for name, value in (("depth", depth), ("repeats", repeats), ("batch_size", batch_size)):
        if isinstance(value, bool) or not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{where}: `{name}` must be an int >= 1; got {value!r}.")
    if tol is not None:
        checks.number(where, "tol", tol, minimum=0.0, exclusive=True)
    _check_preconditioner(where, preconditioner)
    if x0 is not None and not callable(x0):
        raise TypeError(f"{where}: `x0` must be None or a function V -> X0 on stacks (a warm start for each right-hand "
                        f"side, e.g. curv.ihvp of a fitted ti.ekfac); got {type(x0).__name__}.")
    if not (scale == "auto" or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                and math.isfinite(scale) and scale > 0)):
        raise ValueError(f'{where}: `scale` must be "auto" or a finite number > 0 (above half the largest eigenvalue '
                         f'of H + λI; scale="auto" estimates it); got {scale!r}.')
    local = tr.fork_generator(generator) if generator is not None else torch.Generator().manual_seed(0)
    device = tr.ravel(params).device
    idx = torch.randint(n, (repeats, depth, min(batch_size, n)), generator=local, device=local.device).to(device)
    per_example(loss, params, D.take(train, slice(0, min(batch_size, n_local))), where=where)
    dd._check_replicated(where, group, params=params, generator=idx, l2=l2, damping=damping,
                        scale=0.0 if scale == "auto" else scale)
    full = hvp(objective(loss, train, l2=l2, chunk_size=chunk_size, group=group), params,
               cache=False).damped(damping)
    if scale == "auto":
        scale = _auto_scale(loss, params, train, idx, full=full, shift=l2 + damping, generator=local, group=group,
                            preconditioner=preconditioner)
    return idx, float(scale), full


def _run(loss, params, train, v, idx, *, l2, damping, scale, tol, progress, group, preconditioner, x0):
    """Runs every repeat of the recursion on the stack `v`; returns (x, change [k], steps [k], diverged [k]).

    A right-hand side whose relative change meets `tol` stops updating (its steps stop counting)
    while the others go on; a repeat ends when all have. The recursion stops early, for every
    right-hand side, when one blows up (non-finite, or ‖h_j‖ > GROWTH·((j+1)·‖b‖ + ‖h₀ − b‖),
    b = P⁻¹v): the iterate is then meaningless and is reported so.
    """
    repeats, depth = idx.shape[:2]
    batch_hvp = _ids_hvp(loss, params, train, group)
    precondition = (lambda U: U) if preconditioner is None else preconditioner
    b = precondition(v)
    h0 = b if x0 is None else tr.scale(scale, x0(v))
    b_norm = torch.sqrt(_dots(b, b))                                    # [k]
    offset = tr.sub(h0, b)
    warm_norm = torch.sqrt(_dots(offset, offset))
    total = tr.zeros_like(v)
    change = torch.zeros_like(b_norm)
    steps = torch.zeros_like(b_norm, dtype=torch.long)
    diverged = torch.zeros_like(b_norm, dtype=torch.bool)
    bar = tqdm(total=repeats * depth, desc="ti.lissa", disable=not progress)
    for r in range(repeats):
        state, done = LissaState(h0, 0), torch.zeros_like(diverged)
        for j in range(depth):
            previous = state.h
            state = _lissa_step(batch_hvp, b, l2 + damping, scale, state, idx[r, j], precondition)
            state = LissaState(_where(done, previous, state.h), state.depth)
            steps = steps + (~done).long()
            bar.update(1)
            if (j + 1) % CHECK_EVERY and j + 1 < depth:
                continue
            h_norm = torch.sqrt(_dots(state.h, state.h))
            diverged = ~torch.isfinite(h_norm) | (h_norm > GROWTH * ((j + 2) * b_norm + warm_norm))
            diff = tr.sub(state.h, previous)
            change = torch.where(done, change, torch.sqrt(_dots(diff, diff)) / h_norm.clamp_min(torch.finfo(h_norm.dtype).tiny))
            if tol is not None:
                done = done | (change <= tol)
            if bool(diverged.any()) or bool(done.all()):
                break
        total = tr.add(total, state.h)
        if bool(diverged.any()):
            break
    bar.close()
    return tr.scale(1.0 / (repeats * scale), total), change, steps, diverged


def _solution(where, loss, params, train, v, idx, full, *, tol, depth, scale, damping, **options) -> Solution:
    """Single vector or stack: runs the recursion on a stack and judges it on the true residual."""
    stacked = full._is_stack(v, where)
    V = v if stacked else tr.map(lambda leaf: leaf.unsqueeze(0), v)
    x, change, steps, diverged = _run(loss, params, train, V, idx, tol=tol, scale=scale, damping=damping, **options)
    residual = true_residual(full.on_stacks(True), x, V)
    diverged = diverged | ~(residual < 1.0)                     # no better than x = 0
    met = torch.ones_like(diverged) if tol is None else change <= tol
    status = torch.where(diverged, Status.DIVERGED, torch.where(met, Status.CONVERGED, Status.MAX_ITERATIONS))
    info = SolveInfo(status.to(torch.long), steps, residual, torch.full_like(residual, float("nan")), solver=where,
                     tol=1.0 if tol is None else tol,
                     context={"depth": depth, "scale": scale, "damping": damping, "kind": "hessian",
                              "preconditioned": options["preconditioner"] is not None,
                              "dtype": residual.dtype})
    if stacked:
        return Solution(x, info)
    return Solution(tr.map(lambda leaf: leaf[0], x), info.single())


def lissa_solve(loss: Callable, params: PyTree, train: PyTree, v: PyTree, *, l2: float = 0.0, damping: float = 0.0,
                scale: float | str = "auto",
                depth: int = 1000, repeats: int = 1, batch_size: int = 16, generator: torch.Generator | None = None,
                tol: float | None = None, chunk_size: int | None = None, progress: bool = False, group: ProcessGroup | None = None,
                preconditioner: Callable | None = None, x0: Callable | None = None) -> Solution:
    """`ti.lissa(loss, params, train, ...).solve(v)`: returns `Solution(x, info)`, never raising for a
    numerical failure.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: `dict[str, Tensor]` at which H is taken.
      train: training set, leading axis n.
      v: the right-hand side, shaped like `params`, or a stack of k (leaves `[k, *shape]`).
      l2: as in `ti.lissa`.
      damping: as in `ti.lissa`.
      scale: as in `ti.lissa`.
      depth: as in `ti.lissa`.
      repeats: as in `ti.lissa`.
      batch_size: as in `ti.lissa`.
      generator: as in `ti.lissa`.
      tol: as in `ti.lissa`.
      chunk_size: as in `ti.lissa`.
      progress: as in `ti.lissa`.
      group: as in `ti.lissa`.
      preconditioner: as in `ti.lissa`.
      x0: as in `ti.lissa`.

    Returns:
      `ti.Solution(x, info)`, unpacking as `x, info = ti.lissa_solve(...)`: `x ≈ (H + λI)⁻¹ v`
      like `v`; `info` a `ti.SolveInfo`, fields `[k]` (0-d for one vector): status,
      recursion steps summed over repeats, and the true relative residual.

    Raises:
      ValueError: an invalid option, or `v` shaped neither like `params` nor a stack of them.
      TypeError: `preconditioner` or `x0` is not callable.

    Cost: as `ti.lissa`, for one solve.

    Examples:
      >>> v = ti.tree.stack([ti.tree.map(torch.ones_like, params)] * 3)
      >>> x, info = ti.lissa_solve(loss, params, train, v, l2=1e-2, damping=0.1, scale=1.0, depth=100, batch_size=60)
      >>> x["weight"].shape, info.status.shape, bool(info.converged.all())
      (torch.Size([3, 3, 8]), torch.Size([3]), True)
    """
    return _lissa(loss, params, train, l2=l2, damping=damping, scale=scale, depth=depth, repeats=repeats,
                 batch_size=batch_size, generator=generator, tol=tol, chunk_size=chunk_size, progress=progress,
                 group=group, preconditioner=preconditioner, x0=x0, where="ti.lissa_solve").solve(v)


def _lissa(loss: Callable, params, train, *, l2: float = 0.0, damping: float = 0.0, scale="auto", depth: int = 1000,
          repeats: int = 1, batch_size: int = 16, generator: torch.Generator | None = None, tol: float | None = None,
          chunk_size: int | None = None, progress: bool = False, group=None, on_failure: str = "raise",
          preconditioner: Callable | None = None, x0: Callable | None = None, where: str = "ti.lissa") -> InverseOperator:
    """`ti.lissa` for the public call `where` (the name its errors and diagnostics give)."""
    check_on_failure(where, on_failure)
    idx, scale, full = _prepare(where, loss, params, train, l2=l2, damping=damping, scale=scale, depth=depth,
                                repeats=repeats, batch_size=batch_size, generator=generator, tol=tol,
                                chunk_size=chunk_size, group=group, preconditioner=preconditioner, x0=x0)

    def solve(v) -> Solution:
        if under_transform(v):
            raise ValueError(f"{where}: LiSSA cannot run under torch.func.vmap or torch.compile: its divergence and "
                             "tolerance checks synchronize with the host. Call it outside the transform, or use "
                             "ti.cg(..., tol=None) or ti.direct inside it.")
        return _solution(where, loss, params, train, v, idx, full, l2=l2, damping=damping, scale=scale, tol=tol,
                         depth=depth, progress=progress, group=group, preconditioner=preconditioner, x0=x0)

    return InverseOperator(solve, on_failure=on_failure, solver=where)


def lissa(loss: Callable, params: PyTree, train: PyTree, *, l2: float = 0.0, damping: float = 0.0, scale: float | str = "auto",
          depth: int = 1000,
          repeats: int = 1, batch_size: int = 16, generator: torch.Generator | None = None, tol: float | None = None,
          chunk_size: int | None = None, progress: bool = False, group: ProcessGroup | None = None, on_failure: str = "raise",
          preconditioner: Callable | None = None, x0: Callable | None = None) -> InverseOperator:
    """Returns `ihvp`, which applies (H + λI)⁻¹ by the stochastic LiSSA recursion.

    With A = H + λI (H the Hessian of R(θ) = mean loss + (l2/2)‖θ‖² at `params`), M ≈ A⁻¹
    the preconditioner (M = I by default) and a fresh mini-batch B_j at every step,

        h₀ = M v,   h_j = M v + (I − M A_{B_j} / scale) h_{j−1},   x = h_depth / scale,

    averaged over `repeats` runs. Its fixed point is A⁻¹ v; its error shrinks like
    (1 − λ_min(MA)/scale)^depth. Every mini-batch id is drawn here from a copy of
    `generator`, so `ihvp` is deterministic. `scale="auto"`, the divergence test and `tol`:
    docs/design.md, "LiSSA".

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: `dict[str, Tensor]` at which H is taken.
      train: training set, leading axis n; mini-batches are drawn from it with replacement.
      l2: the objective's weight decay (H includes l2·I), as in `ti.objective`.
      damping: λ ≥ 0.
      scale: a number > 0 above half the largest eigenvalue of every M A_B, or "auto" (estimated).
      depth: recursion steps per repeat, an int ≥ 1.
      repeats: independent runs averaged (the variance falls like 1/repeats).
      batch_size: examples per mini-batch.
      generator: source of the mini-batch ids (copied, not advanced); None: seeded with 0.
      tol: a right-hand side stops updating once its relative change ‖h_j − h_{j−1}‖/‖h_j‖
        ≤ tol (checked every 10 steps); None: the full depth, judged only against divergence.
      chunk_size: examples per chunk in the full-data products.
      progress: show a tqdm bar over the recursion steps.
      group: a process group when `train` is this rank's shard (the result is one process's).
      on_failure: "raise" or "warn", as in `ti.cg`.
      preconditioner: `V -> M V` on stacks (leading axis k), M ≈ (H + λI)⁻¹ symmetric
        positive definite, e.g. a fitted `ti.ekfac`; None: M = I (plain LiSSA).
      x0: `V -> X0` on stacks, a warm start (h₀ = scale · x0(v)), e.g. `curv.ihvp`.

    Returns:
      `ihvp(v) -> x ≈ (H + λI)⁻¹ v`; `v` shaped like `params` or a stack of them (leading
      axis k, solved together), `x` like `v`. `ihvp.solve(v) -> ti.Solution(x, info)` never
      raises for a numerical failure; `info.relative_residual` is the TRUE residual.

    Raises:
      ValueError: an invalid option; at call time, `v` shaped neither like `params` nor a
        stack, or a call under torch.func.vmap or torch.compile.
      TypeError: `preconditioner` or `x0` is not callable.
      DivergenceError: from `ihvp(v)`, the recursion blew up or is no better than x = 0.
      ConvergenceError: from `ihvp(v)`, `tol` was not met within `depth`.

    Cost: repeats·depth mini-batch HVPs (each a few gradients on `batch_size` examples,
    batched over the k right-hand sides) and one full-data HVP for the residual;
    `scale="auto"` adds 20 full-data and 200 mini-batch HVPs, a preconditioner one
    application of M per step. Memory O(k·P) plus one chunk. Not vmappable.

    Examples:
      >>> ihvp = ti.lissa(loss, params, train, l2=1e-2, damping=0.1, scale=1.0, depth=100, batch_size=60,
      ...                 generator=torch.Generator().manual_seed(0))
      >>> v = ti.tree.map(torch.ones_like, params)
      >>> H = ti.hessian(ti.objective(loss, train, l2=1e-2), params) + 0.1 * torch.eye(27, dtype=torch.float64)
      >>> exact = ti.unravel(torch.linalg.solve(H, ti.ravel(v)), params)
      >>> bool(ti.tree.norm(ti.tree.sub(ihvp(v), exact)) < 1e-3 * ti.tree.norm(exact))
      True

    References:
      Agarwal, Bullins & Hazan, Second-order stochastic optimization for machine learning
      in linear time, JMLR 2017; Koh & Liang, ICML 2017 (its use for influence); Wang et al.,
      ASTRA (EK-FAC-preconditioned Neumann series for influence), 2025.
    """
    return _lissa(loss, params, train, l2=l2, damping=damping, scale=scale, depth=depth, repeats=repeats,
                  batch_size=batch_size, generator=generator, tol=tol, chunk_size=chunk_size, progress=progress,
                  group=group, on_failure=on_failure, preconditioner=preconditioner, x0=x0, where="ti.lissa")
