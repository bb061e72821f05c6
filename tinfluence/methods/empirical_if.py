"""EmpiricalIF: influence from loss changes under small parameter perturbations (Liu et al. 2022),
and the reverse check that perturbs along training gradients instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import torch
from torch.func import vmap

from ..core import checks
from ..core import collectives as dd
from ..core import data as D
from ..core import tree as tr
from ..core.objective import example_loss, per_example
from ..core.scoring import check_inputs, measure_or_loss, row_sq_norms, stacked_grads
from ..core.tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["empirical_if", "reverse_check", "ReverseCheck"]


def _unit_rows(G):
    """Each row of a stack scaled to unit norm; a zero row stays zero."""
    norms = row_sq_norms(G).sqrt()
    norms = norms.clamp_min(torch.finfo(norms.dtype).tiny)
    return tr.map(lambda leaf: leaf / norms.reshape(-1, *([1] * (leaf.dim() - 1))), G)


def _plus_minus(params, radius: float, V):
    """Stack of 2k parameter sets: θ + r·V[i] for i < k, then θ − r·V[i]."""
    return tr.map(lambda p, v: torch.cat([p + radius * v, p - radius * v]), params, V)


def _paired_products(d_a: torch.Tensor, d_b: torch.Tensor) -> torch.Tensor:
    """½ (d_a⁺·d_b⁺ + d_a⁻·d_b⁻) per direction: `d_a` `[2k]`, `d_b` `[2k, c]` -> `[k, c]`."""
    k = d_a.shape[0] // 2
    return 0.5 * (d_a[:k, None] * d_b[:k] + d_a[k:, None] * d_b[k:])


def _averaged_products(d_a: torch.Tensor, d_b: torch.Tensor) -> torch.Tensor:
    """(1/2m) Σ_k Σ_± d_a±_k·d_b±_k: `d_a` `[2m, n_test]`, `d_b` `[2m, c]` -> `[n_test, c]`."""
    return d_a.T @ d_b / d_a.shape[0]


def empirical_if(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, measure: Callable | None = None, radius: float = 1e-3,
                 directions: int | None = None, generator: torch.Generator | None = None,
                 chunk_size: int | None = None, group: ProcessGroup | None = None) -> torch.Tensor:
    """Returns EmpiricalIF scores from value changes under perturbations of θ, `[n_test, n_train]`.

    Test side m = `measure` (default `loss`), training side ℓ. Ascent/descent (default):
    per test point u = ∇m/‖∇m‖, θ± = θ ± r·u, ΔM± = m(θ±, z_test) − m(θ, z_test),
    Δℓ±(z) = ℓ(θ±, z) − ℓ(θ, z), and

        score(z_test, z) = ½ (ΔM⁺·Δℓ⁺(z) + ΔM⁻·Δℓ⁻(z)).

    Sphere (`directions=k`): the same averaged over k random unit directions shared by all
    test points. Sign: positive = helpful (the sign of `ti.grad_dot` with the same
    `measure`): moving θ changes ℓ(z) the way it changes m. Scale: odd orders in r cancel,
    so score = r²·⟨∇m, ∇ℓ⟩ + O(r⁴) (ascent/descent), E[score] = (r²/P)·⟨∇m, ∇ℓ⟩ + O(r⁴)
    (sphere, P parameters); compare rankings.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss ℓ.
      params: `dict[str, Tensor]`, usually the trained θ̂.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test; shaped like `train` unless a `measure` reads it.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m, `torch.func.vmap`-safe
        (it is vmapped over the perturbed parameters); default `loss`.
      radius: step length r > 0 of every perturbation (‖θ± − θ‖ = r).
      directions: k >= 1 random directions (sphere variant); None for ascent/descent.
      generator: required with `directions`; its state is copied, not advanced.
      chunk_size: training examples per forward pass (default 1024).
      group: a process group when `train` is this rank's contiguous shard (as `ti.grad_dot`;
        `generator` is checked alike on every rank too).

    Returns:
      `[n_test, n_train]` tensor, dtype and device of the parameters; positive = helpful.

    Raises:
      ValueError: radius <= 0, directions < 1, a `generator` missing with (or given
        without) `directions`; bad parameters or data; a loss or measure that is not one
        value per example, or not finite at θ or θ±; with a group, ranks whose `params`,
        `test` or `generator` differ.
      TypeError: a non-callable `loss` or `measure`.

    Cost:
      Ascent/descent: one gradient pass over test, then 2·n_test vmapped forward passes over
      train, O(n_test·n_train) forwards and O(n_test·(P + chunk_size·activations)) memory.
      Sphere: 2k forward passes over train and test, independent of n_test.

    Examples:
      >>> scores = ti.empirical_if(loss, params, train, test, radius=1e-3)
      >>> scores.shape
      torch.Size([5, 60])
      >>> torch.allclose(scores / 1e-6, ti.grad_dot(loss, params, train, test), rtol=1e-2, atol=1e-4)
      True

    References:
      Liu et al., NeurIPS 2022 (EmpiricalIF), and its reverse check (`ti.reverse_check`).
    """
    where = "ti.empirical_if"
    check_inputs(where, loss, params, train, test, chunk_size=chunk_size, alike=measure is None)
    m, name = measure_or_loss(where, loss, measure)
    radius = _check_radius(where, radius)
    values = "losses" if measure is None else "`measure` values"
    base_test = per_example(m, params, test, where=where, name=name)  # [n_test]
    checks.finite_chunk(where, "test", base_test, 0, what=values)
    if directions is None:
        if generator is not None:
            raise ValueError(f"{where}: `generator` is only used with `directions`; pass directions=... or drop generator.")
        V = _unit_rows(stacked_grads(m, params, test, chunk_size=chunk_size, where=where, name=name))  # [n_test, ...]
        thetas = _plus_minus(params, radius, V)
        doubled = tr.map(lambda leaf: torch.cat([leaf, leaf]), test)
        d_test = vmap(example_loss(m, where=where, name=name))(thetas, doubled) - base_test.repeat(2)  # [2 n_test]
        combine = _paired_products
    else:
        directions = checks.integer(where, "directions", directions, minimum=1,
                                    hint="Pass e.g. directions=64, or None for ascent/descent.")
        if not isinstance(generator, torch.Generator):
            raise ValueError(f"{where}: `directions` needs an explicit `generator`, "
                             f"e.g. generator=torch.Generator().manual_seed(0); got {type(generator).__name__}.")
        V = tr.random_like(params, generator=tr.fork_generator(generator), kind="sphere", batch=(directions,))  # [k, ...]
        thetas = _plus_minus(params, radius, V)
        d_test = vmap(m, in_dims=(0, None))(thetas, test) - base_test  # [2k, n_test]
        combine = _averaged_products
    drawn = {} if directions is None else {"generator": V}
    dd._check_replicated(where, group, params=params, test=test, **drawn)
    _perturbed_finite(where, "test", d_test.reshape(-1, base_test.shape[0]), radius, what=values)

    def chunk_scores(start, chunk):
        base = per_example(loss, params, chunk, where=where)                                  # [c]
        checks.finite_chunk(where, "train", base, start, what="losses")
        d_train = vmap(loss, in_dims=(0, None))(thetas, chunk) - base                          # [2k, c]
        _perturbed_finite(where, "train", d_train, radius, start)
        return combine(d_test, d_train)

    return dd.gather_columns(D._chunk_cat(chunk_scores, train, chunk_size, dim=1, call=where, indexed=True), group)


def _perturbed_finite(where: str, name: str, d: torch.Tensor, radius: float, start: int = 0, *,
                      what: str = "losses") -> None:
    """Raises `ArgumentError` naming the examples of `name` whose `what` (losses, `measure` values) at a
    perturbed θ ± r·v is not finite (the model overflows there). `d` is `[2k, c]`, c examples from id
    `start`; one reduction.
    """
    if not bool(torch.isfinite(d.sum())):
        checks.finite_chunk(where, name, d.T, start, what=f"{what} at the perturbed parameters θ ± r·v",
                            hint=f"Lower `radius` (now {radius:g}) if the loss overflows there.")


def _check_radius(where: str, radius) -> float:
    return checks.number(where, "radius", radius, minimum=0.0, exclusive=True, hint="Pass e.g. radius=1e-3.")


class ReverseCheck(NamedTuple):
    """Result of `ti.reverse_check` for one test point.

    indices: `[2k]` training indices, the k highest scores (descending) then the k lowest (ascending).
    scores: `[2k]` the given scores at `indices`.
    reverse_scores: `[2k]` ½ Σ_± ΔL_test±·Δℓ_z± with θ± = θ ± r·g_z/‖g_z‖ (z's own gradient).
    correlation: 0-d Pearson correlation of `scores` and `reverse_scores`.
    sign_agreement: 0-d fraction of the 2k points where both have the same sign.
    """

    indices: torch.Tensor
    scores: torch.Tensor
    reverse_scores: torch.Tensor
    correlation: torch.Tensor
    sign_agreement: torch.Tensor


def reverse_check(loss: Callable, params: PyTree, train: PyTree, test_point: PyTree, scores: torch.Tensor, *, ratio: float = 0.01,
                  radius: float = 1e-3) -> ReverseCheck:
    """Returns a `ReverseCheck`: do the top and bottom scores hold when perturbing along training gradients?

    For the k = max(1, round(ratio·n_train)) training points with the highest and the k with
    the lowest `scores`, θ is moved along each point's own gradient, θ± = θ ± r·g_z/‖g_z‖,
    and the reverse score ½ (ΔL_test⁺·Δℓ_z⁺ + ΔL_test⁻·Δℓ_z⁻) is measured (ΔL_test: the
    test point's loss change; Δℓ_z: z's own). For small r it is r²·⟨g_test, g_z⟩ + O(r⁴),
    the same limit as ascent/descent `ti.empirical_if`, so for scores from that method the
    two should agree in sign and correlate strongly; a weak correlation says the scores
    are not explained by the local loss landscape.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]`, usually the trained θ̂.
      train: training set, leading axis n_train.
      test_point: a data set holding one test example (leading axis 1).
      scores: `[n_train]` or `[1, n_train]` scores of `test_point`, from any method.
      ratio: fraction of the training set checked at each end, 0 < ratio <= 0.5.
      radius: step length r > 0.

    Returns:
      `ReverseCheck(indices, scores, reverse_scores, correlation, sign_agreement)`.

    Raises:
      ValueError: `test_point` does not hold exactly one example, `scores` does not have
        n_train entries, or `ratio`/`radius` are out of range.

    Cost:
      One per-example gradient pass over the 2k checked points and 4k forward passes of one
      example each (vmapped): O(k) backward and forward passes, O(k·P) memory.

    Examples:
      >>> point = ti.take(test, slice(0, 1))
      >>> scores = ti.empirical_if(loss, params, train, point)[0]
      >>> report = ti.reverse_check(loss, params, train, point, scores, ratio=0.1)
      >>> report.indices.shape, bool(report.correlation > 0.99)
      (torch.Size([12]), True)
    """
    where = "ti.reverse_check"
    check_inputs(where, loss, params, train, test_point, names=("train", "test_point"))
    n = D._count_examples(train, name="train", call=where)
    if D._count_examples(test_point, name="test_point", call=where) != 1:
        raise ValueError(f"{where}: `test_point` must hold exactly one example (leading axis 1); "
                         f"got {D.num_examples(test_point)}. Use ti.take(test, slice(j, j + 1)).")
    if not isinstance(scores, torch.Tensor) or scores.reshape(-1).shape != (n,) or scores.dim() > 2:
        got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{where}: `scores` must have shape [n_train] = [{n}] (or [1, {n}]); got {got}.")
    ratio = checks.number(where, "ratio", ratio, minimum=0.0, exclusive=True, maximum=0.5)
    radius = _check_radius(where, radius)
    scores = scores.reshape(-1)
    k = max(1, round(ratio * n))
    order = torch.argsort(scores, descending=True)
    indices = torch.cat([order[:k], order.flip(0)[:k]])  # [2k]
    picked = D.take(train, indices)
    V = _unit_rows(stacked_grads(loss, params, picked, where=where))  # [2k, ...]
    thetas = _plus_minus(params, radius, V)  # [4k, ...]
    one = example_loss(loss, where=where)
    doubled = tr.map(lambda leaf: torch.cat([leaf, leaf]), picked)
    d_own = vmap(one)(thetas, doubled) - per_example(loss, params, picked, where=where).repeat(2)
    d_test = vmap(loss, in_dims=(0, None))(thetas, test_point)[:, 0] - per_example(loss, params, test_point, where=where)
    reverse = _paired_products(d_test, d_own[:, None])[:, 0]  # [2k]
    chosen = scores[indices]
    correlation = torch.corrcoef(torch.stack([chosen, reverse.to(chosen.dtype)]))[0, 1]
    agreement = (torch.sign(chosen) == torch.sign(reverse)).to(reverse.dtype).mean()
    return ReverseCheck(indices, chosen, reverse, correlation, agreement)
