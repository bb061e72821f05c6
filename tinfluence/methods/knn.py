"""FastIF candidate pre-selection: the k training points nearest each test point in a feature space."""

from __future__ import annotations

from typing import Callable

import torch

from ..core import checks
from ..core import data as D
from ..core.tree import PyTree

__all__ = ["knn_candidates"]


def _features(features_fn: Callable, params, data, chunk_size, where: str) -> torch.Tensor:
    """`features_fn(params, chunk)` for every chunk, checked to be `[B, F]`, concatenated."""
    parts = []
    for chunk in D.chunks(data, chunk_size):
        f = features_fn(params, chunk)
        b = D.num_examples(chunk)
        if not isinstance(f, torch.Tensor) or f.dim() != 2 or f.shape[0] != b:
            got = f"shape {list(f.shape)}" if isinstance(f, torch.Tensor) else type(f).__name__
            raise ValueError(f"{where}: `features_fn` must return a [B, F] tensor (B = {b} examples in the batch); got {got}.")
        parts.append(f.detach())
    return torch.cat(parts)


def knn_candidates(features_fn: Callable, params: PyTree, train: PyTree, test: PyTree, k: int, *,
                   chunk_size: int | None = None) -> torch.Tensor:
    """Returns the ids of the k training points nearest each test point, LongTensor `[n_test, k]`.

    Nearest in Euclidean distance between `features_fn(params, batch) -> [B, F]` (e.g. a
    penultimate layer, or the inputs), nearest first (ties by lower id). Pass the result
    to `ti.influence(..., candidates=)` to score only these pairs (FastIF): influence is
    concentrated on training points that resemble the test point.

    Args:
      features_fn: `(params, batch) -> Tensor[B, F]`.
      params: passed to `features_fn`.
      train: training set, leading axis n_train.
      test: test set, leading axis n_test.
      k: candidates per test point, 1 <= k <= n_train.
      chunk_size: examples per `features_fn` call and per distance block (default 1024).

    Returns:
      LongTensor `[n_test, k]` of training ids, on the features' device.

    Raises:
      ArgumentError: `k` out of range, a bad `chunk_size`, `features_fn` not a function.
      ValueError: `features_fn` not returning `[B, F]`; bad or mismatched data.

    Cost: one forward pass of `features_fn` over test and over train, chunk by chunk, and
    O(n_test · n_train · F) for the distances (one `torch.cdist` per training chunk, merged
    into a running top-k). Memory: O((n_test + chunk_size) · F) features and
    O(n_test · (k + chunk_size)) distances, never n_test × n_train × F.

    Examples:
      >>> ids = ti.knn_candidates(lambda p, batch: batch[0], params, train, test, k=3)   # nearest inputs
      >>> ids.shape
      torch.Size([5, 3])
      >>> torch.equal(ids, torch.cdist(test[0], train[0]).argsort(dim=1)[:, :3])
      True

    References:
      Guo, Rajani, Hase, Bansal & Xiong, FastIF: Scalable Influence Functions for
      Efficient Model Interpretation and Debugging, EMNLP 2021.
    """
    where = "ti.knn_candidates"
    checks.function(where, "features_fn", features_fn, "(params, batch) -> Tensor[B, F]")
    checks.params(where, params)
    n_train = D._count_examples(train, name="train", call=where)
    D._count_examples(test, name="test", call=where)
    D._check_alike(where, train, test)
    checks.chunk_size(where, chunk_size)
    k = checks.integer(where, "k", k, minimum=1, maximum=n_train, hint=f"(n_train = {n_train}.)")
    query = _features(features_fn, params, test, chunk_size, where)                     # [n_test, F]
    best_d = torch.empty(query.shape[0], 0, dtype=query.dtype, device=query.device)
    best_i = torch.empty(query.shape[0], 0, dtype=torch.long, device=query.device)
    start = 0
    for chunk in D.chunks(train, chunk_size):
        keys = _features(features_fn, params, chunk, None, where)                       # [c, F]
        ids = torch.arange(start, start + keys.shape[0], device=query.device)
        start += keys.shape[0]
        d = torch.cat([best_d, torch.cdist(query, keys.to(query.dtype))], dim=1)
        i = torch.cat([best_i, ids.expand(query.shape[0], -1)], dim=1)
        # stable sort keeps the lower id first among equal distances (earlier ids come first in `i`)
        order = torch.sort(d, dim=1, stable=True).indices[:, :k]
        best_d, best_i = d.gather(1, order), i.gather(1, order)
    return best_i
