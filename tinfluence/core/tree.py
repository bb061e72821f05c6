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
    """Applies `fn` leaf by leaf; `rest` must have the structure of `tree`."""
    return optree.tree_map(fn, tree, *rest, namespace="")


def add(x: PyTree, y: PyTree) -> PyTree:
    """X + y, leaf by leaf."""
    return map(torch.add, x, y)


def sub(x: PyTree, y: PyTree) -> PyTree:
    """X − y, leaf by leaf."""
    return map(torch.sub, x, y)


def scale(alpha, x: PyTree) -> PyTree:
    """Alpha · x, for a Python number or a tensor broadcasting against each leaf."""
    return map(lambda leaf: alpha * leaf, x)


def add_scaled(x: PyTree, alpha, y: PyTree) -> PyTree:
    """X + alpha · y, leaf by leaf (axpy)."""
    return map(lambda a, b: a + alpha * b, x, y)


def vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """Full contraction Σ_leaves Σ_elements x·y: a 0-d tensor.

    For stacks use `torch.func.vmap(vdot)` (-> [k]) or `pairwise_vdot` (-> [m, n]).
    """
    leaves = optree.tree_leaves(map(lambda a, b: torch.sum(a * b), x, y), namespace="")
    return torch.stack(leaves).sum()


def pairwise_vdot(x: PyTree, y: PyTree) -> torch.Tensor:
    """All inner products between two stacks: leaves `[m, ...]` and `[n, ...]` -> `[m, n]`.

    One matrix product per leaf; this is how k test directions meet n training gradients.
    """
    products = map(lambda a, b: a.reshape(a.shape[0], -1) @ b.reshape(b.shape[0], -1).T, x, y)
    return torch.stack(optree.tree_leaves(products, namespace="")).sum(0)


def sq_norm(x: PyTree) -> torch.Tensor:
    """‖x‖², a 0-d tensor."""
    return vdot(x, x)


def norm(x: PyTree) -> torch.Tensor:
    """Euclidean norm over all leaves, a 0-d tensor."""
    return torch.sqrt(sq_norm(x))


def zeros_like(x: PyTree) -> PyTree:
    """Zeros with the structure, shapes, dtypes and devices of `x`."""
    return map(torch.zeros_like, x)


def size(x: PyTree) -> int:
    """Total number of elements P over all leaves."""
    return sum(leaf.numel() for leaf in optree.tree_leaves(x, namespace=""))


def random_like(x: PyTree, *, generator: torch.Generator, kind: str = "normal", batch: tuple[int, ...] = ()) -> PyTree:
    """Random tree shaped like `x` (with extra leading `batch` dims), drawn from `generator`.

    `kind="normal"`: i.i.d. N(0, 1) entries. `kind="sphere"`: each draw scaled to unit
    norm over the whole tree. Leaves are drawn in optree's (sorted-key) order on the
    generator's device and cast to each leaf's dtype and device, so the same generator
    state gives the same tree on every machine. The generator advances.
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
        norms = torch.sqrt(sum(d.reshape(*batch, -1).pow(2).sum(-1) for d in draws))
        tree = map(lambda d: d / norms.reshape((*batch, *([1] * (d.dim() - len(batch))))), tree)
    return tree


def ravel(x: PyTree, *, batch_ndim: int = 0) -> torch.Tensor:
    """Concatenates all leaves into one vector `[P]` (or `[*batch, P]` for stacked trees).

    Leaves are taken in optree order and must share dtype and device; `unravel` undoes
    it given a tree of the unbatched shapes.
    """
    leaves = optree.tree_leaves(x, namespace="")
    if not leaves:
        raise ValueError("ti.tree.ravel: `x` has no leaves.")
    batch = leaves[0].shape[:batch_ndim]
    return torch.cat([leaf.reshape(*batch, -1) for leaf in leaves], dim=-1)


def unravel(flat: torch.Tensor, like: PyTree) -> PyTree:
    """Inverse of `ravel`: `[*batch, P]` -> tree with leaves `[*batch, *like_leaf.shape]`.

    dtype and device follow `flat`; structure and shapes follow `like`.
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
    """The entries of a `dict[str, Tensor]` for which `predicate(name, tensor)` is true."""
    return {name: t for name, t in params.items() if predicate(name, t)}


def partition(params: dict, predicate: Callable[[str, torch.Tensor], bool]) -> tuple[dict, dict]:
    """Splits a `dict[str, Tensor]` into (selected, rest) by `predicate(name, tensor)`."""
    chosen = select(params, predicate)
    return chosen, {name: t for name, t in params.items() if name not in chosen}


def merge(*dicts: dict) -> dict:
    """Union of disjoint `dict[str, Tensor]`s (the inverse of `partition`)."""
    out: dict = {}
    for d in dicts:
        clash = out.keys() & d.keys()
        if clash:
            raise ValueError(f"ti.tree.merge: the dicts must be disjoint; {sorted(clash)} appear twice.")
        out.update(d)
    return out


def stack(trees: list) -> PyTree:
    """List of same-structured trees -> one tree whose leaves have a leading axis of len(trees)."""
    if not trees:
        raise ValueError("ti.tree.stack: `trees` is empty.")
    return optree.tree_map(lambda *leaves: torch.stack(leaves), *trees, namespace="")


def unstack(tree: PyTree) -> list:
    """Inverse of `stack`: a tree with leading axis k -> list of k trees."""
    return [map(lambda leaf: leaf[i], tree) for i in range(leading_size(tree))]


def leading_size(tree: PyTree) -> int:
    """The common leading-axis size of a stacked tree (checked)."""
    leaves = optree.tree_leaves(tree, namespace="")
    sizes = {leaf.shape[0] if leaf.dim() else None for leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(f"ti.tree.leading_size: leaves must share one leading axis; got sizes {sorted(str(s) for s in sizes)}.")
    return sizes.pop()


def fork_generator(generator: torch.Generator) -> torch.Generator:
    """A new generator in `generator`'s state: it draws what `generator` would, and the caller's
    generator is not advanced, so the same call with the same generator gives the same numbers.
    """
    local = torch.Generator(device=generator.device)
    local.set_state(generator.get_state())
    return local
