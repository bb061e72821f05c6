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

from . import checks
from . import collectives as dd
from . import data as D
from . import factored as fa
from . import tree as tr
from .transforms import grad_fn

__all__ = ["check_inputs", "stacked_grads", "over_train", "row_sq_norms", "grad_products", "check_factored"]


def check_inputs(call: str, loss: Callable, params, train, test=None, *, chunk_size=None,
                 names: tuple[str, str] = ("train", "test"), alike: bool = True) -> torch.Tensor:
    """The checks every estimator `(loss, params, train, test, **options)` makes up front.

    `loss` callable; `params` a dict of finite tensors of one floating dtype and device;
    `train` (and `test`) pytrees with a leading example axis, on that device and, where
    floating, of that dtype; `test` shaped like `train` (`ti.data.check_alike`; not with
    `alike=False`, when `test` goes to a `measure` of its own);
    `chunk_size` None or an int >= 1. Returns the reference parameter leaf. Cost: one
    `isfinite` pass over the parameters, metadata otherwise.
    """
    checks.function(call, "loss", loss, "(params, batch) -> Tensor[B]")
    ref = checks.params(call, params)
    checks.chunk_size(call, chunk_size)
    for name, data in zip(names, (train, test)):
        if data is not None:
            D.count_examples(data, name=name, call=call)
            checks.floating_like(call, name, data, ref)
    if test is not None and alike:
        D.check_alike(call, train, test, names)
    return ref


def _grad_kernel(loss: Callable, factored: bool, where: str, name: str, keep: Callable = fa.for_gram) -> Callable:
    """`(params, batch) -> ` the batch's per-example gradients: a pytree, or `GradFactors` if `factored`
    (`keep` the rule for which weights stay factors: `ti.factored.for_gram` or `for_dense_products`).
    """
    return fa.factor_fn(loss, call=where, keep=keep) if factored else grad_fn(loss, call=where, name=name)


def _checked(kernel: Callable, params, where: str, data_name: str) -> Callable:
    """`(start, chunk) -> kernel(params, chunk)`, raising naming the ids and leaf if a gradient is not finite.

    One reduction per gradient leaf and chunk (c·P numbers read once; the gradients cost
    far more to compute).
    """

    def run(start, chunk):
        G = kernel(params, chunk)
        checks.finite_chunk(where, data_name, G, start)
        return G

    return run


def stacked_grads(loss: Callable, params, data, *, chunk_size=None, transform: Callable = lambda G: G, where: str,
                  factored: bool = False, name: str = "loss", data_name: str = "test"):
    """Returns `transform(G)` for the per-example gradients G of `data`, computed chunk by chunk.

    `transform` maps a chunk's gradients (leaves `[c, *shape]`, or `GradFactors` when
    `factored`) to a stack with leading axis c (a pytree, or a `[c, d]` projection); the
    chunks are concatenated. Every chunk's gradients are checked to be finite
    (`checks.finite_chunk`: `where` names the call, `data_name` the data argument, `name`
    the differentiated function in a shape error).
    """
    kernel = _checked(_grad_kernel(loss, factored, where, name), params, where, data_name)
    return D.chunk_cat(lambda start, chunk: transform(kernel(start, chunk)), data, chunk_size, call=where,
                       indexed=True)


def over_train(fn: Callable, loss: Callable, params, train, *, chunk_size=None, where: str, group=None,
               factored: bool = False, keep: Callable = fa.for_gram, data_name: str = "train") -> torch.Tensor:
    """Returns `fn(G_chunk)` concatenated along the last axis over the training chunks.

    `fn` maps a chunk's per-example gradients (leaves `[c, *shape]`, or `GradFactors` when
    `factored`) to a tensor whose last axis is c (e.g. `[n_test, c]` or `[c]`); the result's
    last axis is n_train. Every chunk's result is checked to be finite with one reduction
    over `fn(G)` (`[n_test, c]`, far fewer numbers than G): a nan or inf gradient makes its
    column non-finite, and only then are the gradients searched to name the ids and the
    leaf (with a group, the ids of this rank's shard). With a
    process group, `train` is this rank's shard and the shards' results are all-gathered
    in rank order. `keep`: with `factored`, which weights stay factors (see `_grad_kernel`).
    """
    kernel = _grad_kernel(loss, factored, where, "loss", keep)

    def columns(start, chunk):
        G = kernel(params, chunk)
        out = fn(G)
        checks.finite_scores(where, data_name, out, G, start)   # one reduction of [.., c]; G searched on failure
        return out

    local = D.chunk_cat(columns, train, chunk_size, dim=-1, call=where, indexed=True)
    return dd.gather_columns(local, group)


def row_sq_norms(G) -> torch.Tensor:
    """‖G[i]‖² for each row of a stack (pytree with leaves `[c, ...]`): `[c]`."""
    leaves = optree.tree_leaves(G, namespace="")
    return sum(leaf.reshape(leaf.shape[0], -1).pow(2).sum(1) for leaf in leaves)


def grad_products(factored: bool) -> tuple[Callable, Callable]:
    """`(pairwise, sq_norms)` for stacks of per-example gradients: `(G1, G2) -> [c1, c2]` and
    `G -> [c]`, on pytrees (`ti.tree.pairwise_vdot`, `row_sq_norms`) or on `GradFactors`.
    """
    return (fa.gram, fa.sq_norms) if factored else (tr.pairwise_vdot, row_sq_norms)


def check_factored(where: str, factored) -> None:
    """Raises `ArgumentError` (a TypeError) unless `factored` is a bool."""
    checks.flag(where, "factored", factored)
