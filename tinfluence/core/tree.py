"""Pytree algebra on optree.

A pytree is any nest of dicts, lists, tuples and namedtuples whose leaves are tensors;
parameters are `dict[str, Tensor]`. Every function here is pure, returns tensors (never
Python floats) and works leaf by leaf, so it composes with `torch.func.vmap` and
`torch.compile`. optree sorts dict keys when flattening; every function here flattens
with optree only, so leaves of two trees line up by key, never by insertion order.

Stacked trees carry a leading axis on every leaf (per-example gradients `[n, *shape]`,
k right-hand sides `[k, *shape]`); `stack`, `unstack`, `ravel(..., batch_ndim=1)` and
`pairwise_vdot` speak that form.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import optree
import torch

PyTree = Any

__all__ = [
    "map", "add", "sub", "scale", "add_scaled", "vdot", "pairwise_vdot", "norm", "sq_norm",
    "zeros_like", "random_like", "ravel", "unravel", "size", "select", "partition",
    "merge", "stack", "unstack", "leading_size", "fork_generator",
]


def map(fn: Callable, tree: PyTree, *rest: PyTree) -> PyTree:  # noqa: A001 - mirrors optree.tree_map
    """Applies `fn` leaf by leaf: the tree of `fn(leaf, *rest_leaves)`.

    Args:
      fn: `(leaf, *rest_leaves) -> tensor`.
      tree: a pytree of tensors.
      *rest: pytrees with the structure of `tree`.

    Returns:
      A pytree with the structure of `tree` holding `fn`'s results.

    Raises:
      ValueError: a tree in `rest` has another structure (from optree).

    Cost: one `fn` call per leaf.

    Examples:
      >>> ti.tree.map(torch.square, params)["weight"].shape
      torch.Size([3, 8])
    """
    return optree.tree_map(fn, tree, *rest, namespace="")


def add(x: PyTree, y: PyTree) -> PyTree:
    """X + y, leaf by leaf.

    Args:
      x: a pytree of tensors.
      y: a pytree with the structure of `x` (leaves broadcasting against `x`'s).

    Returns:
      The pytree x + y.

    Cost: O(P) time and memory.

    Examples:
      >>> torch.equal(ti.tree.add(params, params)["bias"], 2 * params["bias"])
      True
    """
    return map(torch.add, x, y)


def sub(x: PyTree, y: PyTree) -> PyTree:
    """X − y, leaf by leaf.

    Args:
      x: a pytree of tensors.
      y: a pytree with the structure of `x`.

    Returns:
      The pytree x − y.

    Cost: O(P) time and memory.

    Examples:
      >>> bool((ti.tree.sub(params, params)["weight"] == 0).all())
      True
    """
    return map(torch.sub, x, y)


def scale(alpha: float | torch.Tensor, x: PyTree) -> PyTree:
    """Alpha · x, leaf by leaf.

    Args:
      alpha: a Python number, or a tensor broadcasting against every leaf (e.g. `[k, 1]`
        against leaves `[k, d]` of a stack).
      x: a pytree of tensors.

    Returns:
      The pytree alpha · x.

    Cost: O(P) time and memory.

    Examples:
      >>> torch.equal(ti.tree.scale(3.0, params)["bias"], 3.0 * params["bias"])
      True
    """
    return map(lambda leaf: alpha * leaf, x)


def add_scaled(x: PyTree, alpha: float | torch.Tensor, y: PyTree) -> PyTree:
    """X + alpha · y, leaf by leaf (axpy).

    Args:
      x: a pytree of tensors.
      alpha: a Python number or a tensor broadcasting against every leaf.
      y: a pytree with the structure of `x`.

    Returns:
      The pytree x + alpha · y.

    Cost: O(P) time and memory.

    Examples:
      >>> torch.allclose(ti.tree.add_scaled(params, -1.0, params)["weight"], torch.zeros(3, 8, dtype=torch.float64))
      True
    """
    return map(lambda a, b: a + alpha * b, x, y)


def vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """Full contraction ⟨x, y⟩ = Σ_leaves Σ_elements x·y.

    For stacks use `torch.func.vmap(vdot)` (-> `[k]`) or `pairwise_vdot` (-> `[m, n]`).

    Args:
      x: a pytree of tensors.
      y: a pytree with the structure and leaf shapes of `x`.

    Returns:
      A 0-d tensor (a tensor, never a Python float, so it stays on the device and traces).

    Raises:
      ValueError: `x` and `y` differ in structure (from optree).
      ArgumentError: `x` has no tensor leaves.

    Cost: O(P) time, O(number of leaves) extra memory.

    Examples:
      >>> torch.allclose(ti.vdot(params, params), ti.ravel(params) @ ti.ravel(params))
      True
    """
    leaves = optree.tree_leaves(map(lambda a, b: torch.sum(a * b), x, y), namespace="")
    if not leaves:
        from .checks import ArgumentError

        raise ArgumentError("ti.vdot: `x` has no tensor leaves; pass pytrees holding at least one tensor.")
    return torch.stack(leaves).sum()


def pairwise_vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """All inner products between two stacks: `out[i, j] = ⟨x_i, y_j⟩`.

    One matrix product per leaf; this is how k test directions meet n training gradients.

    Args:
      x: a stacked pytree, leaves `[m, *shape]`.
      y: a stacked pytree of the same structure, leaves `[n, *shape]`.

    Returns:
      Tensor `[m, n]`.

    Cost: O(m·n·P) time, O(m·n) extra memory per leaf.

    Examples:
      >>> x = ti.tree.stack([params, params])
      >>> y = ti.tree.stack([params, params, params])
      >>> ti.tree.pairwise_vdot(x, y).shape
      torch.Size([2, 3])
    """
    products = map(lambda a, b: a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T, x, y)
    return torch.stack(optree.tree_leaves(products, namespace="")).sum(0)


def sq_norm(x: PyTree) -> torch.Tensor:
    """‖x‖² = ⟨x, x⟩ over all leaves.

    Args:
      x: a pytree of tensors.

    Returns:
      A 0-d tensor.

    Cost: O(P) time.

    Examples:
      >>> torch.allclose(ti.tree.sq_norm(params), ti.ravel(params).square().sum())
      True
    """
    return vdot(x, x)


def norm(x: PyTree) -> torch.Tensor:
    """Euclidean norm ‖x‖ over all leaves together.

    Args:
      x: a pytree of tensors.

    Returns:
      A 0-d tensor.

    Cost: O(P) time.

    Examples:
      >>> torch.allclose(ti.tree.norm(params), torch.linalg.vector_norm(ti.ravel(params)))
      True
    """
    return torch.sqrt(sq_norm(x))


def zeros_like(x: PyTree) -> PyTree:
    """Zeros with the structure, shapes, dtypes and devices of `x`.

    Args:
      x: a pytree of tensors.

    Returns:
      A pytree like `x`, every entry 0.

    Cost: O(P) memory.

    Examples:
      >>> ti.tree.zeros_like(params)["bias"].dtype
      torch.float64
    """
    return map(torch.zeros_like, x)


def size(x: PyTree) -> int:
    """Total number of elements P over all leaves.

    Args:
      x: a pytree of tensors.

    Returns:
      P, a Python int.

    Cost: metadata only.

    Examples:
      >>> ti.tree.size(params)   # weight [3, 8] and bias [3]
      27
    """
    return sum(leaf.numel() for leaf in optree.tree_leaves(x, namespace=""))


def random_like(x: PyTree, *, generator: torch.Generator, kind: str = "normal", batch: tuple[int, ...] = ()) -> PyTree:
    """Random tree shaped like `x` (with extra leading `batch` dims), drawn from `generator`.

    Leaves are drawn in optree's (sorted-key) order on the generator's device and cast to
    each leaf's dtype and device, so the same generator state gives the same tree on every
    machine. The generator advances (pass `fork_generator(g)` to leave `g` as it is).

    Args:
      x: a pytree of tensors; only shapes, dtypes and devices are read.
      generator: the `torch.Generator` drawn from.
      kind: "normal" (i.i.d. N(0, 1) entries) or "sphere" (each draw scaled to unit norm
        over the whole tree).
      batch: extra leading dims, e.g. `(k,)` for a stack of k draws.

    Returns:
      A pytree like `x` with leaves `[*batch, *leaf.shape]`.

    Raises:
      ValueError: `kind` is neither "normal" nor "sphere".

    Cost: O(prod(batch)·P) time and memory.

    Examples:
      >>> u = ti.tree.random_like(params, generator=torch.Generator().manual_seed(0), kind="sphere", batch=(4,))
      >>> torch.allclose(torch.func.vmap(ti.tree.norm)(u), torch.ones(4, dtype=torch.float64))
      True
    """
    if kind not in ("normal", "sphere"):
        raise ValueError(f'ti.tree.random_like: `kind` must be "normal" or "sphere"; got {kind!r}.')
    leaves, spec = optree.tree_flatten(x, namespace="")
    draws = [
        torch.randn((*batch, *leaf.shape), generator=generator, dtype=leaf.dtype, device=generator.device).to(leaf.device)
        for leaf in leaves
    ]
    tree = optree.tree_unflatten(spec, draws)
    if kind == "sphere":
        norms = torch.sqrt(functools.reduce(torch.add, [d.reshape(*batch, -1).pow(2).sum(-1) for d in draws]))
        tree = map(lambda d: d / norms.reshape((*batch, *([1] * (d.dim() - len(batch))))), tree)
    return tree


def ravel(x: PyTree, *, batch_ndim: int = 0) -> torch.Tensor:
    """Concatenates all leaves into one vector `[P]` (or `[*batch, P]` for stacked trees).

    Leaves are taken in optree order (dict keys sorted), the order of `ti.hessian` and
    `ti.to_dense`; `unravel` undoes it given a tree of the unbatched shapes.

    Args:
      x: a pytree of tensors sharing dtype and device.
      batch_ndim: leading dims kept as they are (1 for a stack `[k, *shape]`).

    Returns:
      Tensor `[*batch, P]`, in `x`'s dtype and device.

    Raises:
      ValueError: `x` has no leaves.

    Cost: O(prod(batch)·P) time and memory (one copy).

    Examples:
      >>> ti.ravel(params).shape
      torch.Size([27])
      >>> ti.ravel(ti.tree.stack([params, params]), batch_ndim=1).shape
      torch.Size([2, 27])
    """
    leaves = optree.tree_leaves(x, namespace="")
    if not leaves:
        raise ValueError("ti.tree.ravel: `x` has no leaves.")
    batch = leaves[0].shape[:batch_ndim]
    return torch.cat([leaf.reshape(*batch, -1) for leaf in leaves], dim=-1)


def unravel(flat: torch.Tensor, like: PyTree) -> PyTree:
    """Inverse of `ravel`: `[*batch, P]` -> tree with leaves `[*batch, *like_leaf.shape]`.

    Args:
      flat: tensor `[*batch, P]`, entries in `ravel`'s order.
      like: a pytree of tensors of total size P; only its structure and shapes are read.

    Returns:
      A pytree with `like`'s structure, leaves `[*batch, *leaf.shape]`, in `flat`'s dtype
      and device (views of `flat` where the reshape allows).

    Raises:
      ValueError: the last dimension of `flat` is not P.

    Cost: O(prod(batch)·P) time at most; no copy where the reshape is a view.

    Examples:
      >>> back = ti.unravel(ti.ravel(params), params)
      >>> all(torch.equal(back[k], params[k]) for k in params)
      True
    """
    leaves, spec = optree.tree_flatten(like, namespace="")
    sizes = [leaf.numel() for leaf in leaves]
    if flat.shape[-1] != sum(sizes):
        raise ValueError(f"ti.tree.unravel: `flat` must have last dimension P={sum(sizes)} (the size of `like`); "
                         f"got shape {tuple(flat.shape)}.")
    batch = flat.shape[:-1]
    parts = torch.split(flat, sizes, dim=-1)
    return optree.tree_unflatten(spec, [p.reshape((*batch, *leaf.shape)) for p, leaf in zip(parts, leaves)])


def select(params: dict, predicate: Callable[[str, torch.Tensor], bool]) -> dict:
    """The entries of a `dict[str, Tensor]` for which `predicate(name, tensor)` is true.

    Args:
      params: `dict[str, Tensor]`.
      predicate: `(name, tensor) -> bool`.

    Returns:
      A new dict of the chosen entries, in `params`' order (the tensors are not copied).

    Cost: one `predicate` call per entry.

    Examples:
      >>> list(ti.tree.select(params, lambda name, t: t.dim() == 2))
      ['weight']
    """
    return {name: t for name, t in params.items() if predicate(name, t)}


def partition(params: dict, predicate: Callable[[str, torch.Tensor], bool]) -> tuple[dict, dict]:
    """Splits a `dict[str, Tensor]` into (selected, rest) by `predicate(name, tensor)`.

    Args:
      params: `dict[str, Tensor]`.
      predicate: `(name, tensor) -> bool`.

    Returns:
      `(chosen, rest)`: two dicts whose union is `params` (the tensors are not copied).

    Cost: one `predicate` call per entry.

    Examples:
      >>> chosen, rest = ti.tree.partition(params, lambda name, t: name == "bias")
      >>> (list(chosen), list(rest))
      (['bias'], ['weight'])
    """
    chosen = select(params, predicate)
    return chosen, {name: t for name, t in params.items() if name not in chosen}


def merge(*dicts: dict) -> dict:
    """Union of disjoint `dict[str, Tensor]`s (the inverse of `partition`).

    Args:
      *dicts: dicts with no key in common.

    Returns:
      One dict holding every entry, in the order given.

    Raises:
      ValueError: a key appears in two dicts.

    Cost: O(number of entries).

    Examples:
      >>> sorted(ti.tree.merge(*ti.tree.partition(params, lambda name, t: name == "bias")))
      ['bias', 'weight']
    """
    out: dict = {}
    for d in dicts:
        clash = out.keys() & d.keys()
        if clash:
            raise ValueError(f"ti.tree.merge: the dicts must be disjoint; {sorted(clash)} appear twice.")
        out.update(d)
    return out


def stack(trees: list) -> PyTree:
    """List of same-structured trees -> one tree whose leaves have a leading axis of len(trees).

    Args:
      trees: a non-empty list of k pytrees of one structure and leaf shapes.

    Returns:
      A pytree with leaves `[k, *leaf.shape]`.

    Raises:
      ValueError: `trees` is empty, or the trees differ in structure.

    Cost: O(k·P) time and memory (one copy).

    Examples:
      >>> ti.tree.stack([params, params, params])["weight"].shape
      torch.Size([3, 3, 8])
    """
    if not trees:
        raise ValueError("ti.tree.stack: `trees` is empty.")
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees, namespace="")


def unstack(tree: PyTree) -> list:
    """Inverse of `stack`: a tree with leading axis k -> list of k trees.

    Args:
      tree: a stacked pytree, leaves `[k, *shape]`.

    Returns:
      A list of k pytrees with leaves `[*shape]` (views, not copies).

    Raises:
      ValueError: the leaves do not share one leading axis (as `leading_size`).

    Cost: O(k · number of leaves), no copy. A Python loop over k: for stacks of right-hand
    sides, not for per-example gradients (use vmap or `pairwise_vdot` there).

    Examples:
      >>> len(ti.tree.unstack(ti.tree.stack([params, params])))
      2
    """
    return [map(lambda leaf: leaf[i], tree) for i in range(leading_size(tree))]


def leading_size(tree: PyTree) -> int:
    """The common leading-axis size k of a stacked tree (checked).

    Args:
      tree: a stacked pytree, leaves `[k, *shape]`.

    Returns:
      k, a Python int.

    Raises:
      ValueError: a leaf is 0-d, or the leaves have different leading sizes.

    Cost: metadata only.

    Examples:
      >>> ti.tree.leading_size(ti.tree.stack([params] * 4))
      4
    """
    leaves = optree.tree_leaves(tree, namespace="")
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
    size = next(iter(sizes)) if len(sizes) == 1 else None
    if size is None:
        raise ValueError(f"ti.tree.leading_size: leaves must share one leading axis; got sizes {sorted(str(s) for s in sizes)}.")
    return size


def fork_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in `generator`'s state: it draws what `generator` would, and the caller's
    generator is not advanced, so the same call with the same generator gives the same numbers.

    Args:
      generator: a `torch.Generator` (on any device).

    Returns:
      A new `torch.Generator` on the same device, in the same state.

    Cost: one copy of the generator state.

    Examples:
      >>> g = torch.Generator().manual_seed(0)
      >>> a = torch.randn(3, generator=ti.tree.fork_generator(g))
      >>> torch.equal(a, torch.randn(3, generator=g))
      True
    """
    local = torch.Generator(device=generator.device)
    local.set_state(generator.get_state())
    return local
