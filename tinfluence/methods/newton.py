"""Beyond first order: Newton-corrected leave-one-out and group-removal estimates.

First-order influence linearizes twice: the retrained parameters (one Newton step on the
full-data curvature) and the measurement (its gradient). Here both are taken exactly up to
one Newton step: for each removed set S the step is taken on the objective *without* S,
with that objective's own curvature, and the measurement is evaluated at the new
parameters.

Normalization. Retraining without S minimizes the mean over the n − |S| kept examples plus
the same L2 term, as a user retraining would:

    R₋S(θ) = 1/(n−|S|) Σ_{i∉S} ℓ_i(θ) + (l2/2)‖θ‖²     (= ti.objective(loss, take(train, keep), l2=l2)).

With A = Σ_i ∇²ℓ_i(θ̂) over all n examples, H_S = Σ_{i∈S} ∇²ℓ_i(θ̂), G = Σ_i ∇ℓ_i(θ̂) and
G_S = Σ_{i∈S} ∇ℓ_i(θ̂), its gradient and Hessian at θ̂ are (G − G_S)/(n−|S|) + l2·θ̂ and
(A − H_S)/(n−|S|) + l2·I. The Newton step (with optional damping λ added to that Hessian)
is therefore, the common factor 1/(n−|S|) cancelling,

    Δ_S = −(A − H_S + c_S I)⁻¹ (G − G_S + (n−|S|)·l2·θ̂),    c_S = (n−|S|)(l2 + λ).

G is used as computed, so the step is exact for a quadratic objective even when θ̂ is not
exactly optimal.

Curvature. Given `predict` and `output_loss` (loss = output_loss(predict(θ, z), z)), every
example's curvature is its Gauss-Newton term H_i = J_iᵀ Ω_i J_i, with J_i = ∂o_i/∂θ
([O, P], O outputs) and Ω_i = ∂²output_loss/∂o_i² ([O, O]; for cross-entropy diag(p) − ppᵀ).
This equals the Hessian for models linear in θ (logistic or linear regression, a last
layer) and is a positive semi-definite approximation of it otherwise. A set S then
perturbs A by a matrix of rank ≤ O·|S|, and Δ_S follows from one eigendecomposition of A
(shared by every removal and every shift c_S) plus a Woodbury solve of size O·|S|. When
O·|S| ≥ P, or without `predict`, the removed curvature is formed densely ([P, P] per set;
without `predict` from exact per-example Hessians, for small P) and solved directly.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch.func import grad, jacrev, vmap

from ..core import checks
from ..core import collectives as dd
from ..core import data as D
from ..core import tree as tr
from ..core.errors import ConvergenceError
from ..core.objective import objective, per_example
from ..core.scoring import check_inputs
from ..core.transforms import grads, hessian_fn
from ..core.transforms import hessian as dense_hessian
from ..core.tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["newton_loo", "newton_step_without"]


def newton_loo(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, l2: float = 0.0,
               indices: Sequence[int] | torch.Tensor | None = None, groups: Sequence[Sequence[int] | torch.Tensor] | None = None,
               measure: Callable | None = None, predict: Callable | None = None,
               output_loss: Callable | None = None, damping: float = 0.0,
               chunk_size: int | None = None, group: ProcessGroup | None = None) -> torch.Tensor:
    """Returns Newton estimates of the change in a test measure when examples are removed, `[n_test, k]`.

        score[t, j] = m(θ̂ + Δ_{S_j}, z_t) − m(θ̂, z_t),

    m = `measure` (default `loss`), Δ_S one Newton step on the objective retrained without
    S (mean over the n − |S| kept examples plus the same `l2`; formula in the module
    docstring), m evaluated at the new parameters. Sign and scale of influence scores:
    it predicts m(θ̂ without S) − m(θ̂); positive = helpful. Second-order accurate for
    single removals; for groups it includes the removed examples' curvature and interaction.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: θ̂, the trained parameters (`dict[str, Tensor]`, possibly a subset; P numbers).
      train: the training set, leading axis n (with a group, this rank's shard).
      test: the test set, leading axis n_test; shaped like `train` unless a `measure` reads it.
      l2: the L2 coefficient of the training objective `ti.objective(loss, train, l2=l2)`.
      indices: k training ids, each removed on its own (a 1-D int tensor or list).
      groups: a list of k id lists or 1-D tensors, each removed as a whole. Exactly one of
        `indices` and `groups`; with a group, the ids are global.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m, vmapped over the k
        parameter sets (`torch.func.vmap`-safe); default `loss`.
      predict: `(params, batch) -> Tensor[B, ...]`, the model outputs; with `output_loss`,
        the Gauss-Newton curvature factors (fast for many removals).
      output_loss: `(outputs, batch) -> Tensor[B]`, `output_loss(predict(p, b), b) == loss(p, b)`.
      damping: λ ≥ 0 added to the Hessian of the retrained objective (default 0).
      chunk_size: examples per chunk in the passes over `train` and `test`.
      group: a process group when `train` is this rank's contiguous shard (shards in rank
        order, sizes may differ). `params`, `test`, the ids, `l2` and `damping` must be the
        same on every rank (checked); the sums over `train` are all-reduced and every rank
        returns the single-process result.

    Returns:
      `[n_test, k]` tensor, dtype and device of the parameters; positive = helpful.

    Raises:
      ValueError: both or neither of `indices`/`groups`; ids out of range, repeated in a
        group, or removing every example; only one of `predict`/`output_loss`, or the two
        not composing to `loss`; `l2` or `damping` < 0; bad data, loss or measure; with a
        group, replicated arguments that differ between ranks.
      TypeError: ids that are not integers; a non-callable `loss`, `measure` or `predict`.
      ConvergenceError: a Newton step is not finite (singular curvature); raise `damping`.

    Cost:
      Two passes over `train` (gradient and curvature sums; O(n·O) vector-Jacobian products
      with Gauss-Newton factors), one O(P³) eigendecomposition, one batched Woodbury solve
      of size O·|S| per distinct set size, the measure at k parameter sets in one vmap per
      test chunk; O(P² + k·P) memory. With a group the passes over `train` are split.

    Examples:
      >>> delta = ti.newton_loo(loss, params, train, test, l2=1e-2, indices=top_k,
      ...                       predict=predict, output_loss=output_loss)
      >>> delta.shape
      torch.Size([5, 4])
      >>> stepped = ti.newton_step_without(loss, params, train, l2=1e-2, remove=top_k[1:2],
      ...                                  predict=predict, output_loss=output_loss)
      >>> torch.allclose(delta[:, 1], loss(stepped, test) - loss(params, test))
      True
    """
    where = "ti.newton_loo"
    n_local, l2, damping = _check(where, loss, params, train, test, l2, damping, predict, output_loss, chunk_size,
                                  alike=measure is None)
    measure = loss if measure is None else checks.function(where, "measure", measure, "(params, batch) -> Tensor[B]")
    start, n = dd.offset(n_local, group)
    sets = _removals(where, n, indices, groups)
    ids = torch.cat(sets)
    removed = {"indices": ids} if groups is None else {"groups": (ids, torch.tensor([len(s) for s in sets]))}
    dd._check_replicated(where, group, params=params, test=test, **removed, l2=l2, damping=damping)
    stacked = _newton_params(where, loss, params, train, sets, l2=l2, damping=damping, predict=predict,
                             output_loss=output_loss, chunk_size=chunk_size, group=group, start=start, n=n)
    k = len(sets)
    at_all = vmap(measure, in_dims=(0, None))

    def changes(start, chunk):
        base = per_example(measure, params, chunk, where=where, name="measure")  # [b]
        checks.finite_chunk(where, "test", base, start, what="`measure` values")
        delta = at_all(stacked, chunk).reshape(k, -1) - base                   # [k, b]
        checks.finite_chunk(where, "test", delta.T, start, what="`measure` changes after the Newton steps",
                            hint="The stepped parameters make `measure` overflow: raise `damping`.")
        return delta

    return D._chunk_cat(changes, test, chunk_size, dim=1, call=where, indexed=True).T


def newton_step_without(loss: Callable, params: PyTree, train: PyTree, *, l2: float = 0.0, remove: Sequence[int] | torch.Tensor,
                        predict: Callable | None = None, output_loss: Callable | None = None,
                        damping: float = 0.0, chunk_size: int | None = None) -> dict:
    """Returns θ̂ + Δ: one Newton step from θ̂ on the objective retrained without `remove`.

    The objective is `ti.objective(loss, take(train, keep), l2=l2)`, the mean over the
    n − |S| kept examples plus the same L2 term (module docstring). For a quadratic
    objective (squared error on a linear model) this is the retrained minimizer exactly;
    otherwise it is the approximate retrained parameters that `ti.newton_loo` measures.

    Args:
      loss: as in `ti.newton_loo`.
      params: as in `ti.newton_loo`.
      train: as in `ti.newton_loo`.
      l2: as in `ti.newton_loo`.
      predict: as in `ti.newton_loo`.
      output_loss: as in `ti.newton_loo`.
      damping: as in `ti.newton_loo`.
      chunk_size: as in `ti.newton_loo`.
      remove: 1-D int tensor or list of the training ids removed together.

    Returns:
      Parameters with the structure, dtype and device of `params`.

    Raises:
      ValueError: as `ti.newton_loo`, with `remove` in place of a group.
      TypeError: as `ti.newton_loo`.
      ConvergenceError: as `ti.newton_loo`.

    Cost:
      As `ti.newton_loo` for one removed set, without the measure: two passes over `train`,
      one O(P³) eigendecomposition, one solve of size O·|S|; memory O(P²).

    Examples:
      >>> stepped = ti.newton_step_without(loss, params, train, l2=1e-2, remove=[0, 1, 2])
      >>> R = ti.objective(loss, ti.take(train, torch.arange(3, 60)), l2=1e-2)   # the retrained objective
      >>> size = lambda p: ti.ravel(torch.func.grad(R)(p)).norm()
      >>> bool(size(stepped) < 0.2 * size(params))    # the step goes most of the way to its optimum
      True
    """
    where = "ti.newton_step_without"
    n, l2, damping = _check(where, loss, params, train, None, l2, damping, predict, output_loss, chunk_size)
    sets = [_as_ids(where, "remove", remove, n, unique=True)]
    stacked = _newton_params(where, loss, params, train, sets, l2=l2, damping=damping,
                             predict=predict, output_loss=output_loss, chunk_size=chunk_size)
    return tr.map(lambda leaf: leaf[0], stacked)


def _check(where, loss, params, train, test, l2, damping, predict, output_loss, chunk_size, *,
           alike: bool = True) -> tuple:
    """`(n, l2, damping)` after the checks every Newton call makes (see `ti.newton_loo`'s Raises);
    `test` must be shaped like `train` when `alike` (no `measure` of its own).
    """
    check_inputs(where, loss, params, train, test, chunk_size=chunk_size, alike=alike)
    l2 = checks.number(where, "l2", l2, minimum=0.0)
    damping = checks.number(where, "damping", damping, minimum=0.0)
    checks.function(where, "predict", predict, "(params, batch) -> Tensor[B, ...]", none=True)
    checks.function(where, "output_loss", output_loss, "(outputs, batch) -> Tensor[B]", none=True)
    if (predict is None) != (output_loss is None):
        raise checks.ArgumentError(
            f"{where}: give both `predict` and `output_loss` (Gauss-Newton curvature factors) or "
            f"neither (exact per-example Hessians, small models); got only "
            f"`{'predict' if output_loss is None else 'output_loss'}`.")
    n = D._count_examples(train, name="train", call=where)
    if predict is not None:
        _check_consistent(where, loss, params, D.take(train, slice(0, CONSISTENCY_EXAMPLES)), predict, output_loss)
    return n, l2, damping


# Training examples on which `output_loss(predict(θ, z), z) == loss(θ, z)` is checked.
CONSISTENCY_EXAMPLES = 4


def _check_consistent(where, loss, params, batch, predict, output_loss) -> None:
    """Raises `ArgumentError` unless `output_loss(predict(θ, z), z)` equals `loss(θ, z)` to round-off on `batch`.

    The Gauss-Newton factors come from `predict` and `output_loss` and the gradients from
    `loss`; if they describe different objectives the Newton steps are silently wrong.
    Cost: two forward passes over `CONSISTENCY_EXAMPLES` examples.
    """
    with torch.no_grad():
        direct_ = per_example(loss, params, batch, where=where)
        outputs = predict(params, batch)
        if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or outputs.shape[0] != direct_.shape[0]:
            got = f"shape {list(outputs.shape)}" if isinstance(outputs, torch.Tensor) else type(outputs).__name__
            raise checks.ArgumentError(f"{where}: `predict` must return the model outputs `[B, ...]` "
                                       f"(B = {direct_.shape[0]}); it returned {got}.")
        composed = per_example(output_loss, outputs, batch, where=where, name="output_loss")
    tol = 1e3 * torch.finfo(direct_.dtype).eps * (1.0 + direct_.abs())
    if not bool(((composed - direct_).abs() <= tol).all()):
        raise checks.ArgumentError(
            f"{where}: `output_loss(predict(params, batch), batch)` must equal `loss(params, batch)` (the curvature "
            f"comes from `predict`/`output_loss`, the gradients from `loss`); on the first {direct_.shape[0]} "
            f"training examples they give {composed.tolist()} and {direct_.tolist()}. Make `predict` return the "
            "model outputs that `loss` feeds to `output_loss`, with the same reduction='none' loss.")


def _as_ids(where, name, value, n, *, unique) -> torch.Tensor:
    """`value` as a 1-D int64 tensor of training ids, checked against n."""
    ids = checks.ids(where, name, value, n, unique=unique)
    if unique and ids.numel() >= n:
        raise checks.ArgumentError(f"{where}: `{name}` removes all n={n} training examples; keep at least one.")
    return ids


def _removals(where, n, indices, groups) -> list:
    """The removed sets as a list of 1-D id tensors, from exactly one of `indices`/`groups`."""
    if (indices is None) == (groups is None):
        got = "both" if indices is not None else "neither"
        raise ValueError(f"{where}: give exactly one of `indices` (examples removed one at a time) or `groups` "
                         f"(lists of ids removed together); got {got}.")
    if indices is not None:
        return list(_as_ids(where, "indices", indices, n, unique=False).reshape(-1, 1))
    if isinstance(groups, torch.Tensor) or len(groups) == 0:
        raise ValueError(f"{where}: `groups` must be a non-empty list of id lists; got "
                         f"{'a tensor' if isinstance(groups, torch.Tensor) else 'an empty list'}. "
                         "For same-size groups pass list(ids_2d).")
    return [_as_ids(where, f"groups[{j}]", g, n, unique=True) for j, g in enumerate(groups)]


def _newton_params(where, loss, params, train, sets, *, l2, damping, predict, output_loss, chunk_size,
                   group=None, start: int = 0, n: int | None = None):
    """θ̂ + Δ_S for every set S, stacked: leaves `[k, *shape]` in the order of `sets`.

    With a process group, `train` is this rank's shard, holding the global ids
    [start, start + n_local) of n: the sums G and A are all-reduced (one collective), and
    so are the removed examples' terms (one per distinct set size), so every rank makes
    the same collective calls and takes the same steps.
    """
    n_local = D._count_examples(train, name="train", call=where)
    n = n_local if n is None else n
    theta = tr.ravel(params)
    G = n_local * tr.ravel(grad(objective(loss, train, chunk_size=chunk_size))(params))   # Σ_i ∇ℓ_i over the shard, [P]
    A = _curvature_sum(where, loss, params, train, predict, output_loss, chunk_size)       # Σ_i ∇²ℓ_i, [P, P]
    local_finite = bool(torch.isfinite(G.sum() + A.sum()))
    G, A = dd._all_reduce(where, (G, A), group)
    _check_sums(where, loss, params, train, G, A, chunk_size, local_finite)
    eigvals, Q = torch.linalg.eigh(A)
    norms = []
    sizes = torch.tensor([len(s) for s in sets])
    steps = theta.new_empty(len(sets), theta.numel())
    for size in sizes.unique().tolist():                 # one batched solve per distinct group size
        pos = (sizes == size).nonzero().flatten()
        ids = torch.stack([sets[j] for j in pos.tolist()]).to(theta.device)   # [g, s]
        c = (n - size) * (l2 + damping)
        removed, J, Omega = _removed_terms(where, loss, params, train, ids.flatten(), start, predict, output_loss,
                                           chunk_size, group)
        norms.append(removed.norm(dim=1))
        rhs = G - removed.reshape(*ids.shape, -1).sum(1) + (n - size) * l2 * theta         # [g, P]
        try:
            steps[pos.to(steps.device)] = -_solve_without(A, eigvals, Q, c, J, Omega, ids.shape, rhs)
        except torch.linalg.LinAlgError:
            raise _singular(where) from None
    if not bool(torch.isfinite(steps).all()):
        raise _singular(where)
    warn_if_not_stationary(where, G / n + l2 * theta, torch.cat(norms).mean() / n)
    return tr.unravel(theta + steps, params)


# ‖∇R(θ̂)‖ above this fraction of one example's share of the gradient, mean ‖∇ℓ_i‖/n, is warned about.
STATIONARY_FRACTION = 0.1


def warn_if_not_stationary(where: str, gradient: torch.Tensor, share: torch.Tensor) -> None:
    """Warns when ‖∇R(θ̂)‖ exceeds `STATIONARY_FRACTION` of `share`, one example's share of the gradient.

    Removing one example moves the optimum by about H⁻¹∇ℓ_z/n; a training gradient of that
    size moves it as much, so the estimates then mix the removal with the rest of training.
    Cost: one norm of the [P] gradient.
    """
    size, scale = float(gradient.norm()), float(share)
    if size > STATIONARY_FRACTION * scale:
        warnings.warn(
            f"{where}: `params` is far from a stationary point of the training objective: ‖∇R(θ)‖ = {size:.3g}, "
            f"{size / max(scale, torch.finfo(gradient.dtype).tiny):.3g}× one example's share of the gradient "
            f"(mean ‖∇ℓ_i‖/n = {scale:.3g}). Influence estimates assume θ̂ at the optimum of ti.objective(loss, train, "
            "l2=l2) with the same `l2`; train further (e.g. ti.minimize(R, params, gtol=1e-10)) or check `l2`.",
            stacklevel=3)


def _check_sums(where, loss, params, train, G, A, chunk_size, local_finite: bool = True) -> None:
    """Raises `ArgumentError` naming the examples and leaf when the gradient sum `G` or curvature
    sum `A` is not finite: one reduction each; the culprits are searched for only then, on the
    rank whose shard's sums were not finite (`local_finite` False; the ids are of that shard).
    """
    if bool(torch.isfinite(G.sum() + A.sum())):
        return
    if local_finite:
        raise checks.ArgumentError(
            f"{where}: the gradient or curvature sums of another rank's shard of `train` are not finite; that "
            "rank's error names the examples. Fix or drop them there.")
    grads(loss, params, train, chunk_size=chunk_size, call=where, data_name="train")   # raises naming the ids
    raise checks.ArgumentError(
        f"{where}: every training gradient is finite but the curvature sum is not; check `predict` and "
        "`output_loss` (or the loss's second derivatives) for overflow on `train`.")


def _removed_terms(where, loss, params, train, ids, start, predict, output_loss, chunk_size, group):
    """The removed examples' raveled gradients `[m, P]` and curvature factors (`_factors`), for global `ids` `[m]`.

    With a group each rank computes the terms of the ids in its shard [start, start + n_local)
    (one example of its own stands in when it holds none, to fix the shapes), zeros the
    others' rows and the ranks' terms are summed: one all-reduce of m·(P + O·P + O²) numbers
    (m·(P + P²) with exact Hessians).
    """
    n_local = D.num_examples(train)
    local = ids - start
    owned = ((local >= 0) & (local < n_local)).nonzero().flatten()
    rows = local[owned] if group is None or owned.numel() else local.new_zeros(1)
    batch = D.take(train, rows)
    removed = tr.ravel(grads(loss, params, batch, chunk_size=chunk_size, call=where, data_name="train"), batch_ndim=1)
    J, Omega = _factors(where, loss, params, batch, predict, output_loss)
    terms: tuple[torch.Tensor, ...] = (removed, Omega) if J is None else (removed, Omega, J)
    if group is not None:
        terms = tuple(t.new_zeros((ids.numel(), *t.shape[1:])).index_copy(0, owned, t[:owned.numel()]) for t in terms)
        terms = dd._all_reduce(where, terms, group)
    return terms[0], (None if J is None else terms[2]), terms[1]


def _singular(where) -> ConvergenceError:
    return ConvergenceError(f"{where}: a Newton step is not finite: the curvature of the objective without the "
                            "removed examples is singular. Raise `damping`, or pass `predict`/`output_loss` "
                            "for the positive semi-definite Gauss-Newton curvature.")


def _solve_without(A, eigvals, Q, c, J, Omega, shape, rhs):
    """(A − H_S + cI)⁻¹ rhs for g sets of s examples each; H_S = Σ_{i∈S} J_iᵀ Ω_i J_i.

    Woodbury when the removed rank r = O·s is below P, with B = A + cI applied through
    its eigendecomposition:
      (B − JᵀΩJ)⁻¹ v = B⁻¹v + B⁻¹Jᵀ (I − Ω J B⁻¹ Jᵀ)⁻¹ Ω J B⁻¹ v,
    which needs no inverse of Ω (singular for cross-entropy). Otherwise a batched dense
    solve with H_S formed explicitly.
    """
    g, s = shape
    P = A.shape[0]
    if J is None or s * J.shape[1] >= P:
        H_S = _dense_curvature(J, Omega).reshape(g, s, P, P).sum(1)                # [g, P, P]
        B = A + c * torch.eye(P, dtype=A.dtype, device=A.device)
        return torch.linalg.solve(B - H_S, rhs)
    O = J.shape[1]  # noqa: E741 - outputs per example, as in the docstrings
    Jg = J.reshape(g, s * O, P)                                                      # [g, r, P]
    eye_s = torch.eye(s, dtype=A.dtype, device=A.device)
    Om = torch.einsum("gsab,st->gsatb", Omega.reshape(g, s, O, O), eye_s).reshape(g, s * O, s * O)
    inv = 1.0 / (eigvals + c)                                                        # [P]
    B_inv = lambda X: Q @ (inv[:, None] * (Q.T @ X))                                 # noqa: E731, X [..., P, m]
    y = B_inv(rhs.T).T                                                               # [g, P]
    W = B_inv(Jg.transpose(1, 2))                                                    # [g, P, r]
    K = Jg @ W                                                                       # [g, r, r]
    eye_r = torch.eye(s * O, dtype=A.dtype, device=A.device)
    t = torch.linalg.solve(eye_r - Om @ K, Om @ (Jg @ y[..., None]))                # [g, r, 1]
    return y + (W @ t)[..., 0]


def _dense_curvature(J, Omega):
    """Per-example curvature matrices `[m, P, P]`: JᵀΩJ, or Ω itself when J is None."""
    return Omega if J is None else J.transpose(1, 2) @ Omega @ J


def _curvature_sum(where, loss, params, train, predict, output_loss, chunk_size):
    """A = Σ_i ∇²ℓ_i(θ̂) over the training set, `[P, P]`: Gauss-Newton or exact, chunk by chunk."""
    if predict is None:
        return D.num_examples(train) * dense_hessian(objective(loss, train, chunk_size=chunk_size), params)

    def chunk_term(chunk):
        J, Omega = _factors(where, loss, params, chunk, predict, output_loss)
        return torch.einsum("bop,boq->pq", J, Omega @ J)

    return D.chunk_sum(chunk_term, train, chunk_size)


def _factors(where, loss, params, batch, predict, output_loss):
    """Per-example curvature factors of `batch` (m examples): (J `[m, O, P]`, Ω `[m, O, O]`).

    Gauss-Newton: J_i = ∂predict_i/∂θ (raveled), Ω_i = ∂²output_loss/∂o_i². Without
    `predict`: (None, exact per-example Hessians `[m, P, P]`).
    """
    flat = tr.ravel(params)
    one = D.batch_of_one
    if predict is None:
        ex_loss = lambda x, ex: per_example(loss, tr.unravel(x, params), one(ex), where=where)[0]  # noqa: E731
        return None, vmap(hessian_fn(ex_loss), in_dims=(None, 0))(flat, batch)
    outputs = predict(params, batch)
    m = outputs.shape[0]
    out_one = lambda x, ex: predict(tr.unravel(x, params), one(ex)).reshape(-1)     # noqa: E731
    J = vmap(jacrev(out_one), in_dims=(None, 0))(flat, batch)                       # [m, O, P]
    shape = outputs.shape[1:]
    loss_one = lambda o, ex: per_example(output_loss, o.reshape(1, *shape), one(ex),  # noqa: E731
                                         where=where, name="output_loss")[0]
    Omega = vmap(hessian_fn(loss_one))(outputs.detach().reshape(m, -1), batch)      # [m, O, O]
    return J, Omega
