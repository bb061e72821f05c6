"""Data sets as pytrees of tensors that share a leading example axis.

`(x, y)`, `{"input_ids": ..., "labels": ...}` or any nest of those is a data set; its
examples are the slices along axis 0. Every reduction over a data set walks it in chunks
(`chunks`, `chunk_sum`), so memory is bounded by the chunk size, never by n.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterable, Iterator, cast

import optree
import torch

from . import checks
from . import tree as tr
from .tree import PyTree

if TYPE_CHECKING:
    from torch.utils.data import Dataset

DEFAULT_CHUNK_SIZE = 1024

__all__ = ["num_examples", "chunks", "chunk_sum", "chunk_cat", "take", "batch_of_one", "from_loader",
           "DEFAULT_CHUNK_SIZE"]


def num_examples(data: PyTree) -> int:
    """The number of examples n: the common leading-axis size of every tensor leaf of `data`.

    Args:
      data: a data set, a pytree of tensors sharing a leading example axis, e.g. `(x, y)`.

    Returns:
      n, a Python int >= 1.

    Raises:
      TypeError: a leaf is not a tensor.
      ValueError: `data` has no leaves, a 0-d leaf, leaves with different leading sizes, or n = 0.

    Cost: metadata only.

    Examples:
      >>> ti.num_examples(train)
      60
    """
    return _count_examples(data, name="data", call="ti.num_examples")


def _count_examples(data, *, name: str = "data", call: str = "ti") -> int:
    """`ti.num_examples(data)` for the public call `call` whose argument `name` `data` is (the
    names its errors give, e.g. `call="ti.influence", name="test"`).

    Examples:
      >>> ti.data._count_examples(test, name="test", call="ti.influence")
      5
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


def take(data: PyTree, index: slice | torch.Tensor) -> PyTree:
    """The examples at `index`, as a data set: every leaf indexed along its example axis.

    Args:
      data: a data set (leaves `[n, ...]`).
      index: a slice, an int tensor of ids `[m]` (repeats allowed) or a bool mask `[n]`.

    Returns:
      A data set with `data`'s structure and leaves `[m, ...]`.

    Raises:
      IndexError: an id is out of range, or a mask has another length (from torch).

    Cost: O(m · per-example size) memory (a view for a slice).

    Examples:
      >>> x, y = ti.take(train, top_k)
      >>> x.shape, torch.equal(y, train[1].index_select(0, top_k))
      (torch.Size([4, 8]), True)
    """
    return tr.map(lambda leaf: leaf[index], data)


def batch_of_one(example: PyTree) -> PyTree:
    """One example (leaves without the example axis) as a batch: every leaf gains a leading axis of size 1.

    Args:
      example: a pytree of tensors, one example.

    Returns:
      A data set of one example, leaves `[1, ...]` (views).

    Cost: metadata only.

    Examples:
      >>> ti.data.batch_of_one((train[0][0], train[1][0]))[0].shape
      torch.Size([1, 8])
    """
    return tr.map(lambda leaf: leaf.unsqueeze(0), example)


def _check_alike(call: str, train, test, names: tuple[str, str] = ("train", "test")) -> None:
    """Raises `ArgumentError` unless `test` has `train`'s pytree structure and per-example leaf shapes.

    Scores pair every test example with every training example through one loss, so both
    must be batches of the same kind of example.

    Args:
      call: the public call named in the message (`"ti.influence"`).
      train: the reference data set.
      test: the data set checked against it.
      names: the two arguments' names in `call`'s signature.

    Returns:
      None.

    Raises:
      ArgumentError: the structures differ, or a leaf's per-example shape (`leaf.shape[1:]`) does.

    Cost: metadata only.

    Examples:
      >>> try:
      ...     ti.data._check_alike("ti.influence", train, (test[0][:, :4], test[1]))
      ... except ti.ArgumentError as err:
      ...     print(str(err).startswith("ti.influence: `test` leaf"))
      True
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


def chunks(data: PyTree, size: int | None = None) -> Iterator:
    """Consecutive slices of at most `size` examples, in order (a generator).

    Args:
      data: a data set (leaves `[n, ...]`).
      size: examples per chunk, an int >= 1; None: 1024.

    Yields:
      ⌈n / size⌉ data sets (views of `data`), the last one possibly shorter.

    Raises:
      ArgumentError: `size` is neither None nor an int >= 1 (when iteration starts).
      TypeError, ValueError: `data` is not a data set (as `ti.num_examples`).

    Cost: no copy (each chunk is a slice); a consumer holds one chunk at a time.

    Examples:
      >>> tuple(ti.num_examples(chunk) for chunk in ti.chunks(train, 25))
      (25, 25, 10)
    """
    return _chunks(data, size, call="ti.data.chunks", name="size")


def _chunks(data, size: int | None, *, call: str, name: str) -> Iterator:
    """`chunks` for the public call `call` whose argument `name` is `size` (the names its errors give)."""
    size = checks.integer(call, name, size, minimum=1, none=True)
    size = DEFAULT_CHUNK_SIZE if size is None else size
    n = num_examples(data)
    for start in range(0, n, size):
        yield take(data, slice(start, start + size))


def chunk_sum(fn: Callable, data: PyTree, chunk_size: int | None = None) -> PyTree:
    """Σ over chunks of `fn(chunk)`, a tensor or pytree of tensors.

    The single place where a sum over the training set is reduced; a sharded run
    reduces the same partial sums across processes.

    Args:
      fn: `chunk -> tensor or pytree`, each call's result of one structure and shape.
      data: a data set (leaves `[n, ...]`).
      chunk_size: examples per chunk, an int >= 1; None: 1024.

    Returns:
      The sum, with `fn`'s output structure and shapes.

    Raises:
      ArgumentError: `chunk_size` is neither None nor an int >= 1.

    Cost: ⌈n / chunk_size⌉ calls of `fn`; memory of one chunk's result plus the running sum.

    Examples:
      >>> total = ti.data.chunk_sum(lambda chunk: chunk[0].sum(0), train, 7)
      >>> torch.allclose(total, train[0].sum(0))
      True
    """
    return _chunk_sum(fn, data, chunk_size, call="ti.data.chunk_sum")


def _chunk_sum(fn: Callable, data, chunk_size: int | None = None, *, call: str):
    """`chunk_sum` for the public call `call` (the name its errors give)."""
    total = None
    for chunk in _chunks(data, chunk_size, call=call, name="chunk_size"):
        part = fn(chunk)
        total = part if total is None else tr.add(total, part)
    return total


def chunk_cat(fn: Callable, data: PyTree, chunk_size: int | None = None, *, dim: int = 0, indexed: bool = False) -> PyTree:
    """`fn(chunk)` for every chunk, concatenated along `dim` (a tensor or a pytree of tensors).

    The single place where per-chunk results over a data set are stitched together, e.g.
    per-example gradients (`dim=0`) or score columns `[n_test, c]` (`dim=1`).

    Args:
      fn: `chunk -> tensor or pytree` (`(start, chunk) -> ...` with `indexed`), every
        result of one structure, sized by the chunk along `dim`.
      data: a data set (leaves `[n, ...]`).
      chunk_size: examples per chunk, an int >= 1; None: 1024.
      dim: the axis along which the results are concatenated.
      indexed: also pass `start`, the id of the chunk's first example (for messages that
        name examples).

    Returns:
      `fn`'s output structure, leaves concatenated along `dim` (n along it when `fn` keeps
      one entry per example).

    Raises:
      ArgumentError: `chunk_size` is neither None nor an int >= 1.

    Cost: ⌈n / chunk_size⌉ calls of `fn`; memory of all results (they are kept).

    Examples:
      >>> starts = ti.data.chunk_cat(lambda start, chunk: torch.full((ti.num_examples(chunk),), start),
      ...                            train, 25, indexed=True)
      >>> torch.equal(starts, torch.arange(60) // 25 * 25)
      True
    """
    return _chunk_cat(fn, data, chunk_size, dim=dim, call="ti.data.chunk_cat", indexed=indexed)


def _chunk_cat(fn: Callable, data, chunk_size: int | None = None, *, dim: int = 0, call: str, indexed: bool = False):
    """`chunk_cat` for the public call `call` (the name its errors give)."""
    size = DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size
    parts = [fn(j * size, chunk) if indexed else fn(chunk)
             for j, chunk in enumerate(_chunks(data, chunk_size, call=call, name="chunk_size"))]
    return parts[0] if len(parts) == 1 else tr.map(lambda *leaves: torch.cat(leaves, dim=dim), *parts)


def from_loader(source: Iterable | Dataset) -> PyTree:
    """Concatenates what a `DataLoader`, a `Dataset` or any iterable of batches yields.

    Anything with `__getitem__` and `__len__` (a map-style `Dataset`) is read as a data set
    of EXAMPLES, through a DataLoader with batch size 256 and no shuffling. A Python list or
    tuple is refused, since it could hold batches or examples: pass `iter(batches)` to
    concatenate batches, or wrap examples in a `Dataset`.

    Args:
      source: a `DataLoader`, a map-style `Dataset`, or an iterable of batches, each a
        pytree of tensors (or arrays) of one structure.

    Returns:
      One data set with the batches' structure, leading axes concatenated (n = the
      number of examples read), in the batches' dtypes.

    Raises:
      ArgumentError: `source` is a list or tuple (ambiguous: batches or examples).
      ValueError: `source` yields no batch, or a batch has another structure than the first.

    Cost: reads `source` once; holds every batch and then the result (O(n) memory).

    Examples:
      >>> x, y = ti.from_loader(torch.utils.data.TensorDataset(*train))
      >>> torch.equal(x, train[0]) and torch.equal(y, train[1])
      True
      >>> batches = [ti.take(train, slice(0, 30)), ti.take(train, slice(30, 60))]
      >>> ti.num_examples(ti.from_loader(iter(batches)))
      60
    """
    if isinstance(source, (list, tuple)):
        raise checks.ArgumentError(
            f"ti.from_loader: `source` is a {type(source).__name__}, which could hold batches or examples; pass "
            "iter(batches) to concatenate batches, or a Dataset (e.g. torch.utils.data.TensorDataset) of examples.")
    if hasattr(source, "__getitem__") and hasattr(source, "__len__") and not isinstance(source, torch.utils.data.DataLoader):
        # a map-style dataset (it has __getitem__ and __len__), which a static checker cannot infer from hasattr
        source = torch.utils.data.DataLoader(cast("Dataset", source), batch_size=256, shuffle=False)
    batches = list(cast(Iterable, source))
    if not batches:
        raise ValueError("ti.from_loader: `source` yielded no batches.")
    spec = optree.tree_structure(batches[0], namespace="")
    for i, b in enumerate(batches):
        if optree.tree_structure(b, namespace="") != spec:
            raise ValueError(f"ti.from_loader: batch {i} has structure {optree.tree_structure(b, namespace='')}; batch 0 has {spec}.")
    return optree.tree_map(lambda *leaves: torch.cat([torch.as_tensor(leaf) for leaf in leaves]), *batches, namespace="")
