"""Kernel micro-benchmarks on the digits models, as ratios to baselines timed in the same process.

    python benchmarks/micro.py [--threads 1]

- per-example gradients: throughput of `ti.per_example_grads` as a fraction of one batched
  backward pass (mean loss, `torch.autograd`) over the same 1000 examples, next to the floor
  of a pure write of an n × P tensor (the size of the result), and of the factored form
  `ti.factored.grad_factors` (linear layers as inputs and output gradients, never n × P);
- one Hessian-vector product as a multiple of one full-data gradient: cached `ti.hvp(R, params)`
  (construction excluded, then included), `cache=False`, and per vector when 10 are batched;
- CG influence for 100 test points as a multiple of CG for 1, at the same tolerance;
- torch.compile: `compile=True` on the per-example-gradient and HVP kernels against the same
  pure (recomputing) form run eagerly: compile time (first call minus a steady call, with
  inductor's caches empty as on a first run, then for a new kernel with caches warm) and
  steady-state speedup.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tasks  # noqa: E402

import tinfluence as ti  # noqa: E402


def best(fn, repeats: int = 7) -> float:
    """Minimum wall time over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _models():
    train, test = tasks.digits(1000, 100)
    lr = tasks.Task("digits-lr", "lr", train, test, state={}, l2=tasks.L2)
    lr.state = lr.init_state()
    mlp = tasks.Task("digits-mlp", "mlp", train, test, state={}, l2=tasks.L2, hidden=128)
    mlp.state = mlp.init_state()
    return [("LR 64→10", lr), ("MLP 64-128-10", mlp)]


def per_example_rows():
    rows = []
    for label, task in _models():
        model = task.make_model()
        X, y = task.train
        _, params, loss = tasks.pure(task)
        P = ti.tree.size(params)

        def batched():
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(X), y).backward()

        t_back = best(batched)
        t_pe = best(lambda: ti.per_example_grads(loss, params, task.train))
        t_factors = best(lambda: ti.factored.grad_factors(loss, params, task.train))
        out = torch.empty(len(X), P, dtype=X.dtype)
        t_write = best(lambda: out.fill_(1.0))
        rows.append(f"| {label} | {P} | {1e3 * t_back:.2f} | {1e3 * t_pe:.2f} | {t_back / t_pe:.0%} | {1e3 * t_write:.2f} | "
                    f"{t_back / max(t_pe - t_write, 1e-9):.0%} | {1e3 * t_factors:.2f} | {t_back / t_factors:.0%} |")
    return rows


def hvp_rows():
    rows = []
    for label, task in _models():
        _, params, loss = tasks.pure(task)
        R = ti.objective(loss, task.train, l2=task.l2)
        g = torch.func.grad(R)
        v = ti.tree.random_like(params, generator=torch.Generator().manual_seed(0))
        V = ti.tree.random_like(params, generator=torch.Generator().manual_seed(1), batch=(10,))
        t_grad = best(lambda: g(params))
        cached = ti.hvp(R, params)
        t_build = best(lambda: ti.hvp(R, params), repeats=3)
        t_cached = best(lambda: cached(v))
        t_fresh = best(lambda: ti.hvp(R, params, cache=False)(v))
        t_ten = best(lambda: cached(V)) / 10
        rows.append(f"| {label} | {1e3 * t_grad:.2f} | {t_cached / t_grad:.2f} | {(t_cached + t_build) / t_grad:.2f} | "
                    f"{t_fresh / t_grad:.2f} | {t_ten / t_grad:.2f} |")
    return rows


def cg_rows():
    rows = []
    task = _models()[0][1]
    task.state = tasks.build_digits_lr(1000, 100, 0).state
    _, params, loss = tasks.pure(task)
    R = ti.objective(loss, task.train, l2=task.l2)

    def run(k):
        test = ti.take(task.test, slice(0, k))
        return ti.influence(loss, params, task.train, test, ihvp=ti.cg(ti.hvp(R, params), tol=1e-5, maxiter=1000))

    t1, t100 = best(lambda: run(1), repeats=3), best(lambda: run(100), repeats=3)
    rows.append(f"| LR 64→10, tol 1e-5 | {1e3 * t1:.1f} | {1e3 * t100:.1f} | {t100 / t1:.2f} |")
    return rows


def _first_call(fn) -> tuple[object, float]:
    """(fn(), its wall time)."""
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _compile_row(label: str, kernel: str, eager, make_compiled, cached=None) -> str:
    """One table row. `eager` and `cached` are argument-free calls returning pytrees;
    `make_compiled()` builds a new compiled kernel and returns such a call of it.
    """
    compiled = make_compiled()
    out, t_first = _first_call(compiled)
    t_compiled, t_eager = best(compiled), best(eager)
    t_again = _first_call(make_compiled())[1]
    expected = ti.tree.ravel(eager())
    error = (ti.tree.ravel(out) - expected).abs().max() / expected.abs().max()
    check = "" if error < 1e-10 else f" FAIL: relative error {error:.1e}"
    t_cached = f"{1e3 * best(cached):.2f}" if cached is not None else "–"
    return (f"| {label} | {kernel} | {t_first - t_compiled:.1f} | {t_again - t_compiled:.1f} | {1e3 * t_eager:.2f} | "
            f"{1e3 * t_compiled:.2f} | {t_eager / t_compiled:.2f}{check} | {t_cached} |")


def compile_rows() -> tuple[float, list[str]]:
    """(one-time inductor start-up in s, table rows); inductor's caches start empty."""
    rows = []
    with tempfile.TemporaryDirectory() as directory, temporary_cache_dir(directory):
        t_startup = _first_call(lambda: torch.compile(lambda x: x.sin() + 1)(torch.ones(3, dtype=torch.float64)))[1]
        for label, task in _models():
            _, params, loss = tasks.pure(task)
            print(f"  compiling {label} ...", flush=True)
            eager_pe = ti.per_example_grad_fn(loss)
            rows.append(_compile_row(label, "per-example grads, 1000 examples", lambda: eager_pe(params, task.train),
                                     lambda: partial(ti.per_example_grad_fn(loss, compile=True), params, task.train)))
            R = ti.objective(loss, task.train, l2=task.l2)
            eager, cached = ti.hvp(R, params, cache=False), ti.hvp(R, params)
            v = ti.tree.random_like(params, generator=torch.Generator().manual_seed(0))
            V = ti.tree.random_like(params, generator=torch.Generator().manual_seed(1), batch=(10,))
            for name, x in (("HVP, 1 vector", v), ("HVP, 10 stacked", V)):
                rows.append(_compile_row(label, name, partial(eager, x), lambda x=x: partial(ti.hvp(R, params, compile=True), x),
                                         partial(cached, x)))
    return t_startup, rows


def report(threads: int) -> list[str]:
    torch.set_num_threads(threads)
    print("micro-benchmarks ...", flush=True)
    out = ["## Micro-benchmarks", "",
           "Untrained digits models (1000 examples, float64), min of 7 timed calls after a warm-up, same process.", "",
           "| model | P | batched backward ms | per-example grads ms | throughput vs backward | write n×P ms (floor) | "
           "vs backward, write excluded | `ti.factored.grad_factors` ms | factored vs backward |",
           "|---|---|---|---|---|---|---|---|---|"]
    out += per_example_rows()
    out += ["", "One HVP of the full-data objective as a multiple of one full-data gradient (`torch.func.grad`):", "",
            "| model | gradient ms | cached `ti.hvp` | cached incl. construction | `cache=False` | per vector, 10 batched |",
            "|---|---|---|---|---|---|"]
    out += hvp_rows()
    out += ["", "`ti.influence` with CG (all test points solved together), trained digits LR:", "",
            "| case | 1 test point ms | 100 test points ms | ratio |", "|---|---|---|---|"]
    out += cg_rows()
    t_startup, rows = compile_rows()
    out += ["", "### torch.compile", "",
            "`compile=True` (inductor, `fullgraph=True`, `dynamic=False`) against the same recomputing form run eagerly "
            "(`cache=False` for the HVP), and the default cached HVP for comparison. Compile time = first call minus a "
            "steady call: of the first kernel, with inductor's caches empty (as on a first run), then of a new kernel "
            "for the same computation (e.g. a new `ti.hvp(..., compile=True)`), caches warm. The one-time inductor "
            f"start-up of the process ({t_startup:.1f} s) is excluded.", "",
            "| model | kernel | compile s, empty cache | compile s, new kernel | eager ms | compiled ms | speedup | "
            "cached `ti.hvp` ms |", "|---|---|---|---|---|---|---|---|"]
    out += rows
    return out + [""]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    print("\n".join(report(parser.parse_args().threads)))
