"""How a two-rank gloo run may end: counts SIGABRTs for each way of destroying the group.

    python benchmarks/distributed_ending.py --runs 15

The distributed demo's ending in miniature: collectives, then rank 1 is done while rank 0
keeps working (it retrains), then every rank destroys the group. A reference to the group
kept to interpreter shutdown (`kept`, as the demo's hidden references did) lets gloo's C++
process group be destroyed during finalization, where it can abort ("terminate called
without an active exception"); a barrier first does not help (`barrier`); ending the
process right after destroying the group does (`exit`, the CLI's ending now).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.distributed as dist

KEPT = []   # a reference that outlives the group, as a module global or a hidden cache would hold it


def rank_main(mode: str) -> None:
    """One rank: 50 all-reduces and an all-gather, then the ending `mode`."""
    dist.init_process_group("gloo")
    KEPT.append(dist.group.WORLD)
    x = torch.randn(2000, dtype=torch.float64)
    for _ in range(50):
        dist.all_reduce(x)
        x /= 2
    every = [torch.empty(100) for _ in range(dist.get_world_size())]
    dist.all_gather(every, torch.randn(100))
    if mode == "barrier":
        dist.barrier()
    if dist.get_rank() == 0:
        time.sleep(2.0)      # rank 0 keeps working with the group alive
    dist.destroy_process_group()
    if mode == "exit":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--rank-main", choices=["kept", "barrier", "exit"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_main:
        rank_main(args.rank_main)
        return 0
    for mode in ("kept", "barrier", "exit"):
        failed = 0
        for _ in range(args.runs):
            done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                   __file__, "--rank-main", mode], capture_output=True, text=True, check=False,
                                  env=dict(os.environ, OMP_NUM_THREADS="1"))
            failed += done.returncode != 0 or "SIGABRT" in done.stderr or "terminate called" in done.stderr
        print(f"{mode}: {failed} of {args.runs} runs aborted", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
