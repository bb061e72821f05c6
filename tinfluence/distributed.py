"""Influence over many processes: the training set is sharded, reductions are all-reduced.

Every rank holds a CONTIGUOUS shard of the training set, the shards in rank order
(`shard(data, rank, world)` cuts them), the same parameters and the same test points.
Passing `group=` (a `torch.distributed` process group, or `torch.distributed.group.WORLD`)
to `ti.objective`, `ti.ggn_vp`, `ti.lissa`, `ti.influence`, `ti.tracin`, ... makes every sum
over training examples a sum over all shards: objective values, Hessian-vector products
(one all-reduce per operator application, for all right-hand sides together) and dense
Hessians are all-reduced; score matrices are computed for the local shard and, by default,
all-gathered along the training axis, so every rank returns the matrix one process would.
`group=None` (the default everywhere) never touches `torch.distributed`.

The collective contract (what every rank must do so that the collectives pair up):
  - every rank makes the same group calls, in the same order, with bitwise-identical
    parameters, test points and options; each group call checks this at its start
    (`check_replicated`: one all-gather of float64 checksums) and raises naming what
    differs and on which ranks;
  - every collective solve is given the SAME right-hand sides on every rank (the
    operator sums the ranks' products of one vector): `ti.self_influence` all-gathers
    each round's training gradients and solves their union, every rank keeping its rows;
  - every rank makes equally many collective calls, whatever its shard size (a rank whose
    shard is used up still joins the remaining rounds);
  - waits are bounded: `init` sets the group's timeout, and a collective that fails
    (a peer died, stalled past the timeout, or called something else) raises
    `CollectiveError` saying so, with the time waited.

Works with any backend whose collectives accept the parameters' device (gloo on CPU,
nccl on CUDA).
"""

from __future__ import annotations

import datetime
import math
from typing import TYPE_CHECKING, Any

import torch.distributed as dist

from .core import data as D
from .core.collectives import (
    DEFAULT_TIMEOUT,
    CollectiveError,
    all_reduce,
    check_replicated,
    gather_columns,
    gather_rows,
    global_size,
    offset,
    rounds,
    sizes,
)
from .core.tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["init", "CollectiveError", "check_replicated", "shard", "shard_bounds", "all_reduce", "global_size",
           "offset", "sizes", "gather_columns", "gather_rows", "rounds"]


def init(backend: str = "gloo", *, timeout: float = DEFAULT_TIMEOUT, **kwargs: Any) -> ProcessGroup | None:
    """Initializes the default process group with a bounded wait; returns `torch.distributed.group.WORLD`.

    `torch.distributed.init_process_group(backend, timeout=timeout s, **kwargs)`: under
    torchrun the rank, world size and rendezvous come from the environment. Every
    collective then fails after `timeout` seconds instead of waiting for a dead or stalled
    peer (torch's default is 30 minutes), and the `group=` functions turn that failure into
    a `CollectiveError` that says so. Choose `timeout` above the longest stretch of local
    work one rank does between two collectives (one chunk of gradients, one solve's local
    products). End every rank with `torch.distributed.destroy_process_group()`; if anything may
    still refer to the group (closures, caches), end the process right after it
    (`os._exit(0)` after flushing stdout and stderr, as `tinfluence demo --distributed` does):
    a gloo group destroyed only at interpreter shutdown can abort the process (SIGABRT,
    "terminate called without an active exception").

    Args:
      backend: "gloo" (CPU) or "nccl" (CUDA).
      timeout: seconds > 0 a collective waits for its peers (default 300).
      **kwargs: passed on (`init_method`, `rank`, `world_size`, ...).

    Returns:
      `torch.distributed.group.WORLD`, the group to pass as `group=`.

    Raises:
      ValueError: `timeout` is not a finite number > 0 (checked before anything is started).

    Cost: one rendezvous of all ranks.

    Examples:
      >>> ti.distributed.init("gloo", timeout=0)
      Traceback (most recent call last):
      ...
      ValueError: ti.distributed.init: `timeout` must be a finite number of seconds > 0; got 0.
    """
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"ti.distributed.init: `timeout` must be a finite number of seconds > 0; got {timeout!r}.")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)), **kwargs)
    return dist.group.WORLD


def _shard_bounds(where: str, n: int, rank: int, world: int) -> tuple[int, int]:
    """`shard_bounds` for the public call `where` (the name its errors give)."""
    if not (isinstance(world, int) and world >= 1):
        raise ValueError(f"{where}: `world` must be an int >= 1; got {world!r}.")
    if not (isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"{where}: `rank` must be an int in [0, {world}); got {rank!r}.")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Returns `(start, stop)` of shard `rank` of `world` over n examples.

    Shards are contiguous and in rank order; the first `n % world` shards hold one example
    more than the others (the split of `torch.tensor_split`).

    Args:
      n: the number of examples.
      rank: the shard, an int with 0 <= rank < world.
      world: the number of shards, an int >= 1.

    Returns:
      Two ints, the first example of the shard and one past its last.

    Raises:
      ValueError: bad `rank` or `world`.

    Cost: O(1).

    Examples:
      >>> ti.distributed.shard_bounds(10, 0, 3), ti.distributed.shard_bounds(10, 1, 3), ti.distributed.shard_bounds(10, 2, 3)
      ((0, 4), (4, 7), (7, 10))
    """
    return _shard_bounds("ti.distributed.shard_bounds", n, rank, world)


def shard(data: PyTree, rank: int, world: int) -> PyTree:
    """Returns shard `rank` of `world` of a data set: its contiguous slice of examples.

    Concatenating the shards in rank order gives `data` back; this is the layout every
    `group=` function assumes.

    Args:
      data: pytree of tensors with a common leading axis n (n >= world).
      rank: this process's rank, 0 <= rank < world.
      world: the number of processes.

    Returns:
      `data`'s examples `shard_bounds(n, rank, world)`, as a pytree of views (nothing copied).

    Raises:
      ValueError: bad `rank`/`world`, or fewer examples than processes.

    Cost: O(number of leaves); the leaves are sliced, not copied.

    Examples:
      >>> x, y = ti.distributed.shard(train, 1, 3)
      >>> x.shape, y.shape
      (torch.Size([20, 8]), torch.Size([20]))
    """
    n = D._count_examples(data, name="data", call="ti.distributed.shard")
    if isinstance(world, int) and n < world:
        raise ValueError(f"ti.distributed.shard: `data` has {n} examples, fewer than world={world}; every shard needs one.")
    start, stop = _shard_bounds("ti.distributed.shard", n, rank, world)
    return D.take(data, slice(start, stop))
