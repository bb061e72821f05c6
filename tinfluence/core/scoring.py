"""The scoring mechanism every estimator shares: per-example gradients of a data set, chunk
by chunk, met by a function of each chunk.

`stacked_grads` holds the gradients of a (small) data set, e.g. the test points;
`over_train` applies a function to each training chunk's gradients and concatenates the
results along the training axis, so training gradients are computed once, one chunk at a
time, and never held for all n examples. Either takes the gradients as a pytree
(`per_example_grad_fn`) or, with `factored=True`, as `ti.factored.GradFactors`, whose inner
products (`gram`, `sq_norms`) never form the per-example gradients of linear layers.
"""

from __future__ import annotations

from typing import Callable

import optree
import torch

from . import collectives as dd
from . import data as D
from . import factored as fa
from . import tree as tr
from .transforms import per_example_grad_fn

__all__ = ["stacked_grads", "over_train", "row_sq_norms", "grad_products", "check_factored"]


def _grad_kernel(loss: Callable, factored: bool, where: str) -> Callable:
    """`(params, batch) -> ` the batch's per-example gradients: a pytree, or `GradFactors` if `factored`."""
    return fa.grad_factor_fn(loss, where=where) if factored else per_example_grad_fn(loss, where=where)


def stacked_grads(loss: Callable, params, data, *, chunk_size=None, transform: Callable = lambda G: G, where: str,
                  factored: bool = False):
    """Returns `transform(G)` for the per-example gradients G of `data`, computed chunk by chunk.

    `transform` maps a chunk's gradients (leaves `[c, *shape]`, or `GradFactors` when
    `factored`) to a stack with leading axis c (a pytree, or a `[c, d]` projection); the
    chunks are concatenated.
    """
    kernel = _grad_kernel(loss, factored, where)
    return D.chunk_cat(lambda chunk: transform(kernel(params, chunk)), data, chunk_size)


def over_train(fn: Callable, loss: Callable, params, train, *, chunk_size=None, where: str, group=None,
               factored: bool = False) -> torch.Tensor:
    """Returns `fn(G_chunk)` concatenated along the last axis over the training chunks.

    `fn` maps a chunk's per-example gradients (leaves `[c, *shape]`, or `GradFactors` when
    `factored`) to a tensor whose last axis is c (e.g. `[n_test, c]` or `[c]`); the result's
    last axis is n_train. With a process group, `train` is this rank's shard and the
    shards' results are all-gathered in rank order.
    """
    kernel = _grad_kernel(loss, factored, where)
    local = D.chunk_cat(lambda chunk: fn(kernel(params, chunk)), train, chunk_size, dim=-1)
    return dd.gather_columns(local, group)


def row_sq_norms(G) -> torch.Tensor:
    """‖G[i]‖² for each row of a stack (pytree with leaves `[c, ...]`): `[c]`."""
    leaves = optree.tree_leaves(G, namespace="")
    return sum(leaf.reshape(leaf.shape[0], -1).pow(2).sum(1) for leaf in leaves)


def grad_products(factored: bool) -> tuple[Callable, Callable]:
    """`(pairwise, sq_norms)` for stacks of per-example gradients: `(G1, G2) -> [c1, c2]` and
    `G -> [c]`, on pytrees (`ti.tree.pairwise_vdot`, `row_sq_norms`) or on `GradFactors`."""
    return (fa.gram, fa.sq_norms) if factored else (tr.pairwise_vdot, row_sq_norms)


def check_factored(where: str, factored) -> None:
    """Raises TypeError unless `factored` is a bool."""
    if not isinstance(factored, bool):
        raise TypeError(f"{where}: `factored` must be True or False; got {factored!r}.")
