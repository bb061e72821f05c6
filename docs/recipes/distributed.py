"""Recipe: shard the training set over processes; every rank gets the single-process scores.

Run with `torchrun --standalone --nproc_per_node=2 docs/recipes/distributed.py`. Each rank
holds a contiguous shard of the training set and the same parameters and test points;
`group=` turns every sum over training examples into a sum over shards (one all-reduce
per curvature product, for all test points together). The work sits in `main()`, so the
objects that hold the process group are gone before it is destroyed, and the process ends
right after (`os._exit`, output flushed): with torch 2.13, gloo can still abort a process at
interpreter shutdown ("terminate called without an active exception"), as `tinfluence demo
--distributed` also avoids.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tinfluence as ti
from tinfluence.demo import load_digits_split


def main():
    """Scores on every rank and, on rank 0, the check against one process."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    train, test, _ = load_digits_split(1000)
    torch.manual_seed(0)    # the same initial parameters on every rank, so the same θ̂ to the last bit
    apply, params = ti.functionalize(torch.nn.Linear(64, 10))

    def loss(params, batch):
        x, y = batch
        return F.cross_entropy(apply(params, x), y, reduction="none")

    params = ti.minimize(ti.objective(loss, train, l2=1e-2), params, gtol=1e-10, newton_steps=5)   # one θ̂, checked
    test_points = ti.take(test, torch.arange(4))

    shard = ti.distributed.shard(train, rank, world)
    R = ti.objective(loss, shard, l2=1e-2, group=dist.group.WORLD)
    ihvp = ti.cg(ti.hvp(R, params), tol=1e-8)
    scores = ti.influence(loss, params, shard, test_points, ihvp=ihvp, group=dist.group.WORLD)   # [4, 1000] on every rank

    if rank == 0:      # the same matrix one process computes from the whole training set
        R1 = ti.objective(loss, train, l2=1e-2)
        single = ti.influence(loss, params, train, test_points, ihvp=ti.cg(ti.hvp(R1, params), tol=1e-8))
        error = ((scores - single).abs().max() / single.abs().max()).item()
        print(f"{world} ranks: scores {list(scores.shape)}, relative difference to one process {error:.1e}")
        assert error < 1e-6


if __name__ == "__main__":
    dist.init_process_group("gloo")
    main()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
