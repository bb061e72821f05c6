"""Pearson of the ladder's cached scores with exact influence, on the first test points of a task.

    python benchmarks/ladder_exact.py --task fmnist-mlp --n-test 10

For a task whose every-test-point exact solve is too slow for the ladder's per-method limit
(fmnist-mlp: P = 101 770, CG needs hundreds of Gauss-Newton products), exact influence is
computed here for the first `--n-test` test points only: `ti.influence` with CG over the
Gauss-Newton matrix + l2·I (the curvature of the ladder's CG row), preconditioned by
`ti.nystrom` rank 100, to relative residual `--tol`, in float64 (the parameters and inputs
of a float32 task are cast; float32 stalls near 1e-4 on fmnist-mlp). Every method whose scores the ladder
cached (`benchmarks/.cache/ladder/<task>-<key>/scores-<method>.pt`, written by
`ladder.py`) is then compared with it: the Pearson correlation of all (test point, training
example) pairs of those rows, and the median over test points of the per-row Pearson.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import torch

import tinfluence as ti


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fmnist-mlp")
    parser.add_argument("--n-test", type=int, default=10)
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--cache", default=os.path.join(HERE, ".cache", "ladder"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import ladder
    import ladder_methods as LM
    from tasks import pure

    folders = sorted(glob.glob(os.path.join(args.cache, f"{args.task}-*")), key=os.path.getmtime)
    if not folders:
        sys.exit(f"no ladder cache for {args.task} under {args.cache}: run `python benchmarks/ladder.py --task {args.task}` first")
    folder = folders[-1]
    task = ladder.load_task(os.path.join(folder, "task.pt"))
    apply, params, loss = pure(task)
    params = ti.tree.map(lambda p: p.double(), params)
    task.train = (task.train[0].double(), task.train[1])
    test = (task.test[0][: args.n_test].double(), task.test[1][: args.n_test])
    op = LM._curvature(task, apply, params, loss)
    start = time.perf_counter()
    pre = ti.nystrom(op, rank=LM.NYSTROM_RANK, generator=torch.Generator().manual_seed(0))
    exact, info = ti.influence(loss, params, task.train, test, ihvp=ti.cg(op, tol=args.tol, maxiter=5000, preconditioner=pre),
                               factored=True, return_info=True)
    seconds = time.perf_counter() - start
    print(f"{args.task}: exact influence for {args.n_test} test points in {seconds:.0f} s "
          f"(float64 CG, Nyström rank {LM.NYSTROM_RANK}, tol {args.tol:g}: {int(info.iterations.max())} iterations, "
          f"true relative residual ≤ {float(info.relative_residual.max()):.1e})")
    print()
    print("| method | Pearson, all pairs | median per-test-point Pearson |")
    print("|---|---|---|")
    for path in sorted(glob.glob(os.path.join(folder, "scores-*.pt"))):
        name = os.path.basename(path)[len("scores-"):-len(".pt")]
        scores = torch.load(path, weights_only=False)[: args.n_test].to(exact)
        rows = ti.pearson(scores, exact)                                   # [n_test]: one per test point
        print(f"| {LM.REGISTRY[name].label} ({LM.REGISTRY[name].library}) | {float(ti.pearson(scores.flatten(), exact.flatten())):.4f} | "
              f"{float(rows.median()):.4f} |")


if __name__ == "__main__":
    main()
