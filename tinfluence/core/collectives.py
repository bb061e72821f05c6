"""Collectives over a `torch.distributed` process group, as kernels, solvers and estimators need them.

Every function is the identity (no `torch.distributed` call) when `group` is None, so the
layers above call them unconditionally. All leaves of a pytree travel in ONE collective.
Every collective of the library goes through `_collective`, which turns a backend failure
(a peer died, stalled past the group's timeout, or made another call) into a
`CollectiveError` saying so. The set-up of a run (`init`, `shard`) is `ti.distributed`'s;
the contract every rank must keep is written there.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

import optree
import torch
import torch.distributed as dist

from . import tree as tr
from .tree import PyTree

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["CollectiveError", "check_replicated", "all_reduce", "global_size", "offset", "sizes", "gather_columns",
           "gather_rows", "rounds", "DEFAULT_TIMEOUT"]


DEFAULT_TIMEOUT = 300.0   # seconds a collective waits for its peers before failing (torch's default is 30 min)
_CHECKSUM_WIDTH = 1021    # period of the checksum's position weights (a prime)


class CollectiveError(RuntimeError):
    """A collective over the process group failed: a peer process died, stalled past the group's timeout,
    or called a different collective.

    Raised by every `group=` function; the message starts with the public call, names the
    rank and the time waited, and says what to look at (the other ranks' output, the timeout).

    Examples:
      >>> issubclass(ti.distributed.CollectiveError, RuntimeError)
      True
    """


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


def _device(group) -> torch.device:
    """Where the backend's collectives want small bookkeeping tensors: cuda for nccl, else cpu."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(where: str, value, group):
    """`all_reduce` for the public call `where` (the name a failed collective's error gives)."""
    if group is None:
        return value
    flat = tr.ravel(value).detach().clone()
    _collective(where, group, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group))
    return tr.unravel(flat, value)


def all_reduce(value: PyTree, group: ProcessGroup | None) -> PyTree:
    """Returns the sum over ranks of a tensor or pytree of tensors (inputs are not modified).

    All leaves travel in ONE collective (flattened and concatenated), whatever the pytree.

    Args:
      value: a tensor or pytree of tensors, of the same structure, shapes and dtype on every rank.
      group: a `torch.distributed` process group, or None (then `value` itself is returned).

    Returns:
      The elementwise sum over ranks, with the structure, shapes, dtype and device of `value`.

    Raises:
      CollectiveError: the collective failed (a peer died, stalled past the timeout, or made another call).

    Cost: one all-reduce of P numbers (P = total leaf size); O(P) memory for the flat copy. Nothing without a group.

    Examples:
      >>> tree = {"a": torch.ones(3), "b": torch.zeros(2, 2)}
      >>> ti.distributed.all_reduce(tree, None) is tree
      True
    """
    return _all_reduce("ti.distributed.all_reduce", value, group)


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


def _check_replicated(where: str, group, **named) -> None:
    """`check_replicated` for the public call `where` (the name its errors give)."""
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


def check_replicated(group: ProcessGroup | None, **named: Any) -> None:
    """Raises ValueError unless every rank holds the same value for each named argument.

    Equality is bitwise up to float64 summation round-off: retraining on every rank passes
    only when the training is deterministic; otherwise load or broadcast one rank's parameters.

    Args:
      group: a `torch.distributed` process group, or None (then nothing is checked).
      **named: argument names (e.g. `params`, `test`, `l2`) mapped to pytrees of tensors or
        numbers that the collective contract requires to be identical on every rank.

    Raises:
      ValueError: a named value differs between ranks (the message names it and the ranks).
      CollectiveError: the all-gather failed.

    Cost: one pass over the values (4 float64 checksums each) and one all-gather of 4·m numbers
    for m names. Nothing without a group.

    Examples:
      >>> ti.distributed.check_replicated(None, params=params, l2=1e-2) is None
      True
    """
    _check_replicated("ti.distributed.check_replicated", group, **named)


def global_size(n_local: int, group: ProcessGroup | None) -> int:
    """Returns Σ over ranks of `n_local`, the global number of examples.

    Args:
      n_local: this rank's number of examples.
      group: a `torch.distributed` process group, or None (then `n_local` is returned).

    Returns:
      An int, the same on every rank.

    Raises:
      CollectiveError: the all-gather failed.

    Cost: one all-gather of one integer per rank. Nothing without a group.

    Examples:
      >>> ti.distributed.global_size(60, None)
      60
    """
    if group is None:
        return n_local
    sizes = _sizes(n_local, group)
    return int(sizes.sum())


def _sizes(n_local: int, group) -> torch.Tensor:
    """The shard sizes of all ranks, in rank order: LongTensor `[world]`."""
    mine = torch.tensor([n_local], dtype=torch.long, device=_device(group))
    return torch.cat(_all_gather("ti.distributed", group, mine)).cpu()


def sizes(n_local: int, group: ProcessGroup | None) -> torch.Tensor:
    """Returns the shard sizes of all ranks, in rank order.

    Args:
      n_local: this rank's number of examples (or rows).
      group: a `torch.distributed` process group, or None.

    Returns:
      LongTensor `[world]` on the CPU, the same on every rank (`[n_local]` without a group).

    Raises:
      CollectiveError: the all-gather failed.

    Cost: one all-gather of one integer per rank. Nothing without a group.

    Examples:
      >>> ti.distributed.sizes(60, None).tolist()
      [60]
    """
    return torch.tensor([n_local]) if group is None else _sizes(n_local, group)


def offset(n_local: int, group: ProcessGroup | None) -> tuple[int, int]:
    """Returns `(start, n)`: this rank's first global example id and the global n.

    Args:
      n_local: this rank's number of examples; shards are contiguous and in rank order.
      group: a `torch.distributed` process group, or None (then `(0, n_local)`).

    Returns:
      Two ints: Σ of the sizes of the ranks before this one, and Σ of all sizes.

    Raises:
      CollectiveError: the all-gather failed.

    Cost: one all-gather of one integer per rank. Nothing without a group.

    Examples:
      >>> ti.distributed.offset(60, None)
      (0, 60)
    """
    if group is None:
        return 0, n_local
    sizes = _sizes(n_local, group)
    rank = dist.get_rank(group)
    return int(sizes[:rank].sum()), int(sizes.sum())


def gather_columns(local: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    """Returns the ranks' blocks concatenated along the last axis, in rank order; every rank gets the same.

    Shards may differ in size: blocks are padded to the largest for the collective and
    trimmed after. This is how a score matrix `[n_test, n_local]` becomes `[n_test, n_train]`.

    Args:
      local: a tensor `[..., n_local]`, the same leading shape on every rank.
      group: a `torch.distributed` process group, or None (then `local` itself is returned).

    Returns:
      A tensor `[..., Σ n_local]`: rank 0's columns, then rank 1's, ...

    Raises:
      CollectiveError: a collective failed.

    Cost: one all-gather of world · max(n_local) columns (that much memory) and one of the
    widths. Nothing without a group.

    Examples:
      >>> S = torch.zeros(5, 60)
      >>> ti.distributed.gather_columns(S, None) is S
      True
    """
    if group is None:
        return local
    widths = _sizes(local.shape[-1], group)
    padded = torch.nn.functional.pad(local, (0, int(widths.max()) - local.shape[-1]))
    every = _all_gather("ti.distributed.gather_columns", group, padded)
    return torch.cat([block[..., :int(s)] for block, s in zip(every, widths)], dim=-1)


def _gather_rows(where: str, local, counts: torch.Tensor, group):
    """`gather_rows` for the public call `where` (the name a failed collective's error gives)."""
    if group is None:
        return local
    leaves = optree.tree_leaves(local, namespace="")
    flat = torch.cat([leaf.reshape(leaf.shape[0], math.prod(leaf.shape[1:])) for leaf in leaves], dim=1)  # [rows, P]
    padded = torch.nn.functional.pad(flat, (0, 0, 0, int(counts.max()) - flat.shape[0]))
    every = _all_gather(where, group, padded)
    union = torch.cat([block[:int(c)] for block, c in zip(every, counts)])     # [Σ counts, P]
    like = tr.map(lambda leaf: leaf[0] if leaf.shape[0] else leaf.new_zeros(leaf.shape[1:]), local)
    return tr.unravel(union, like)


def gather_rows(local: PyTree, counts: torch.Tensor, group: ProcessGroup | None) -> PyTree:
    """Returns the ranks' stacks concatenated along the leading axis, in rank order; every rank gets the same.

    All leaves travel in ONE all-gather, each rank's rows zero-padded to the largest count
    and trimmed after.

    Args:
      local: a pytree of tensors with leading axis `counts[rank]` (this rank's rows).
      counts: LongTensor `[world]`, every rank's number of rows (known to all ranks, e.g. from `sizes`).
      group: a `torch.distributed` process group, or None (then `local` itself is returned).

    Returns:
      The pytree of `local` with leaves `[Σ counts, ...]`: rank 0's rows, then rank 1's, ...

    Raises:
      CollectiveError: the all-gather failed.

    Cost: one all-gather of world · max(counts) · P numbers (P = the numbers in one row); that much memory.

    Examples:
      >>> rows = {"g": torch.randn(4, 3)}
      >>> ti.distributed.gather_rows(rows, torch.tensor([4]), None) is rows
      True
    """
    return _gather_rows("ti.distributed.gather_rows", local, counts, group)


def rounds(counts: torch.Tensor, per_round: int) -> list:
    """Returns the collective schedule over shards of sizes `counts`, `per_round` rows per rank per round.

    Every rank gets the same list, so every rank makes the same number of collective calls,
    whatever its shard size.

    Args:
      counts: LongTensor `[world]`, every rank's number of rows (from `sizes`).
      per_round: rows per rank per round, an int >= 1.

    Returns:
      A list of ceil(max(counts) / per_round) (at least one) LongTensors `[world, 2]`: the
      (start, stop) of every rank's rows in that round (empty, start == stop, once a rank's
      shard is used up).

    Cost: O(world) per round; no collective.

    Examples:
      >>> schedule = ti.distributed.rounds(torch.tensor([5, 3]), 2)
      >>> len(schedule), schedule[1].tolist() == [[2, 4], [2, 3]], schedule[2].tolist() == [[4, 5], [3, 3]]
      (3, True, True)
    """
    total = max(1, -(-int(counts.max()) // per_round))
    return [torch.stack([counts.clamp(max=r * per_round), counts.clamp(max=(r + 1) * per_round)], dim=1)
            for r in range(total)]
