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
import time

import optree
import torch
import torch.distributed as dist

from . import data as D
from . import tree as tr

__all__ = ["init", "CollectiveError", "check_replicated", "shard", "shard_bounds", "all_reduce", "global_size",
           "offset", "sizes", "gather_columns", "gather_rows", "rounds"]

DEFAULT_TIMEOUT = 300.0   # seconds a collective waits for its peers before failing (torch's default is 30 min)
_CHECKSUM_WIDTH = 1021    # period of the checksum's position weights (a prime)


class CollectiveError(RuntimeError):
    """A collective over the process group failed: a peer process died, stalled past the group's timeout,
    or called a different collective."""


def init(backend: str = "gloo", *, timeout: float = DEFAULT_TIMEOUT, **kwargs):
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
    """
    if not (isinstance(timeout, (int, float)) and math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"ti.distributed.init: `timeout` must be a finite number of seconds > 0; got {timeout!r}.")
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=float(timeout)), **kwargs)
    return dist.group.WORLD


def _collective(where: str, group, call):
    """Runs one collective; a backend failure becomes a `CollectiveError` naming the rank and the wait."""
    tic = time.monotonic()
    try:
        return call()
    except RuntimeError as err:
        waited = time.monotonic() - tic
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise CollectiveError(
            f"{where}: a collective over the process group failed on rank {rank} of {world} after waiting "
            f"{waited:.1f} s: another rank died, stalled past the group's timeout, or made a different call "
            f"(backend: {first}). Look at the other ranks' output for their own error; every rank must make the "
            "same group calls with the same arguments. If a rank is only slow, raise the timeout "
            "(ti.distributed.init(timeout=...)); then rerun.") from err


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


def all_reduce(value, group, *, where: str = "ti.distributed.all_reduce"):
    """Returns the sum over ranks of a tensor or pytree of tensors (inputs are not modified).

    All leaves travel in ONE collective (flattened and concatenated), whatever the pytree.
    """
    if group is None:
        return value
    flat = tr.ravel(value).detach().clone()
    _collective(where, group, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group))
    return tr.unravel(flat, value)


def _all_gather(where: str, group, tensor: torch.Tensor) -> list:
    """The ranks' equally shaped `tensor`s, in rank order (one collective)."""
    every = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    _collective(where, group, lambda: dist.all_gather(every, tensor.contiguous(), group=group))
    return every


def _checksum(value) -> torch.Tensor:
    """float64 `[4]`: (number of elements, Σx, Σ wᵢxᵢ, Σ|xᵢ|) over a pytree of tensors or numbers.

    The weights wᵢ = a(i mod 1021)·b(i div 1021), a and b fixed cosines, make the last
    entry depend on every element's position, so reordered or altered elements change it.
    One pass over the data in float64; no weight vector of the data's size is built.
    """
    leaves = [torch.as_tensor(leaf) for leaf in optree.tree_leaves(value, namespace="")]
    total = torch.zeros(4, dtype=torch.float64)
    for leaf in leaves:
        flat = leaf.detach().reshape(-1).to(torch.float64)
        rows = -(-flat.numel() // _CHECKSUM_WIDTH)
        grid = torch.nn.functional.pad(flat, (0, rows * _CHECKSUM_WIDTH - flat.numel())).reshape(rows, _CHECKSUM_WIDTH)
        a = torch.cos(0.7548776662 * torch.arange(1, _CHECKSUM_WIDTH + 1, dtype=torch.float64, device=flat.device))
        b = torch.cos(0.5698402910 * torch.arange(1, rows + 1, dtype=torch.float64, device=flat.device))
        weighted = ((grid * a).sum(1) * b).sum()
        total = total + torch.stack([torch.tensor(float(flat.numel()), dtype=torch.float64, device=flat.device),
                                     flat.sum(), weighted, flat.abs().sum()]).cpu()
    return total


def check_replicated(where: str, group, **named) -> None:
    """Raises ValueError unless every rank holds the same value for each named argument.

    `named` maps argument names (e.g. `params`, `test`, `l2`) to pytrees of tensors or
    numbers that the collective contract requires to be identical on every rank. One
    all-gather of 4 float64 checksums per argument; costs one pass over the values.
    Equality is bitwise up to float64 summation round-off: retraining on every rank
    passes only when the training is deterministic; otherwise load or broadcast one
    rank's parameters.
    """
    if group is None or not named:
        return
    names = list(named)
    mine = torch.stack([_checksum(named[name]) for name in names]).to(_device(group))   # [m, 4]
    every = torch.stack(_all_gather(where, group, mine)).cpu()                              # [world, m, 4]
    bound = 64 * torch.finfo(torch.float64).eps * every[..., 3].amax(0)                    # [m] round-off of the sums
    differs = ((every - every[0]).abs() > bound[:, None]).any(-1)                          # [world, m]
    if differs.any():
        parts = [f"`{name}` differs from rank 0's on rank(s) {differs[:, j].nonzero().flatten().tolist()}"
                 for j, name in enumerate(names) if differs[:, j].any()]
        raise ValueError(
            f"{where}: with `group`, every rank must pass the same {', '.join(f'`{n}`' for n in names)} (only the "
            f"training data is sharded); {'; '.join(parts)}. Give every rank the same values (load them from one "
            "file, or broadcast rank 0's with torch.distributed.broadcast), or shard them with ti.distributed.shard "
            "if they are training data.")


def global_size(n_local: int, group) -> int:
    """Returns Σ over ranks of `n_local` (the global number of examples); `n_local` without a group."""
    if group is None:
        return n_local
    sizes = _sizes(n_local, group)
    return int(sizes.sum())


def _sizes(n_local: int, group) -> torch.Tensor:
    """The shard sizes of all ranks, in rank order: LongTensor `[world]`."""
    mine = torch.tensor([n_local], dtype=torch.long, device=_device(group))
    return torch.cat(_all_gather("ti.distributed", group, mine)).cpu()


def sizes(n_local: int, group) -> torch.Tensor:
    """The shard sizes of all ranks in rank order, LongTensor `[world]` (`[n_local]` without a group)."""
    return torch.tensor([n_local]) if group is None else _sizes(n_local, group)


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
    widths = _sizes(local.shape[-1], group)
    padded = torch.nn.functional.pad(local, (0, int(widths.max()) - local.shape[-1]))
    every = _all_gather("ti.distributed.gather_columns", group, padded)
    return torch.cat([block[..., :int(s)] for block, s in zip(every, widths)], dim=-1)


def gather_rows(local, counts: torch.Tensor, group, *, where: str = "ti.distributed.gather_rows"):
    """Returns the ranks' stacks (pytrees with leading axis `counts[r]`) concatenated in rank order.

    `counts`: LongTensor `[world]`, every rank's number of rows (known to all ranks). All
    leaves travel in ONE all-gather, each rank's rows zero-padded to the largest count and
    trimmed after. Leaves `[Σ counts, ...]`; every rank gets the same stack (`local` without a group).
    """
    if group is None:
        return local
    leaves = optree.tree_leaves(local, namespace="")
    flat = torch.cat([leaf.reshape(leaf.shape[0], math.prod(leaf.shape[1:])) for leaf in leaves], dim=1)  # [rows, P]
    padded = torch.nn.functional.pad(flat, (0, 0, 0, int(counts.max()) - flat.shape[0]))
    every = _all_gather(where, group, padded)
    union = torch.cat([block[:int(c)] for block, c in zip(every, counts)])     # [Σ counts, P]
    like = tr.map(lambda leaf: leaf[0] if leaf.shape[0] else leaf.new_zeros(leaf.shape[1:]), local)
    return tr.unravel(union, like)


def rounds(counts: torch.Tensor, per_round: int) -> list:
    """The collective schedule over shards of sizes `counts` `[world]`, `per_round` rows per rank per round.

    Returns one LongTensor `[world, 2]` per round, the (start, stop) of every rank's rows
    in that round (empty, start == stop, once a rank's shard is used up). Every rank gets
    the same list, so every rank makes the same number of collective calls.
    """
    total = max(1, -(-int(counts.max()) // per_round))
    return [torch.stack([counts.clamp(max=r * per_round), counts.clamp(max=(r + 1) * per_round)], dim=1)
            for r in range(total)]

