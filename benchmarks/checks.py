"""Overhead of the argument and finiteness checks (tinfluence/core/checks.py), as ratios measured in one run.

For each task the same call is timed with the checks on and with every check function
replaced by a no-op (monkeypatched), interleaved, best of `--repeats` runs (the least disturbed on a shared machine):

- `ti.influence` (what it checks today: parameters, data, the test gradients per chunk);
- `ti.grad_dot`, which runs the shared scoring path with a finiteness check on every
  training chunk's gradients (the path `ti.influence` moves onto);
- the finiteness check of every training chunk's gradients alone (`checks.finite_chunk`, the
  dearer form, c·P numbers per chunk), as a share of one `ti.influence` call: an upper bound
  of what `ti.influence` gains when it uses the shared path (which reduces the scores instead).

Wall-clock on/off differences on a shared machine are noise of a few percent either way, so
each call is also run with every check function timed (outermost calls only): "time inside
checks" is their summed time over the call's time, the least of the runs.

Tasks: digits logistic regression (1000 train, 100 test, float64, `ti.direct` on the dense
Hessian) and, when Debian's dataset-fashion-mnist is installed, Fashion-MNIST logistic
regression (10000 train, 100 test, float32, `ti.cg` on the Gauss-Newton operator, 5 iterations:
fewer iterations make the checks a larger share, so the ratio is an upper bound).

    OMP_NUM_THREADS=1 python benchmarks/checks.py [--repeats 5] [--out benchmarks/RESULTS-checks.md]
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import optree
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tinfluence as ti  # noqa: E402
from tinfluence.core import checks  # noqa: E402
from tinfluence.core import data as D
from tinfluence.demo import load_digits_split  # noqa: E402

CHECKS = ("integer", "number", "probability", "flag", "choice", "function", "chunk_size", "ids", "params",
          "floating_like", "finite_chunk", "finite_scores")


@contextmanager
def checks_off():
    """Every check function (and `ti.data._check_alike`) a no-op returning its value argument."""
    saved = {name: getattr(checks, name) for name in CHECKS}
    alike = D._check_alike

    def passthrough(name):
        if name == "params":
            return lambda call, value, name="params": optree.tree_leaves(value, namespace="")[0]
        if name in ("floating_like", "finite_chunk", "finite_scores"):
            return lambda *a, **k: None
        if name == "chunk_size":
            return lambda call, value: value
        return lambda call, arg, value, *a, **k: value

    try:
        for name in CHECKS:
            setattr(checks, name, passthrough(name))
        D._check_alike = lambda *a, **k: None
        yield
    finally:
        for name, fn in saved.items():
            setattr(checks, name, fn)
        D._check_alike = alike


@contextmanager
def counted(total: list):
    """Every check function (and `ti.data._check_alike`) timed; the outermost calls' seconds summed into `total[0]`."""
    saved = {name: getattr(checks, name) for name in CHECKS}
    alike = D._check_alike
    depth = [0]

    def timer(fn):
        def run(*a, **k):
            depth[0] += 1
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    total[0] += time.perf_counter() - start
        return run

    try:
        for name in CHECKS:
            setattr(checks, name, timer(saved[name]))
        D._check_alike = timer(alike)
        yield
    finally:
        for name, fn in saved.items():
            setattr(checks, name, fn)
        D._check_alike = alike


def check_share(fn, repeats: int) -> float:
    """Seconds inside the checks over the seconds of the whole call, the least of `repeats` runs."""
    shares = []
    for _ in range(repeats):
        total = [0.0]
        with counted(total):
            seconds = timed(fn)
        shares.append(total[0] / seconds)
    return min(shares)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ratio(fn, repeats: int) -> tuple[float, float, float]:
    """(best seconds with checks, best without, on/off − 1), runs interleaved."""
    fn()                                            # warm-up
    on, off = [], []
    for _ in range(repeats):
        on.append(timed(fn))
        with checks_off():
            off.append(timed(fn))
    a, b = min(on), min(off)                        # the least disturbed run of each (a shared machine)
    return a, b, a / b - 1


def finite_share(loss, params, train, chunk_size, influence_seconds: float, repeats: int) -> float:
    """Seconds of `checks.finite_chunk` over every training chunk's gradients, over one influence call."""
    kernel = ti.per_example_grad_fn(loss)
    chunks = [kernel(params, chunk) for chunk in ti.chunks(train, chunk_size)]
    runs = [timed(lambda: [checks.finite_chunk("ti.influence", "train", G, 0) for G in chunks]) for _ in range(repeats)]
    return min(runs) / influence_seconds


def logistic(d_in: int, dtype):
    model = torch.nn.Linear(d_in, 10).to(dtype)
    apply, params0 = ti.functionalize(model)

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    return apply, params0, loss


def digits_task():
    train, test, _ = load_digits_split(1000)
    test = ti.take(test, slice(0, 100))
    torch.manual_seed(0)
    _, params0, loss = logistic(64, torch.float64)
    R = ti.objective(loss, train, l2=1e-2)
    params = ti.minimize(R, params0, gtol=1e-8)
    ihvp = ti.direct(ti.hessian(R, params))
    return "digits LR (1000 × 100, float64, ti.direct)", loss, params, train, test, ihvp, 256


def fmnist_task():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import tasks  # the benchmark suite's loaders

    if tasks.fmnist_files() is None:
        return None
    train, test = tasks.fmnist(10000, 100, dtype=torch.float32)
    torch.manual_seed(0)
    apply, params0, loss = logistic(784, torch.float32)
    R = ti.objective(loss, train, l2=1e-3)
    params = ti.minimize(R, params0, gtol=1e-4, maxiter=200)
    op = ti.ggn_vp(lambda p, b: apply(p, b[0]), params, train,
                   output_loss=lambda o, b: F.cross_entropy(o, b[1], reduction="none"), l2=1e-3)
    ihvp = ti.cg(op, tol=None, maxiter=5)
    return "Fashion-MNIST LR (10000 × 100, float32, ti.cg 5 iterations)", loss, params, train, test, ihvp, 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows, notes = [], []
    for make in (digits_task, fmnist_task):
        task = make()
        if task is None:
            notes.append("Fashion-MNIST: not measured, Debian's dataset-fashion-mnist is not installed "
                         "(apt-get install dataset-fashion-mnist).")
            continue
        name, loss, params, train, test, ihvp, chunk = task
        inf = ratio(functools.partial(ti.influence, loss, params, train, test, ihvp=ihvp, chunk_size=chunk), args.repeats)
        dot = ratio(functools.partial(ti.grad_dot, loss, params, train, test, chunk_size=chunk), args.repeats)
        inside = (check_share(functools.partial(ti.influence, loss, params, train, test, ihvp=ihvp, chunk_size=chunk), 3),
                  check_share(functools.partial(ti.grad_dot, loss, params, train, test, chunk_size=chunk), args.repeats))
        share = finite_share(loss, params, train, chunk, inf[0], args.repeats)
        rows.append((name, inf, dot, inside, share))
    lines = ["| task | ti.influence on / off (s) | wall overhead | time inside checks | ti.grad_dot on / off (s) | "
             "wall overhead | time inside checks | gradient finiteness of every training chunk / ti.influence |",
             "|---|---|---|---|---|---|---|---|"]
    for name, inf, dot, inside, share in rows:
        lines.append(f"| {name} | {inf[0]:.3f} / {inf[1]:.3f} | {100 * inf[2]:+.2f}% | {100 * inside[0]:.2f}% | "
                     f"{dot[0]:.3f} / {dot[1]:.3f} | {100 * dot[2]:+.2f}% | {100 * inside[1]:.2f}% | {100 * share:.2f}% |")
    text = "\n".join(lines + [""] + notes)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
