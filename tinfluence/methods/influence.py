"""Classic influence functions (Koh & Liang, 2017): (1/n) ∇m(test)ᵀ (H + λI)⁻¹ ∇ℓ(z)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal, overload

import optree
import torch
import torch.distributed as dist
from torch.func import vmap

from ..core import checks
from ..core import collectives as dd
from ..core import data as D
from ..core import factored as fa
from ..core import tree as tr
from ..core.scoring import check_factored, check_inputs, grad_kernel, over_train
from ..core.transforms import grad_fn, grads
from ..core.tree import PyTree
from ..solvers._result import SolveInfo, report

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["influence", "self_influence"]


@overload
def influence(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, ihvp: Callable,
              measure: Callable | None = None, chunk_size: int | None = None, candidates: torch.Tensor | None = None,
              group: ProcessGroup | None = None, gather: bool = True, return_info: Literal[False] = ...,
              factored: bool = False) -> torch.Tensor: ...
@overload
def influence(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, ihvp: Callable,
              measure: Callable | None = None, chunk_size: int | None = None, candidates: torch.Tensor | None = None,
              group: ProcessGroup | None = None, gather: bool = True, return_info: Literal[True],
              factored: bool = False) -> tuple[torch.Tensor, SolveInfo]: ...
@overload
def influence(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, ihvp: Callable,
              measure: Callable | None = None, chunk_size: int | None = None, candidates: torch.Tensor | None = None,
              group: ProcessGroup | None = None, gather: bool = True, return_info: bool,
              factored: bool = False) -> torch.Tensor | tuple[torch.Tensor, SolveInfo]: ...
def influence(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, ihvp: Callable,
              measure: Callable | None = None, chunk_size: int | None = None, candidates: torch.Tensor | None = None,
              group: ProcessGroup | None = None, gather: bool = True, return_info: bool = False,
              factored: bool = False) -> torch.Tensor | tuple[torch.Tensor, SolveInfo]:
    """Returns the influence of every training example on every test example, `[n_test, n_train]`.

        score[t, i] = (1/n) ∇_θ m(θ̂, z_t)ᵀ (H + λI)⁻¹ ∇_θ ℓ(θ̂, z_i),

    m = `measure` (default `loss`), n the number of training examples, `ihvp = v ↦ (H + λI)⁻¹ v`
    for H the Hessian (or Gauss-Newton matrix) of R(θ) = (1/n) Σ ℓ(θ, z_i) + (l2/2)‖θ‖².
    Sign: the score predicts m_t(θ̂ without z_i) − m_t(θ̂); POSITIVE = helpful. It equals
    −I_up,loss / n of Koh & Liang (removing z is up-weighting it by ε = −1/n).

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: `dict[str, Tensor]` at the optimum θ̂ (or a trainable subset, the rest closed over by `loss`).
      train: training set, a pytree of tensors with leading axis n.
      test: test set, leading axis n_test; `train`'s structure unless a `measure` reads it.
      ihvp: `v ↦ (H + λI)⁻¹ v` on a stack (leading axis k): `ti.direct`, `ti.cg`, `ti.lissa`, `ti.ekfac(...).ihvp`.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m; default `loss`.
      chunk_size: training examples per vectorized gradient pass (default 1024).
      candidates: LongTensor `[n_test, k]` of training ids (e.g. `ti.knn_candidates`): only these
        pairs are scored, from the gradients of the distinct ids; result `[n_test, k]` in that order.
      group: a process group when `train` is this rank's contiguous shard (`ti.distributed.shard`);
        `params` and `test` replicated (checked), `ihvp` reducing over the group, n global.
      gather: with a group, all-gather the full `[n_test, n_train]` (True) or return this rank's
        columns `[n_test, n_local]` (False). With `candidates` every rank returns `[n_test, k]`.
      return_info: also return the `ti.SolveInfo` of the test-gradient solve (needs `ihvp.solve`).
      factored: True takes each training chunk's gradients of linear, conv and embedding weights as
        their factors (layer inputs or patches or ids, and output gradients, `ti.factored`) and meets them with the solved test stack by
        `ti.factored.dense_gram`, never forming them; other parameters as usual. The same scores
        to round-off, with `candidates` and `group` alike.

    Returns:
      Tensor `[n_test, n_train]` (`[n_test, k]` with `candidates`, `[n_test, n_local]` with
      `gather=False`), dtype and device of `params`; positive = helpful. With `return_info`,
      `(scores, info)`.

    Raises:
      ArgumentError (TypeError and ValueError): bad `loss`, `params`, data, `chunk_size`, flags
        (`gather`, `return_info`, `factored`) or `candidates` (not integer ids `[n_test, k]` in [0, n)).
      ValueError: `ihvp` returns other than a finite stack shaped like its input (TypeError for a
        non-tensor leaf); with a group, the ranks' `params` or `test` differ.
      RuntimeError: with `factored=True`, the forward makes other `F.linear`, conv or embedding calls
        under vmap.
      ti.distributed.CollectiveError: with a group, a peer died or stalled past the timeout.

    Cost:
      One gradient pass over test, ONE `ihvp` call on the n_test × P stack, one gradient pass over
      train (chunk by chunk, each chunk met by all test directions in one product): O(n_test·n·P)
      for the products. Memory: 2·n_test·P + chunk_size·P + n_test·n. With `factored`, a linear
      layer `[out, in]` applied once per example holds chunk_size·(in + out) numbers instead of
      chunk_size·in·out (see `ti.factored.dense_gram`).

    Examples:
      >>> ihvp = ti.direct(ti.hessian(ti.objective(loss, train, l2=1e-2), params))
      >>> scores = ti.influence(loss, params, train, test, ihvp=ihvp)
      >>> scores.shape
      torch.Size([5, 60])
      >>> torch.allclose(ti.influence(loss, params, train, test, ihvp=ihvp, factored=True), scores)
      True

    References:
      Koh & Liang, Understanding black-box predictions via influence functions, ICML 2017.
    """
    call = "ti.influence"
    check_inputs(call, loss, params, train, test, chunk_size=chunk_size, alike=measure is None)
    checks.flag(call, "gather", gather)
    checks.flag(call, "return_info", return_info)
    check_factored(call, factored)
    n_local = D._count_examples(train, name="train", call=call)
    n_test = D._count_examples(test, name="test", call=call)
    dd._check_replicated(call, group, params=params, test=test)
    start, n = dd.offset(n_local, group)
    if candidates is not None:
        _check_candidates(candidates, n_test, n)
    G_test = grads(measure or loss, params, test, chunk_size=chunk_size, call=call,
                   name="loss" if measure is None else "measure", data_name="test")             # leaves [n_test, ...]
    U, info = checked_solve(call, ihvp, G_test, with_info=return_info)                        # leaves [n_test, ...]
    pairwise = fa.dense_gram if factored else tr.pairwise_vdot
    if candidates is not None:
        kernel = grad_kernel(loss, factored, call, "loss", keep=fa.for_dense_products)
        scores = _candidate_scores(kernel, pairwise, params, train, U, candidates, start, n_local, chunk_size,
                                   group) / n
    else:
        local = over_train(lambda G: pairwise(U, G), loss, params, train, chunk_size=chunk_size, where=call,
                           factored=factored, keep=fa.for_dense_products) / n
        scores = dd.gather_columns(local, group) if gather else local
    return scores if info is None else (scores, info)   # info is None exactly when not return_info


def _candidate_scores(kernel, pairwise, params, train, U, candidates, start, n_local, chunk_size,
                      group) -> torch.Tensor:
    """`[n_test, k]`: U[t]ᵀ ∇ℓ(z_{candidates[t, j]}), from the gradients of the distinct ids held here
    (`kernel(params, chunk)`, met by `pairwise(U, G) -> [n_test, c]`).

    A rank fills the entries whose ids fall in its shard [start, start + n_local), zero
    elsewhere, and the ranks' results are summed.
    """
    ids = candidates.to(tr.ravel(U).device)
    distinct = torch.unique(ids)
    mine = distinct[(distinct >= start) & (distinct < start + n_local)]
    out = torch.zeros(ids.shape, dtype=tr.ravel(U).dtype, device=ids.device)
    if mine.numel():
        picked = D.take(train, mine - start)
        S = D.chunk_cat(lambda chunk: pairwise(U, kernel(params, chunk)), picked, chunk_size, dim=1)
        position = torch.searchsorted(mine, ids).clamp_max(mine.numel() - 1)
        held = mine[position] == ids
        out = torch.where(held, S.gather(1, position), out)
    return dd.all_reduce(out, group)


def _check_candidates(candidates, n_test: int, n: int) -> None:
    """`candidates` must be an integer `[n_test, k]` tensor of ids in [0, n)."""
    if not isinstance(candidates, torch.Tensor) or candidates.is_floating_point() or candidates.dtype == torch.bool \
            or candidates.dim() != 2 or candidates.shape[0] != n_test:
        got = f"{candidates.dtype} tensor of shape {list(candidates.shape)}" if isinstance(candidates, torch.Tensor) \
            else type(candidates).__name__
        raise ValueError(f"ti.influence: `candidates` must be an integer tensor [n_test={n_test}, k] of training ids "
                         f"(e.g. from ti.knn_candidates); got {got}.")
    if candidates.numel() and (int(candidates.min()) < 0 or int(candidates.max()) >= n):
        raise ValueError(f"ti.influence: `candidates` must hold training ids in [0, {n}); "
                         f"got values in [{int(candidates.min())}, {int(candidates.max())}].")


def self_influence(loss: Callable, params: PyTree, train: PyTree, *, ihvp: Callable, chunk_size: int | None = None,
                   group: ProcessGroup | None = None) -> torch.Tensor:
    """Returns each training example's influence on its own loss, `[n_train]`.

        score[i] = (1/n) ∇ℓ(θ̂, z_i)ᵀ (H + λI)⁻¹ ∇ℓ(θ̂, z_i)  (≥ 0 when H + λI is positive definite),

    the diagonal of `ti.influence(loss, params, train, train, ...)` without the n × n matrix:
    how much z_i's own loss would rise if it were removed. Large values flag memorized,
    mislabeled or atypical examples. There is no `factored` option: the training gradients
    are the right-hand sides of the solve, so they are formed anyway.

    With a group the ranks work in rounds (each contributing up to ⌈chunk_size / world⌉ of its
    own gradients, all-gathered), so a collective `ihvp` receives the same right-hand sides on
    every rank whatever the shard sizes.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: `dict[str, Tensor]` at the optimum θ̂.
      train: training set, leading axis n.
      ihvp: `v ↦ (H + λI)⁻¹ v` accepting a stack.
      chunk_size: right-hand sides per `ihvp` call (default 1024; with a group, summed over ranks).
      group: a process group when `train` is this rank's shard (see `ti.influence`); shards may
        differ in size.

    Returns:
      Tensor `[n_train]` (gathered in rank order with a group), dtype and device of `params`;
      positive = helpful to itself.

    Raises:
      ArgumentError (TypeError and ValueError): bad `loss`, `params`, `train` or `chunk_size`.
      ValueError: `ihvp` returns other than a finite stack shaped like its input (TypeError for a
        non-tensor leaf); with a group, the ranks' `params` differ.

    Cost:
      One gradient pass over train and ⌈n / chunk_size⌉ `ihvp` calls on stacks of chunk_size;
      memory 2·chunk_size·P + n. With a group, one all-gather of ≤ chunk_size·P numbers per round.

    Examples:
      >>> ihvp = ti.direct(ti.hessian(ti.objective(loss, train, l2=1e-2), params))
      >>> s = ti.self_influence(loss, params, train, ihvp=ihvp)
      >>> torch.allclose(s, ti.influence(loss, params, train, train, ihvp=ihvp).diagonal())
      True
    """
    check_inputs("ti.self_influence", loss, params, train, chunk_size=chunk_size)
    n_local = D._count_examples(train, name="train", call="ti.self_influence")
    dd._check_replicated("ti.self_influence", group, params=params)
    counts = dd.sizes(n_local, group)                                   # [world]
    kernel = grad_fn(loss, call="ti.self_influence")
    pair = vmap(tr.vdot)
    rank = 0 if group is None else dist.get_rank(group)
    per_rank = max(1, -(-(chunk_size or D.DEFAULT_CHUNK_SIZE) // len(counts)))
    parts = []
    for bounds in dd.rounds(counts, per_rank):                          # the same schedule on every rank
        rows = bounds[:, 1] - bounds[:, 0]                              # [world] rows of each rank this round
        start, stop = (int(b) for b in bounds[rank])
        mine = D.take(train, slice(start, stop))
        G = kernel(params, mine) if stop > start else tr.map(lambda p: p.new_zeros((0, *p.shape)), params)
        checks.finite_chunk("ti.self_influence", "train", G, start)
        U, _ = checked_solve("ti.self_influence", ihvp, dd._gather_rows("ti.self_influence", G, rows, group))
        if stop > start:
            first = int(rows[:rank].sum())
            parts.append(pair(G, tr.map(lambda leaf, a=first, b=first + stop - start: leaf[a:b], U)))
    local = torch.cat(parts) if parts else tr.ravel(params).new_zeros(0)
    return dd.gather_columns(local / int(counts.sum()), group)


def checked_solve(where: str, ihvp: Callable, V: PyTree, *, with_info: bool = False) -> tuple[PyTree, SolveInfo | None]:
    """`(ihvp(V), info)` for a stack `V` (leaves `[k, ...]`), checked to be a finite stack shaped like `V`.

    A solver returning another number of vectors, another structure, shape, dtype or
    device, or a NaN/inf would otherwise turn into a silently wrong score matrix. Costs
    one host sync (the finiteness test). `info` is the `ti.SolveInfo` of `ihvp.solve(V)`
    with `with_info` (the solver's `on_failure` policy applied to it), else None.
    """
    if with_info:
        solve = getattr(ihvp, "solve", None)
        if not callable(solve):
            raise TypeError(f"{where}: `return_info=True` needs a solver of the library (ti.cg, ti.lissa, ti.direct, "
                            f"ti.ekfac(...).ihvp), whose `ihvp.solve(v)` reports its diagnostics; got "
                            f"{type(ihvp).__name__}. Drop return_info for a plain function.")
        U, info = solve(V)
        report(info, getattr(ihvp, "on_failure", "raise"), stacklevel=4)
    else:
        U, info = ihvp(V), None
    expected, got = optree.tree_structure(V, namespace=""), optree.tree_structure(U, namespace="")
    fix = ("`ihvp` must map a stack of k vectors (leaves [k, ...]) to (H + λI)⁻¹ applied to each, a stack of the "
           "same structure, shapes, dtype and device (ti.direct, ti.cg, ti.lissa do)")
    if expected != got:
        raise ValueError(f"{where}: `ihvp` returned structure {got} for an input of structure {expected}; {fix}.")
    paths, leaves, _ = optree.tree_flatten_with_path(V, namespace="")
    outputs = optree.tree_leaves(U, namespace="")
    k = leaves[0].shape[0]
    for path, v, u in zip(paths, leaves, outputs):
        name = ".".join(map(str, path))
        if not isinstance(u, torch.Tensor):
            raise TypeError(f"{where}: `ihvp` returned a {type(u).__name__} for leaf {name!r}; {fix}.")
        if u.shape != v.shape:
            count = f" ({u.shape[0] if u.dim() else 'no'} vectors for k={k} right-hand sides)" \
                if u.dim() == 0 or u.shape[0] != k else ""
            raise ValueError(f"{where}: `ihvp` returned leaf {name!r} of shape {list(u.shape)} for an input of shape "
                             f"{list(v.shape)}{count}; {fix}.")
        if u.dtype != v.dtype or u.device != v.device:
            raise ValueError(f"{where}: `ihvp` returned leaf {name!r} as {u.dtype} on {u.device} for an input "
                             f"{v.dtype} on {v.device}; {fix}.")
    finite = torch.stack([torch.isfinite(u).all() for u in outputs])
    if not bool(finite.all()):
        bad = [".".join(map(str, p)) for p, ok in zip(paths, finite.tolist()) if not ok]
        raise ValueError(f"{where}: `ihvp` returned NaN or inf in leaf {bad[0]!r}: the solve failed. For ti.cg or "
                         "ti.lissa raise `damping` (or LiSSA's `scale`), and keep on_failure='raise' to see why.")
    return U, info
