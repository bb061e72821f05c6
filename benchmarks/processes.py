"""CG influence on digits logistic regression (1000 train × 100 test), 1 process vs 2 (gloo, CPU).

Each process uses one thread; the 2-process run shards the training set, all-reduces every
Hessian-vector product (one collective per CG iteration) and all-gathers the score columns.

    python benchmarks/processes.py
"""

import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import tinfluence as ti  # noqa: E402

REPEATS = 3


def _problem():
    from conftest import DigitsLR

    lr = DigitsLR()
    return lr, ti.take(lr.test, slice(0, 100))


def _influence(lr, train, test, group):
    R = ti.objective(lr.loss, train, l2=lr.l2, group=group)
    ihvp = ti.cg(ti.hvp(R, lr.params), damping=1e-3, tol=1e-8, maxiter=500)
    return ti.influence(lr.loss, lr.params, train, test, ihvp=ihvp, group=group)


def _timed(lr, train, test, group):
    best = float("inf")
    for _ in range(REPEATS):
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        scores = _influence(lr, train, test, group)
        best = min(best, time.perf_counter() - start)
    return best, scores


def _worker(rank, world, port, out):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lr, test = _problem()
    seconds, scores = _timed(lr, ti.distributed.shard(lr.train, rank, world), test, dist.group.WORLD)
    if rank == 0:
        torch.save((seconds, scores), out)
    dist.destroy_process_group()


def main():
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    lr, test = _problem()
    one, reference = _timed(lr, lr.train, test, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "rank0.pt")
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        two, scores = torch.load(out)
    print(f"cores: {os.cpu_count()}, threads per process: 1, best of {REPEATS}")
    print(f"1 process : {one:.3f} s")
    print(f"2 processes: {two:.3f} s   speedup {one / two:.2f}x   max |Δscore| {float((scores - reference).abs().max()):.1e}")


if __name__ == "__main__":
    main()
