"""Hessian-free estimators on a non-convex model: how well they track actual leave-one-out
retraining, how fast they are, and how well their self-influence finds flipped labels.

Model: a 64-32-10 tanh MLP in float64 on scikit-learn's digits (1,000 training points),
trained by full-batch gradient descent from a fixed initialization with a fixed step
schedule; a checkpoint is saved at the start of every `--ckpt-every` steps with the step
size in force from there. Leave-one-out retraining repeats exactly that run (same init,
same steps, deterministic) with one example's weight set to zero; the models are trained
together under vmap, the full-data model among them, so every run takes the same code path.

Usage: python benchmarks/hessian_free_mlp.py [--loo-points 1000] [--json out.json]  (default: 250 removals, ~4 min)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import scipy.stats
import torch
import torch.nn.functional as F
from torch.func import grad, vmap
from tqdm import tqdm

import tinfluence as ti
from tinfluence.demo import load_digits_split


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)).double()


def train_many(loss, params0, train, weights, *, steps, lr, l2, ckpt_every, batch, progress):
    """Full-batch GD on Σ_j w_j ℓ_j / Σ_j w_j + l2/2‖θ‖² for every row of `weights` [k, n], vmapped
    `batch` models at a time. Returns the final parameters (leaves [k, ...]) and, for row 0, the
    checkpoints [(θ_t, lr)] saved at the start of every `ckpt_every` steps.
    """

    def objective(params, w):
        return (loss(params, train) * w).sum() / w.sum() + 0.5 * l2 * ti.tree.sq_norm(params)

    step = vmap(lambda p, w: ti.tree.add_scaled(p, -lr, grad(objective)(p, w)))
    finals, ckpts = [], []
    for start in tqdm(range(0, len(weights), batch), desc="retraining", disable=not progress):
        w = weights[start:start + batch]
        theta = ti.tree.map(lambda leaf: leaf.expand(len(w), *leaf.shape).clone(), params0)
        for t in range(steps):
            if start == 0 and t % ckpt_every == 0:
                ckpts.append((ti.tree.map(lambda leaf: leaf[0].clone(), theta), lr))
            theta = step(theta, w)
        finals.append(theta)
    return ti.tree.map(lambda *leaves: torch.cat(leaves), *finals), ckpts


def best_time(fn, repeats=2):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loo-points", type=int, default=250, help="training points removed (a seeded random subset; 1000 = all, ~15 min on 2 CPU cores)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--ckpt-every", type=int, default=20)
    parser.add_argument("--radius", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=100, help="models retrained together")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    torch.set_default_dtype(torch.float64)
    train, test, _ = load_digits_split()
    model = mlp()
    apply, params0 = ti.functionalize(model)

    def loss(params, batch):
        return F.cross_entropy(apply(params, batch[0]), batch[1], reduction="none")

    n = ti.num_examples(train)
    g = torch.Generator().manual_seed(0)
    removed = torch.randperm(n, generator=g)[:args.loo_points].sort().values
    weights = torch.ones(1 + len(removed), n)
    weights[torch.arange(1, 1 + len(removed)), removed] = 0.0
    kw = dict(steps=args.steps, lr=args.lr, l2=args.l2, ckpt_every=args.ckpt_every, batch=args.batch, progress=not args.no_progress)
    t0 = time.perf_counter()
    finals, ckpts = train_many(loss, params0, train, weights, **kw)
    loo_seconds = time.perf_counter() - t0
    params = ti.tree.map(lambda leaf: leaf[0], finals)
    test_points = ti.take(test, slice(0, 3))
    test_losses = vmap(loss, in_dims=(0, None))(finals, test_points)  # [1 + m, 3]
    actual = (test_losses[1:] - test_losses[0]).T  # [3, m]: L_test(θ without z) − L_test(θ)
    accuracy = (apply(params, test[0]).argmax(1) == test[1]).double().mean().item()
    print(f"MLP 64-32-10 tanh, {args.steps} GD steps at lr={args.lr}, l2={args.l2}: train loss "
          f"{loss(params, train).mean():.4f}, test accuracy {accuracy:.3f}; {len(ckpts)} checkpoints; "
          f"{len(removed)} leave-one-out runs in {loo_seconds:.0f} s")

    methods = {
        "tracin": lambda tr_, te_: ti.tracin(loss, ckpts, tr_, te_),
        "empirical_if": lambda tr_, te_: ti.empirical_if(loss, params, tr_, te_, radius=args.radius),
        "grad_dot": lambda tr_, te_: ti.grad_dot(loss, params, tr_, te_),
        "grad_cos": lambda tr_, te_: ti.grad_cos(loss, params, tr_, te_),
    }
    results = {"config": vars(args), "loo_seconds": loo_seconds, "correlation": {}, "seconds_1000x100": {}, "mislabels": {}}
    print("\nagainst actual leave-one-out retraining (3 test points; Pearson / Spearman per point)")
    print(f"{'method':<14}{'pearson':>30}{'spearman':>30}")
    for name, method in methods.items():
        scores = method(train, test_points)[:, removed]  # [3, m]
        pearson = [scipy.stats.pearsonr(s, a).statistic for s, a in zip(scores.numpy(), actual.numpy())]
        spearman = [scipy.stats.spearmanr(s, a).statistic for s, a in zip(scores.numpy(), actual.numpy())]
        results["correlation"][name] = {"pearson": pearson, "spearman": spearman}
        print(f"{name:<14}{' '.join(f'{p:+.3f}' for p in pearson):>30}{' '.join(f'{s:+.3f}' for s in spearman):>30}")

    hundred = ti.take(test, slice(0, 100))
    baseline = best_time(lambda: ti.per_example_grads(loss, params, train))
    print(f"\ntime for 1000 train x 100 test (min of 2 after a warm-up; one per-example gradient pass over "
          f"train = {baseline:.3f} s)")
    for name in ("tracin", "empirical_if", "grad_dot"):
        seconds = best_time(lambda: methods[name](train, hundred))
        results["seconds_1000x100"][name] = seconds
        print(f"{name:<14}{seconds:>10.3f} s{seconds / baseline:>10.1f} x gradient pass")
    results["seconds_1000x100"]["per_example_grad_pass"] = baseline

    print("\nmislabels: 10% of the training labels flipped, MLP retrained; share of the flipped labels in the top 10% by self-influence")
    bad = torch.randperm(n, generator=g)[:n // 10]
    y = train[1].clone()
    y[bad] = (y[bad] + torch.randint(1, 10, (len(bad),), generator=g)) % 10
    noisy = (train[0], y)
    finals_noisy, ckpts_noisy = train_many(loss, params0, noisy, torch.ones(1, n), **{**kw, "progress": False})
    params_noisy = ti.tree.map(lambda leaf: leaf[0], finals_noisy)
    detectors = {
        "tracin_self_influence": ti.tracin_self_influence(loss, ckpts_noisy, noisy),
        "grad_norm": ti.tracin_self_influence(loss, [(params_noisy, 1.0)], noisy).sqrt(),
    }
    for name, scores in detectors.items():
        found = torch.isin(bad, torch.argsort(scores, descending=True)[:n // 10]).double().mean().item()
        results["mislabels"][name] = found
        print(f"{name:<24}{found:>8.0%}")
    if args.json:
        results["environment"] = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                                  "threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=lambda x: float(x) if isinstance(x, (np.floating,)) else str(x))


if __name__ == "__main__":
    main()
