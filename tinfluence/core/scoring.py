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

from typing import TYPE_CHECKING, Any, Callable

import optree
import torch

from . import checks
from . import collectives as dd
from . import data as D
from . import factored as fa
from . import tree as tr
from .transforms import grad_fn
from .tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["check_inputs", "grad_kernel", "stacked_grads", "over_train", "row_sq_norms", "grad_products", "check_factored"]


def check_inputs(call: str, loss: Callable, params: PyTree, train: PyTree, test: PyTree | None = None, *,
                 chunk_size: int | None = None, names: tuple[str, str] = ("train", "test"),
                 alike: bool = True) -> torch.Tensor:
    """The checks every estimator `(loss, params, train, test, **options)` makes up front.

    Args:
      call: the public call the messages name, e.g. "ti.influence".
      loss: must be callable.
      params: a dict of finite tensors of one floating dtype and device.
      train: a pytree with a leading example axis, on that device and, where floating, of that dtype.
      test: as `train` (or None); shaped like `train` (`data._check_alike`) unless `alike=False`
        (`test` goes to a `measure` of its own).
      chunk_size: None or an int >= 1.
      names: the argument names of `train` and `test` in messages.
      alike: check that `test` has `train`'s structure and per-example shapes.

    Returns:
      The reference parameter leaf (its dtype and device are the estimator's).

    Raises:
      ArgumentError (TypeError and ValueError): any check fails; the message names `call` and the argument.

    Cost:
      One `isfinite` pass over the parameters, O(P); metadata otherwise.
    """
    checks.function(call, "loss", loss, "(params, batch) -> Tensor[B]")
    ref = checks.params(call, params)
    checks.chunk_size(call, chunk_size)
    for name, data in zip(names, (train, test)):
        if data is not None:
            D._count_examples(data, name=name, call=call)
            checks.floating_like(call, name, data, ref)
    if test is not None and alike:
        D._check_alike(call, train, test, names)
    return ref


def measure_or_loss(call: str, loss: Callable, measure: Callable | None) -> tuple[Callable, str]:
    """`(m, name)`: the function differentiated on the test side and the name its errors give.

    `loss` under the name "loss" without a `measure`; else `measure`, checked to be callable.
    """
    if measure is None:
        return loss, "loss"
    return checks.function(call, "measure", measure, "(params, batch) -> Tensor[B]"), "measure"


def grad_kernel(loss: Callable, factored: bool, where: str, name: str, keep: Callable = fa.for_gram) -> Callable:
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


def stacked_grads(loss: Callable, params: PyTree, data: PyTree, *, chunk_size: int | None = None,
                  transform: Callable = lambda G: G, where: str, factored: bool = False, name: str = "loss",
                  data_name: str = "test") -> PyTree:
    """Returns `transform(G)` for the per-example gradients G of `data`, computed chunk by chunk.

    Args:
      loss: `(params, batch) -> Tensor[B]`, differentiated per example.
      params: the point of the gradients (a dict with `factored`).
      data: pytree with leading axis n.
      chunk_size: examples per vectorized backward (default 1024).
      transform: maps a chunk's gradients (leaves `[c, *shape]`, or `GradFactors` when
        `factored`) to a stack with leading axis c (a pytree, or a `[c, d]` projection).
      where: the public call errors name.
      factored: give `transform` `GradFactors` (`ti.factored`) instead of a pytree.
      name: the differentiated function's name in a shape error.
      data_name: the data argument's name in a finiteness error.

    Returns:
      The chunks' `transform(G)` concatenated along the leading axis (n rows).

    Raises:
      ArgumentError: a chunk's gradient is not finite (`checks.finite_chunk` names the ids and leaf),
        or a loss that is not one value per example.

    Cost:
      One vectorized backward per chunk; one reduction per gradient leaf and chunk for the check.
      Memory: chunk_size·P for one chunk's gradients plus the concatenated result.
    """
    kernel = _checked(grad_kernel(loss, factored, where, name), params, where, data_name)
    return D._chunk_cat(lambda start, chunk: transform(kernel(start, chunk)), data, chunk_size, call=where,
                       indexed=True)


def over_train(fn: Callable, loss: Callable, params: PyTree, train: PyTree, *, chunk_size: int | None = None, where: str,
               group: ProcessGroup | None = None, factored: bool = False, keep: Callable = fa.for_gram,
               data_name: str = "train") -> torch.Tensor:
    """Returns `fn(G_chunk)` concatenated along the last axis over the training chunks.

    Training gradients are computed once, one chunk at a time, and never held for all n.

    Args:
      fn: maps a chunk's per-example gradients (leaves `[c, *shape]`, or `GradFactors` when
        `factored`) to a tensor whose last axis is c (e.g. `[n_test, c]` or `[c]`).
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params: the point of the gradients (a dict with `factored`).
      train: this process's training data, leading axis n (a rank's shard with `group`).
      chunk_size: examples per vectorized backward (default 1024).
      where: the public call errors name.
      group: a process group; the shards' results are all-gathered in rank order.
      factored: give `fn` `GradFactors` (`ti.factored`) instead of a pytree.
      keep: with `factored`, which weights stay factors, `(T, width, size) -> bool`
        (`ti.factored.for_gram` for factor-factor products, `for_dense_products` against a dense stack).
      data_name: the data argument's name in a finiteness error.

    Returns:
      Tensor with last axis n_train (global with a group).

    Raises:
      ArgumentError: a chunk's result is not finite: one reduction over `fn(G)` (far fewer
        numbers than G); only then are the gradients searched to name the ids and the leaf
        (with a group, ids of this rank's shard).

    Cost:
      One vectorized backward and one `fn` per chunk; memory chunk_size·P (or its factors) plus the result.
    """
    kernel = grad_kernel(loss, factored, where, "loss", keep)

    def columns(start, chunk):
        G = kernel(params, chunk)
        out = fn(G)
        checks.finite_scores(where, data_name, out, G, start)   # one reduction of [.., c]; G searched on failure
        return out

    local = D._chunk_cat(columns, train, chunk_size, dim=-1, call=where, indexed=True)
    return dd.gather_columns(local, group)


def row_sq_norms(G: PyTree) -> torch.Tensor:
    """‖G[i]‖² for each row of a stack (pytree with leaves `[c, ...]`): `[c]`.

    Args:
      G: pytree of tensors with a common leading axis c.

    Returns:
      `[c]`, dtype and device of the leaves.

    Cost:
      O(c·P).
    """
    leaves = optree.tree_leaves(G, namespace="")
    return sum(leaf.reshape(leaf.shape[0], -1).pow(2).sum(1) for leaf in leaves)


def grad_products(factored: bool) -> tuple[Callable, Callable]:
    """`(pairwise, sq_norms)` for stacks of per-example gradients, on pytrees or on `GradFactors`.

    Args:
      factored: True for `GradFactors` (`ti.factored.gram`, `ti.factored.sq_norms`), False for
        pytrees (`ti.tree.pairwise_vdot`, `row_sq_norms`).

    Returns:
      `(pairwise, sq_norms)`: `(G1, G2) -> [c1, c2]` and `G -> [c]`.
    """
    return (fa.gram, fa.sq_norms) if factored else (tr.pairwise_vdot, row_sq_norms)


def check_factored(where: str, factored: Any) -> None:
    """Raises unless `factored` is exactly True or False.

    Args:
      where: the public call the message names.
      factored: the value given.

    Raises:
      ArgumentError (TypeError and ValueError): `factored` is not a bool (0/1 and None refused).
    """
    checks.flag(where, "factored", factored)
