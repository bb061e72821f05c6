"""Classic influence functions (Koh & Liang, 2017): (1/n) ∇m(test)ᵀ (H + λI)⁻¹ ∇ℓ(z)."""

from __future__ import annotations

from typing import Callable

import optree
import torch
from torch.func import vmap

from .. import data as D
from .. import tree as tr
from ..errors import check_params
from ..transforms import per_example_grad_fn, per_example_grads

__all__ = ["influence", "self_influence"]


def influence(loss: Callable, params, train, test, *, ihvp: Callable, measure: Callable | None = None,
              chunk_size: int | None = None) -> torch.Tensor:
    """Returns the influence of every training example on every test example, `[n_test, n_train]`.

        score[t, i] = (1/n) ∇_θ m(θ̂, z_t)ᵀ (H + λI)⁻¹ ∇_θ ℓ(θ̂, z_i),

    with m = `measure` (default `loss`), n = number of training examples and
    `ihvp = v ↦ (H + λI)⁻¹ v` for H the Hessian of the training objective
    R(θ) = (1/n) Σ ℓ(θ, z_i) + (l2/2)‖θ‖² (or its Gauss-Newton matrix).

    Sign: the score predicts m_t(θ̂ without z_i) − m_t(θ̂), the change in the test
    measure when z_i is removed and the model retrained; POSITIVE = helpful (removing
    z_i would raise the test loss), negative = harmful. Koh & Liang's
    I_up,loss(z, z_test) = −∇L_testᵀ H⁻¹ ∇ℓ(z) is the derivative for up-weighting z by ε;
    removing z is ε = −1/n, so score = −I_up,loss / n.

    Cost and memory: the test gradients (n_test × P numbers) are solved together in ONE
    `ihvp` call (for `ti.cg`, one pass over the training data per iteration for all test
    points); training gradients are then computed once, `chunk_size` examples at a time,
    and each chunk meets all test directions in one matrix product. Held at once:
    2 × n_test × P (test gradients and their solves) + chunk_size × P (one chunk of
    training gradients) + the n_test × n_train result. Training gradients are never all
    held and never recomputed per test point.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: `dict[str, Tensor]` at the optimum θ̂ (or a trainable subset, e.g. the last layer,
        with the rest of the model closed over by `loss`).
      train: training set, a pytree of tensors with a common leading axis n.
      test: test set, the same pytree structure as `train` with leading axis n_test.
      ihvp: `v ↦ (H + λI)⁻¹ v` accepting a stack (leading axis k): `ti.direct`, `ti.cg`, `ti.lissa`.
      measure: `(params, batch) -> Tensor[B]`, the test quantity m; default `loss`.
      chunk_size: examples per vectorized gradient computation (default 1024).

    Returns:
      Tensor `[n_test, n_train]`, dtype and device of `params`; positive = helpful.

    Raises:
      ValueError: `test` and `train` differ in structure or in per-example shapes, or either is empty.

    Example:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> scores = ti.influence(loss, params, train, test, ihvp=ti.cg(ti.hvp(R, params), tol=1e-8))

    References:
      Koh & Liang, Understanding black-box predictions via influence functions, ICML 2017.
    """
    check_params("ti.influence", params)
    n = D.num_examples(train, name="train", where="ti.influence")
    D.num_examples(test, name="test", where="ti.influence")
    _check_alike(train, test)
    G_test = per_example_grads(measure or loss, params, test, chunk_size=chunk_size)   # leaves [n_test, ...]
    U = ihvp(G_test)                                                                   # leaves [n_test, ...]
    kernel = per_example_grad_fn(loss, where="ti.influence")
    return torch.cat([tr.pairwise_vdot(U, kernel(params, chunk)) for chunk in D.chunks(train, chunk_size)], dim=1) / n


def self_influence(loss: Callable, params, train, *, ihvp: Callable, chunk_size: int | None = None) -> torch.Tensor:
    """Returns each training example's influence on its own loss, `[n_train]`.

        score[i] = (1/n) ∇ℓ(θ̂, z_i)ᵀ (H + λI)⁻¹ ∇ℓ(θ̂, z_i)  (≥ 0 when H + λI is positive definite),

    the diagonal of `ti.influence(loss, params, train, train, ...)` without the
    n × n matrix: how much z_i's own loss would rise if it were removed. Large values
    flag memorized, mislabeled or atypical examples.

    Cost and memory: one gradient pass over the training data and one `ihvp` call per
    chunk (the chunk's gradients solved together as a stack of `chunk_size`); held at
    once: 2 × chunk_size × P numbers plus the n-vector result.

    Args:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: `dict[str, Tensor]` at the optimum θ̂.
      train: training set, leading axis n.
      ihvp: `v ↦ (H + λI)⁻¹ v` accepting a stack.
      chunk_size: examples per chunk, i.e. right-hand sides per `ihvp` call (default 1024).

    Returns:
      Tensor `[n_train]`, dtype and device of `params`; positive = helpful to itself.
    """
    check_params("ti.self_influence", params)
    n = D.num_examples(train, name="train", where="ti.self_influence")
    kernel = per_example_grad_fn(loss, where="ti.self_influence")
    pair = vmap(tr.vdot)

    def chunk_scores(chunk):
        G = kernel(params, chunk)          # leaves [B, ...]
        return pair(G, ihvp(G))            # [B]

    return torch.cat([chunk_scores(chunk) for chunk in D.chunks(train, chunk_size)]) / n


def _check_alike(train, test) -> None:
    """`test` must have `train`'s structure and per-example leaf shapes."""
    train_spec, test_spec = optree.tree_structure(train, namespace=""), optree.tree_structure(test, namespace="")
    if train_spec != test_spec:
        raise ValueError(f"ti.influence: `test` must have the structure of `train` {train_spec}; got {test_spec}.")
    paths, train_leaves, _ = optree.tree_flatten_with_path(train, namespace="")
    for path, a, b in zip(paths, train_leaves, optree.tree_leaves(test, namespace="")):
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"ti.influence: `test` leaf {path} must have per-example shape {list(a.shape[1:])} like `train`; "
                f"got {list(b.shape[1:])}.")
