"""Gradient similarity: dot product and cosine between test and training gradients."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..core import collectives as dd
from ..core.scoring import check_factored, check_inputs, grad_products, measure_or_loss, over_train, stacked_grads
from ..core.tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["grad_dot", "grad_cos"]


def grad_dot(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, measure: Callable | None = None, chunk_size: int | None = None,
             group: ProcessGroup | None = None, factored: bool = False) -> torch.Tensor:
    """Returns the gradient dot products ⟨∇m(θ, z_test), ∇ℓ(θ, z)⟩, `[n_test, n_train]`.

    m = `measure` (default `loss`). Sign: positive = helpful: a gradient step on z lowers m
    at the test point to first order, so removing z would raise it. Scale: the classic
    influence `(1/n) ∇mᵀ H⁻¹ ∇ℓ` with H replaced by the identity and without the 1/n; it
    ignores curvature, so compare rankings or correlations, not magnitudes.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss ℓ.
      params: `dict[str, Tensor]` at which the gradients are taken (P numbers).
      train: training set, a pytree of tensors with leading axis n_train.
      test: test set, leading axis n_test; shaped like `train` unless a `measure` reads it.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m; default `loss`.
      chunk_size: examples per vectorized backward (default 1024).
      group: a `torch.distributed` process group when `train` is this rank's contiguous shard
        (`ti.distributed.shard`); `params` and `test` must be the same on every rank (checked),
        the shards' columns are all-gathered in rank order and every rank returns the
        single-process result.
      factored: True computes the gradient products of linear, conv and embedding weights from their
        factors
        (`ti.factored`: layer inputs and output gradients) without forming per-example
        gradients, for the test side (`measure`) as for the training side; the same result
        to round-off.

    Returns:
      `[n_test, n_train]` tensor, dtype and device of the parameters; positive = helpful.

    Raises:
      ArgumentError (a TypeError and a ValueError): a non-callable `loss` or `measure`;
        parameters that are not finite tensors of one floating dtype and device (or not a
        dict with `factored=True`); data sets without a common leading axis, of another dtype
        or device, or, without a `measure`, `test` shaped unlike `train`; a loss or measure
        that is not one floating value per example; a gradient that is not finite (the ids
        and leaf are named); a bad `chunk_size` or a non-bool `factored`; with a group, ranks
        whose `params` or `test` differ.

    Cost:
      One per-example gradient pass over test and one over train, one `[n_test, P] × [P, c]`
      product per training chunk: O((n_test + n_train)·(backward) + n_test·n_train·P) time,
      O((n_test + chunk_size)·P) memory. With `factored=True` a linear layer applied at T
      positions per example costs O(n_test·n_train·T²·(in + out)) instead of
      O(n_test·n_train·in·out) and holds O((n_test + chunk_size)·T·(in + out)) numbers.

    Examples:
      >>> scores = ti.grad_dot(loss, params, train, test)
      >>> scores.shape
      torch.Size([5, 60])
      >>> p0 = lambda p, batch: apply(p, batch["x"]).softmax(1)[:, 0]    # probability of class 0
      >>> ti.grad_dot(loss, params, train, {"x": test[0]}, measure=p0).shape
      torch.Size([5, 60])
    """
    call = "ti.grad_dot"
    check_inputs(call, loss, params, train, test, chunk_size=chunk_size, alike=measure is None)
    dd._check_replicated(call, group, params=params, test=test)
    check_factored(call, factored)
    m, name = measure_or_loss(call, loss, measure)
    pairwise, _ = grad_products(factored)
    G_test = stacked_grads(m, params, test, chunk_size=chunk_size, where=call, factored=factored, name=name)
    return over_train(lambda G: pairwise(G_test, G), loss, params, train, chunk_size=chunk_size, where=call,
                      group=group, factored=factored)


def grad_cos(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, measure: Callable | None = None, chunk_size: int | None = None,
             group: ProcessGroup | None = None, factored: bool = False) -> torch.Tensor:
    """Returns the cosine similarities of test and training gradients, `[n_test, n_train]`.

        score[t, i] = ⟨∇m(θ, z_t), ∇ℓ(θ, z_i)⟩ / (‖∇m(θ, z_t)‖ ‖∇ℓ(θ, z_i)‖)  ∈ [-1, 1],

    m = `measure` (default `loss`), whose gradient is normalised like the training ones; a
    zero gradient gives 0. Normalizing the training gradient (as RelatIF does) keeps
    examples with large gradients (outliers, mislabeled points) from dominating every
    ranking; normalizing the test gradient only rescales each row. Sign: positive =
    helpful. Scale: a cosine, related to the change in m when z is removed by sign only.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss ℓ.
      params: `dict[str, Tensor]` at which the gradients are taken.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test; shaped like `train` unless a `measure` reads it.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m; default `loss`.
      chunk_size: examples per vectorized backward (default 1024).
      group: a process group when `train` is this rank's contiguous shard (as `ti.grad_dot`).
      factored: True computes linear, conv and embedding weights' products and norms from their
        factors (as `ti.grad_dot`).

    Returns:
      `[n_test, n_train]` tensor in [-1, 1], dtype and device of the parameters.

    Raises:
      ArgumentError (a TypeError and a ValueError): as `ti.grad_dot`.

    Cost:
      As `ti.grad_dot`; the norms come from the same gradient chunks (factored, a linear
      layer's squared norms cost O(n·T²·(in + out))).

    Examples:
      >>> cos = ti.grad_cos(loss, params, train, test)
      >>> cos.shape, bool(cos.abs().max() <= 1 + 1e-6)
      (torch.Size([5, 60]), True)
    """
    call = "ti.grad_cos"
    check_inputs(call, loss, params, train, test, chunk_size=chunk_size, alike=measure is None)
    dd._check_replicated(call, group, params=params, test=test)
    check_factored(call, factored)
    m, name = measure_or_loss(call, loss, measure)
    pairwise, sq_norms = grad_products(factored)
    G_test = stacked_grads(m, params, test, chunk_size=chunk_size, where=call, factored=factored, name=name)
    test_sq = sq_norms(G_test)  # [n_test]
    tiny = torch.finfo(test_sq.dtype).tiny
    test_norms = test_sq.sqrt().clamp_min(tiny)

    def cosines(G):
        return pairwise(G_test, G) / test_norms[:, None] / sq_norms(G).sqrt().clamp_min(tiny)[None, :]

    return over_train(cosines, loss, params, train, chunk_size=chunk_size, where=call, group=group, factored=factored)
