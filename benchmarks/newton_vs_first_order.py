"""Newton-corrected removal estimates vs first-order influence on digits logistic regression.

1. Time for the estimates of 100 single removals on the whole test set: `ti.newton_loo`
   (Gauss-Newton factors, Woodbury) vs first-order influence from the dense Hessian
   ((1/n) g_testᵀ H⁻¹ g_z), each end to end from the trained parameters; min over repeats,
   the ratio printed. Both answers are checked against each other before timing is reported.
2. Group removals (1, 10, 50, 100 examples of one class): the summed first-order scores, the
   Newton estimate and actual retraining, as the mean change of the test loss and the relative
   error over the test set ‖estimate − actual‖ / ‖actual‖.

Usage: python benchmarks/newton_vs_first_order.py [--repeats 3] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import tinfluence as ti
from tinfluence.demo import load_digits_split
from tinfluence.methods.newton import newton_loo

L2 = 1e-2


def first_order(loss, params, train, test, ids):
    """(1/n) g_testᵀ H⁻¹ g_z for the training points `ids`: `[n_test, len(ids)]`."""
    n = ti.num_examples(train)
    H = ti.hessian(ti.objective(loss, train, l2=L2), params)
    G = ti.ravel(ti.per_example_grads(loss, params, ti.take(train, ids)), batch_ndim=1)
    g_test = ti.ravel(ti.per_example_grads(loss, params, test), batch_ndim=1)
    return g_test @ torch.cholesky_solve(G.T, torch.linalg.cholesky(H)) / n


def best_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()

    torch.set_default_dtype(torch.float64)
    train, test, _ = load_digits_split()
    apply, params0 = ti.functionalize(torch.nn.Linear(64, 10))
    predict = lambda p, b: apply(p, b[0])                                          # noqa: E731
    output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")          # noqa: E731
    loss = lambda p, b: output_loss(predict(p, b), b)                              # noqa: E731
    params = ti.minimize(ti.objective(loss, train, l2=L2), ti.tree.zeros_like(params0), gtol=1e-12, newton_steps=5)
    n = ti.num_examples(train)

    ids = torch.arange(0, n, n // 100)[:100]
    newton = lambda: newton_loo(loss, params, train, test, l2=L2, indices=ids,     # noqa: E731
                                predict=predict, output_loss=output_loss)
    first = lambda: first_order(loss, params, train, test, ids)                   # noqa: E731
    newton(), first()                                                              # warm up
    t_newton, est_newton = best_time(newton, args.repeats)
    t_first, est_first = best_time(first, args.repeats)
    agree = torch.corrcoef(torch.stack([est_newton.flatten(), est_first.flatten()]))[0, 1].item()
    print(f"check: Pearson(newton, first-order) over {est_newton.numel()} scores = {agree:.4f}"
          + ("" if agree > 0.9 else "  FAILED: the estimates disagree"))
    print(f"100 single removals x {ti.num_examples(test)} test points: newton {t_newton:.3f} s, "
          f"first-order {t_first:.3f} s, ratio newton/first-order = {t_newton / t_first:.2f}")

    of_class = (train[1] == 3).nonzero().flatten()
    sizes = (1, 10, 50, 100)
    groups = [of_class[:s] for s in sizes]
    est = newton_loo(loss, params, train, test, l2=L2, groups=groups, predict=predict, output_loss=output_loss)
    fo = first_order(loss, params, train, test, of_class[:max(sizes)])
    base = loss(params, test)
    rows = []
    print(f"\n{'removed (class 3)':>18} {'mean Δ first-order':>19} {'mean Δ newton':>14} {'mean Δ retrained':>17} "
          f"{'rel.err first-order':>20} {'rel.err newton':>15}")
    for j, (size, group) in enumerate(tqdm(list(zip(sizes, groups)), desc="retraining", leave=False)):
        keep = torch.ones(n, dtype=torch.bool)
        keep[group] = False
        retrained = ti.minimize(ti.objective(loss, ti.take(train, keep), l2=L2), params, gtol=1e-12, newton_steps=5)
        actual = loss(retrained, test) - base
        summed = fo[:, :size].sum(1)
        err = lambda e: ((e - actual).norm() / actual.norm()).item()               # noqa: E731
        row = dict(size=size, first_order=summed.mean().item(), newton=est[:, j].mean().item(),
                   retrained=actual.mean().item(), err_first_order=err(summed), err_newton=err(est[:, j]))
        rows.append(row)
        flag = "" if row["err_newton"] < row["err_first_order"] else "  FAILED: newton not closer"
        tqdm.write(f"{size:>18} {row['first_order']:>19.5f} {row['newton']:>14.5f} {row['retrained']:>17.5f} "
              f"{row['err_first_order']:>20.3e} {row['err_newton']:>15.3e}{flag}")

    if args.out:
        with open(args.out, "w") as fh:
            json.dump(dict(time_newton_s=t_newton, time_first_order_s=t_first, ratio=t_newton / t_first,
                           groups=rows, environment=dict(torch=torch.__version__, python=platform.python_version(),
                                                         machine=platform.machine(),
                                                         threads=torch.get_num_threads())), fh, indent=1)


if __name__ == "__main__":
    main()
