"""Gradient similarity: dot product and cosine between test and training gradients."""

from __future__ import annotations

from typing import Callable

import torch

from ..core.scoring import check_factored, check_inputs, grad_products, over_train, stacked_grads

__all__ = ["grad_dot", "grad_cos"]


def grad_dot(loss: Callable, params, train, test, *, chunk_size: int | None = None, group=None,
             factored: bool = False) -> torch.Tensor:
    """Returns the gradient dot products ⟨∇ℓ(z_test; θ), ∇ℓ(z; θ)⟩, `[n_test, n_train]`.

    Sign: positive = helpful (a gradient step on z lowers the test loss to first order).
    Scale: this is the classic influence `(1/n) g_testᵀ H⁻¹ g_z` with the Hessian replaced
    by the identity and without the 1/n, so it predicts the change of the test loss when z
    is removed only up to scale (and ignores curvature entirely); compare rankings or
    correlations, not magnitudes.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]` at which the gradients are taken.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test.
      chunk_size: training (and test) examples per vectorized backward (default 1024).
      group: a `torch.distributed` process group when `train` is this rank's contiguous shard
        (`ti.distributed.shard`); the shards' columns are all-gathered in rank order, so every
        rank returns the single-process result.
      factored: True computes the products of linear-layer gradients from their factors
        (`ti.factored`: layer inputs and output gradients) without forming per-example
        gradients, and other parameters' gradients as usual; the same result to round-off.

    Returns:
      `[n_test, n_train]` tensor, dtype and device of the parameters; positive = helpful.

    Raises:
      ArgumentError (a TypeError and a ValueError): a non-callable `loss`; parameters that
        are not finite tensors of one floating dtype and device (or not a dict with
        `factored=True`); data sets without a common leading axis, of another dtype or
        device, or `test` shaped unlike `train`; a loss that is not one floating value per
        example; a gradient that is not finite (the ids and leaf are named); a bad
        `chunk_size` or a non-bool `factored`.

    Notes:
      Cost: one per-example gradient pass over test and one over train; one matrix product
      per chunk. Memory: n_test × P for the test gradients plus chunk_size × P. With
      `factored=True` a linear layer applied at T positions per example, where
      T²·(in + out) < in·out, costs n_test·n_train·T²·(in + out) instead of
      n_test·n_train·in·out plus forming (n_test + n_train)·in·out numbers, and holds
      (n_test + chunk_size)·T·(in + out) numbers; other layers cost what they did. Measured
      (one thread, 1000 training × 100 test digits, float64): 2× faster for logistic
      regression 64→10, 10× for a 64-128-10 MLP; Fashion-MNIST 60000 × 1000 with a
      784-128-10 MLP (float32) takes 3.8 s.
    """
    where = "ti.grad_dot"
    check_inputs(where, loss, params, train, test, chunk_size=chunk_size)
    check_factored(where, factored)
    pairwise, _ = grad_products(factored)
    G_test = stacked_grads(loss, params, test, chunk_size=chunk_size, where=where, factored=factored)
    return over_train(lambda G: pairwise(G_test, G), loss, params, train, chunk_size=chunk_size, where=where,
                      group=group, factored=factored)


def grad_cos(loss: Callable, params, train, test, *, chunk_size: int | None = None, group=None,
             factored: bool = False) -> torch.Tensor:
    """Returns the cosine similarities of test and training gradients, `[n_test, n_train]`.

    `⟨g_test, g_z⟩ / (‖g_test‖ ‖g_z‖)`, in [-1, 1]; a zero gradient gives 0. Normalizing
    the training gradient (as RelatIF does with its influence vector) keeps examples with
    large gradients (outliers, mislabeled points) from dominating every test point's
    ranking; normalizing the test gradient only rescales each row.

    Sign: positive = helpful. Scale: a cosine, unrelated to the change in test loss when z
    is removed except for sign; use it for rankings.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]` at which the gradients are taken.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test.
      chunk_size: examples per vectorized backward (default 1024).
      group: a `torch.distributed` process group when `train` is this rank's contiguous shard
        (`ti.distributed.shard`); the shards' columns are all-gathered in rank order, so every
        rank returns the single-process result.
      factored: True computes the products of linear-layer gradients from their factors
        (`ti.factored`: layer inputs and output gradients) without forming per-example
        gradients, and other parameters' gradients as usual; the same result to round-off.

    Returns:
      `[n_test, n_train]` tensor in [-1, 1], dtype and device of the parameters.

    Raises:
      TypeError / ValueError: as `ti.grad_dot`.

    Notes:
      Cost: as `ti.grad_dot` (the norms come from the same gradient chunks; factored, a
      linear layer's squared norms cost n·T²·(in + out)).
    """
    where = "ti.grad_cos"
    check_inputs(where, loss, params, train, test, chunk_size=chunk_size)
    check_factored(where, factored)
    pairwise, sq_norms = grad_products(factored)
    G_test = stacked_grads(loss, params, test, chunk_size=chunk_size, where=where, factored=factored)
    test_sq = sq_norms(G_test)  # [n_test]
    tiny = torch.finfo(test_sq.dtype).tiny
    test_norms = test_sq.sqrt().clamp_min(tiny)

    def cosines(G):
        return pairwise(G_test, G) / test_norms[:, None] / sq_norms(G).sqrt().clamp_min(tiny)[None, :]

    return over_train(cosines, loss, params, train, chunk_size=chunk_size, where=where, group=group, factored=factored)
