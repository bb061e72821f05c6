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

Works with any backend whose collectives accept the parameters' device (gloo on CPU,
nccl on CUDA).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .core import data as D
from .core import tree as tr

__all__ = ["shard", "shard_bounds", "all_reduce", "global_size", "offset", "gather_columns"]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Returns `(start, stop)` of shard `rank` of `world` over n examples.

    Shards are contiguous and in rank order; the first `n % world` shards hold one example
    more than the others (the split of `torch.tensor_split`).
    """
    if not (isinstance(world, int) and world >= 1):
        raise ValueError(f"ti.distributed.shard: `world` must be an int >= 1; got {world!r}.")
    if not (isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"ti.distributed.shard: `rank` must be an int in [0, {world}); got {rank!r}.")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def shard(data, rank: int, world: int):
    """Returns shard `rank` of `world` of a data set: its contiguous slice of examples.

    Concatenating the shards in rank order gives `data` back; this is the layout every
    `group=` function assumes.

    Args:
      data: pytree of tensors with a common leading axis n (n >= world).
      rank: this process's rank, 0 <= rank < world.
      world: the number of processes.

    Raises:
      ValueError: bad `rank`/`world`, or fewer examples than processes.
    """
    n = D.num_examples(data, name="data", where="ti.distributed.shard")
    if isinstance(world, int) and n < world:
        raise ValueError(f"ti.distributed.shard: `data` has {n} examples, fewer than world={world}; every shard needs one.")
    start, stop = shard_bounds(n, rank, world)
    return D.take(data, slice(start, stop))


def _device(group) -> torch.device:
    """Where the backend's collectives want small bookkeeping tensors: cuda for nccl, else cpu."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(value, group):
    """Returns the sum over ranks of a tensor or pytree of tensors (inputs are not modified).

    All leaves travel in ONE collective (flattened and concatenated), whatever the pytree.
    """
    if group is None:
        return value
    flat = tr.ravel(value).detach().clone()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return tr.unravel(flat, value)


def global_size(n_local: int, group) -> int:
    """Returns Σ over ranks of `n_local` (the global number of examples); `n_local` without a group."""
    if group is None:
        return n_local
    sizes = _sizes(n_local, group)
    return int(sizes.sum())


def _sizes(n_local: int, group) -> torch.Tensor:
    """The shard sizes of all ranks, in rank order: LongTensor `[world]`."""
    world = dist.get_world_size(group)
    mine = torch.tensor([n_local], dtype=torch.long, device=_device(group))
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return torch.cat(every).cpu()


def offset(n_local: int, group) -> tuple[int, int]:
    """Returns `(start, n)`: this rank's first global example id and the global n."""
    if group is None:
        return 0, n_local
    sizes = _sizes(n_local, group)
    rank = dist.get_rank(group)
    return int(sizes[:rank].sum()), int(sizes.sum())


def gather_columns(local: torch.Tensor, group) -> torch.Tensor:
    """Returns the ranks' blocks `[..., n_local_r]` concatenated along the last axis, rank order.

    Shards may differ in size: blocks are padded to the largest for the collective and
    trimmed after.
    """
    if group is None:
        return local
    sizes = _sizes(local.shape[-1], group)
    width = int(sizes.max())
    padded = torch.nn.functional.pad(local, (0, width - local.shape[-1])).contiguous()
    every = [torch.empty_like(padded) for _ in range(len(sizes))]
    dist.all_gather(every, padded, group=group)
    return torch.cat([block[..., :int(s)] for block, s in zip(every, sizes)], dim=-1)

