"""Data sets as pytrees of tensors that share a leading example axis.

`(x, y)`, `{"input_ids": ..., "labels": ...}` or any nest of those is a data set; its
examples are the slices along axis 0. Every reduction over a data set walks it in chunks
(`chunks`, `chunk_sum`), so memory is bounded by the chunk size, never by n.
"""

from __future__ import annotations

from typing import Callable, Iterator

import optree
import torch

from . import checks
from . import tree as tr

DEFAULT_CHUNK_SIZE = 1024

__all__ = ["num_examples", "chunks", "chunk_sum", "chunk_cat", "take", "batch_of_one", "from_loader",
           "DEFAULT_CHUNK_SIZE"]


def num_examples(data) -> int:
    """The common leading-axis size n of every tensor leaf of `data` (a pytree of tensors sharing axis 0)."""
    return _count_examples(data, name="data", call="ti.num_examples")


def _count_examples(data, *, name: str = "data", call: str = "ti") -> int:
    """The common leading-axis size n of every tensor leaf of `data`, for the public call `call`
    whose argument `name` it is (the names its errors give).

    Raises:
      TypeError: a leaf is not a tensor.
      ValueError: `data` has no leaves, a 0-d leaf, leaves with different leading sizes, or n = 0.
    """
    paths, leaves, _ = optree.tree_flatten_with_path(data, namespace="")
    if not leaves:
        raise ValueError(f"{call}: `{name}` has no tensors; expected a pytree of tensors sharing a leading example axis, e.g. (x, y).")
    sizes = {}
    for path, leaf in zip(paths, leaves):
        if not isinstance(leaf, torch.Tensor):
            raise TypeError(f"{call}: `{name}` leaf {path} must be a tensor; got {type(leaf).__name__}.")
        if leaf.dim() == 0:
            raise ValueError(f"{call}: `{name}` leaf {path} is 0-d; every leaf needs a leading example axis.")
        sizes[path] = leaf.shape[0]
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{p}: {s}" for p, s in sizes.items())
        raise ValueError(f"{call}: `{name}` leaves must share one leading (example) axis; got {listed}.")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError(f"{call}: `{name}` is empty (0 examples).")
    return n


def take(data, index) -> object:
    """The examples at `index` (a slice, an int tensor of ids or a bool mask), as a data set."""
    return tr.map(lambda leaf: leaf[index], data)


def batch_of_one(example) -> object:
    """One example (leaves without the example axis) as a batch: every leaf gains a leading axis of size 1."""
    return tr.map(lambda leaf: leaf.unsqueeze(0), example)


def _check_alike(call: str, train, test, names: tuple[str, str] = ("train", "test")) -> None:
    """Raises `ArgumentError` unless `test` has `train`'s pytree structure and per-example leaf shapes.

    Scores pair every test example with every training example through one loss, so both
    must be batches of the same kind of example. Cost: metadata only.
    """
    a, b = names
    train_spec, test_spec = optree.tree_structure(train, namespace=""), optree.tree_structure(test, namespace="")
    if train_spec != test_spec:
        raise checks.ArgumentError(f"{call}: `{b}` must have the structure of `{a}` {train_spec}; got {test_spec}. "
                                   f"Pass both as the same kind of batch, e.g. (x, y) pairs.")
    paths, train_leaves, _ = optree.tree_flatten_with_path(train, namespace="")
    for path, x, y in zip(paths, train_leaves, optree.tree_leaves(test, namespace="")):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape[1:] != y.shape[1:]:
            raise checks.ArgumentError(
                f"{call}: `{b}` leaf {path} must have per-example shape "
                f"{list(x.shape[1:])} like `{a}`; got {list(y.shape[1:])}. Reshape or pad `{b}` to `{a}`'s "
                "per-example shape.")


def chunks(data, size: int | None = None) -> Iterator:
    """Consecutive slices of at most `size` examples (default 1024), in order."""
    return _chunks(data, size, call="ti.data.chunks", name="size")


def _chunks(data, size: int | None, *, call: str, name: str) -> Iterator:
    """`chunks` for the public call `call` whose argument `name` is `size` (the names its errors give)."""
    size = checks.integer(call, name, size, minimum=1, none=True)
    size = DEFAULT_CHUNK_SIZE if size is None else size
    n = num_examples(data)
    for start in range(0, n, size):
        yield take(data, slice(start, start + size))


def chunk_sum(fn: Callable, data, chunk_size: int | None = None):
    """Σ over chunks of `fn(chunk)`, a tensor or pytree of tensors.

    The single place where a sum over the training set is reduced; a sharded run
    reduces the same partial sums across processes.
    """
    return _chunk_sum(fn, data, chunk_size, call="ti.data.chunk_sum")


def _chunk_sum(fn: Callable, data, chunk_size: int | None = None, *, call: str):
    """`chunk_sum` for the public call `call` (the name its errors give)."""
    total = None
    for chunk in _chunks(data, chunk_size, call=call, name="chunk_size"):
        part = fn(chunk)
        total = part if total is None else tr.add(total, part)
    return total


def chunk_cat(fn: Callable, data, chunk_size: int | None = None, *, dim: int = 0, indexed: bool = False):
    """`fn(chunk)` for every chunk, concatenated along `dim` (a tensor or a pytree of tensors).

    The single place where per-chunk results over a data set are stitched together, e.g.
    per-example gradients (`dim=0`) or score columns `[n_test, c]` (`dim=1`). With
    `indexed`, `fn(start, chunk)` also gets the id of the chunk's first example (for
    messages that name examples).
    """
    return _chunk_cat(fn, data, chunk_size, dim=dim, call="ti.data.chunk_cat", indexed=indexed)


def _chunk_cat(fn: Callable, data, chunk_size: int | None = None, *, dim: int = 0, call: str, indexed: bool = False):
    """`chunk_cat` for the public call `call` (the name its errors give)."""
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    parts = [fn(j * size, chunk) if indexed else fn(chunk)
             for j, chunk in enumerate(_chunks(data, chunk_size, call=call, name="chunk_size"))]
    return parts[0] if len(parts) == 1 else tr.map(lambda *leaves: torch.cat(leaves, dim=dim), *parts)


def from_loader(source) -> object:
    """Concatenates what a `DataLoader`, a `Dataset` or any iterable of batches yields.

    A `Dataset` (has `__getitem__` and `__len__`) is read through a DataLoader with
    batch size 256 and no shuffling. Every batch must be a pytree of tensors of one
    structure; the result is one data set with the leading axes concatenated.
    """
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, torch.utils.data.DataLoader):
        source = torch.utils.data.DataLoader(source, batch_size=256, shuffle=False)
    batches = list(source)
    if not batches:
        raise ValueError("ti.from_loader: `source` yielded no batches.")
    spec = optree.tree_structure(batches[0], namespace="")
    for i, b in enumerate(batches):
        if optree.tree_structure(b, namespace="") != spec:
            raise ValueError(f"ti.from_loader: batch {i} has structure {optree.tree_structure(b, namespace='')}; batch 0 has {spec}.")
    return optree.tree_map(lambda *leaves: torch.cat([torch.as_tensor(leaf) for leaf in leaves]), *batches, namespace="")
