"""Trajectory influence against actual same-schedule retraining on digits, and its cost.

For each setting (model, optimizer, learning rate, epochs) the run is trained once with
`ti.training_run`; the ground truth of removing training example z is the exact replay of the
same run with w_z = 0 (`ti.replay_effect`: every other example keeps its place in the
schedule). Per test point it compares, by Pearson and Spearman correlation:

- on the 30 removals of largest |trajectory score| for that point, and
- on 30 random removals (the same for every point, so no method chooses its own set),

trajectory influence (`ti.trajectory_influence`), TracIn (checkpoints at every epoch start,
`ti.tracin`) and the gradient dot product at the final parameters (`ti.grad_dot`). A group
row shows the nonlinearity: the 10 most helpful examples of a point removed together,
first order (`ti.group_influence`) against the exact replay.

Cost: the time of one `trajectory_influence` for 1 and for 100 test measures (every state
kept, and checkpointed at ⌈T/L⌉ + L states) relative to one training run.

    OMP_NUM_THREADS=1 python benchmarks/trajectory.py          # writes benchmarks/RESULTS-trajectory.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti
from tinfluence.methods import trajectory as T
from tinfluence.demo import load_digits_split

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)

TEST_IDS = list(range(5))
TOP = 30
BATCH = 100


def model(kind: str):
    """`(loss, params0)` for "lr" (64→10, zero init) or "mlp<h>" (64-h-10 tanh, seeded init)."""
    torch.manual_seed(0)
    if kind == "lr":
        module = nn.Linear(64, 10)
    else:
        module = nn.Sequential(nn.Linear(64, int(kind[3:])), nn.Tanh(), nn.Linear(int(kind[3:]), 10))
    apply, params = ti.functionalize(module)
    params = ti.tree.zeros_like(params) if kind == "lr" else params

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    return loss, params


SETTINGS = [
    # (label, model, optimizer, lr, momentum, epochs); momentum 0.9 at lr 0.01 takes the steps of plain SGD at 0.1
    ("digits LR", "lr", "sgd", 0.1, 0.0, 10),
    ("MLP 64-32-10", "mlp32", "sgd", 0.1, 0.0, 10),
    ("MLP 64-32-10", "mlp32", "sgd", 0.1, 0.0, 20),
    ("MLP 64-32-10", "mlp32", "sgd", 0.01, 0.9, 10),
    ("MLP 64-32-10", "mlp32", "sgd", 0.1, 0.9, 10),
    ("MLP 64-32-10", "mlp32", "sgd", 0.3, 0.0, 10),
    ("MLP 64-32-10", "mlp32", "sgd", 0.3, 0.9, 10),
    ("MLP 64-32-10", "mlp32", "adam", 0.003, 0.9, 10),
    ("MLP 64-128-10", "mlp128", "sgd", 0.1, 0.0, 10),
]


def optimizer(name: str, lr: float, momentum: float):
    """`ti.optim.sgd(lr, momentum)`, or `ti.optim.adam(lr, b1=momentum)`."""
    return ti.optim.sgd(lr, momentum=momentum) if name == "sgd" else ti.optim.adam(lr, b1=momentum)


def correlations(scores: torch.Tensor, actual: torch.Tensor) -> tuple[list, list]:
    """Per test point Pearson and Spearman of `[n_test, k]` predictions against `[n_test, k]` actual changes."""
    return ti.pearson(scores, actual).tolist(), ti.spearman(scores, actual).tolist()


def agreement(setting, train, test, generator_seed: int = 0) -> dict:
    _, kind, opt, lr, momentum, epochs = setting
    loss, params0 = model(kind)
    run = ti.training_run(loss, params0, train, optimizer(opt, lr, momentum), epochs=epochs,
                          batch_size=BATCH, generator=torch.Generator().manual_seed(generator_seed))
    scores = ti.trajectory_influence(run, test)
    per_epoch = math.ceil(ti.num_examples(train) / BATCH)
    checkpoints = [(p, lr) for p in run.params_at(range(0, run.steps, per_epoch))]
    methods = {"trajectory": scores, "TracIn": ti.tracin(loss, checkpoints, train, test),
               "grad-dot": ti.grad_dot(loss, run.final_params(), train, test)}

    top = scores.abs().topk(TOP, dim=1).indices                                  # [n_test, 30]
    ids = top.unique()
    column = {int(i): c for c, i in enumerate(ids)}
    cols = torch.tensor([[column[int(i)] for i in row] for row in top])
    actual_top = T.replay_effect(run, test, [[int(i)] for i in ids]).gather(1, cols)
    rand = torch.randperm(ti.num_examples(train), generator=torch.Generator().manual_seed(1))[:TOP]
    actual_rand = T.replay_effect(run, test, [[int(i)] for i in rand])
    rows = {}
    for name, s in methods.items():
        rows[name] = {"top": correlations(s.gather(1, top), actual_top),
                      "random": correlations(s[:, rand], actual_rand)}
    helpful = scores.topk(10, dim=1).indices                                     # the 10 most helpful per point
    groups = [row.tolist() for row in helpful]
    predicted = ti.group_influence(scores, groups).diagonal()
    exact = T.replay_effect(run, test, groups).diagonal()
    return {"setting": setting, "rows": rows, "group": (predicted.tolist(), exact.tolist()),
            "actual_scale": float(actual_top.abs().max())}


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(kind: str, train, test100, repeats: int) -> dict:
    loss, params0 = model(kind)
    make = lambda: ti.training_run(loss, params0, train, ti.optim.sgd(0.1), epochs=10, batch_size=BATCH,  # noqa: E731
                                   generator=torch.Generator().manual_seed(0))
    run = make()
    per_state = T._state_bytes(run.final_params(), run.final_state())
    length = math.isqrt(run.steps - 1) + 1
    budget = (math.ceil(run.steps / length) + length) * per_state
    t_train = timed(make, repeats)
    one = ti.take(test100, slice(0, 1))
    return {
        "kind": kind, "steps": run.steps, "P": ti.tree.size(params0), "train_s": t_train,
        "one": timed(lambda: ti.trajectory_influence(run, one), repeats),
        "hundred": timed(lambda: ti.trajectory_influence(run, test100), repeats),
        "one_ckpt": timed(lambda: ti.trajectory_influence(run, one, memory_budget=budget), repeats),
        "hundred_ckpt": timed(lambda: ti.trajectory_influence(run, test100, memory_budget=budget), repeats),
        "stored_MB": run.steps * per_state / 2**20, "ckpt_MB": budget / 2**20,
    }


def fmt(values) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def report(results: list, costs: list, seconds: float) -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    lines = [
        "# Trajectory influence against same-schedule retraining (digits)", "",
        f"Machine: {cpu}; torch {torch.__version__}, torch.set_num_threads(1); Python {platform.python_version()}. "
        f"Total run {seconds:.0f} s.", "",
        "Command: `OMP_NUM_THREADS=1 python benchmarks/trajectory.py`", "",
        f"Data: sklearn digits, 1000 train (standardized), test points {TEST_IDS} of the held-out split; float64; "
        f"mini-batch SGD (`ti.optim.sgd`, no weight decay; one Adam row), batches of {BATCH}, the schedule fixed by "
        "`torch.Generator().manual_seed(0)`. Ground truth: the exact replay of the same run with w_z = 0 "
        "(`ti.replay_effect`), i.e. the change of the test cross entropy when z is removed and every other example "
        "keeps its place in the schedule. Scores: positive = helpful (removal raises the test loss).", "",
        f"`top {TOP}`: for each test point the {TOP} removals of largest |trajectory score| (the same set for every "
        f"method); `random {TOP}`: {TOP} random training ids, the same for every point and method. Each cell lists the "
        "five test points in order. TracIn: checkpoints at the start of every epoch, weighted by the learning rate; "
        "grad-dot: at the final parameters.", "",
        "## Agreement with retraining", "",
        "| model | optimizer | lr | momentum (Adam: b1) | epochs | method | Pearson, top 30 | Spearman, top 30 | Pearson, random 30 | "
        "Spearman, random 30 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        label, _, opt, lr, momentum, epochs = res["setting"]
        for name, row in res["rows"].items():
            (pt, st), (pr, sr) = row["top"], row["random"]
            lines.append(f"| {label} | {opt} | {lr} | {momentum} | {epochs} | {name} | {fmt(pt)} | {fmt(st)} | {fmt(pr)} | "
                         f"{fmt(sr)} |")
    lines += ["", "## Groups: the 10 most helpful examples of each point removed together", "",
              "First order (`ti.group_influence`, the sum of the 10 scores) against the exact replay with w_S = 0, "
              "per test point.", "",
              "| model | optimizer | lr | momentum | epochs | predicted | exact replay |", "|---|---|---|---|---|---|---|"]
    for res in results:
        label, _, opt, lr, momentum, epochs = res["setting"]
        predicted, exact = res["group"]
        lines.append(f"| {label} | {opt} | {lr} | {momentum} | {epochs} | {' / '.join(f'{v:.4g}' for v in predicted)} | "
                     f"{' / '.join(f'{v:.4g}' for v in exact)} |")
    lines += ["", "## Cost", "",
              "Plain SGD, lr 0.1, 10 epochs (T = 100 steps). Median of 3 calls, seconds; ratios to one training run "
              "(`ti.training_run`). `kept`: every state stored; `checkpointed`: `memory_budget` of ⌈T/L⌉ + L states "
              "(L = ⌈√T⌉), so each segment is replayed a second time.", "",
              "| model | P | train s | 1 measure, kept | 100 measures, kept | 1 measure, checkpointed | "
              "100 measures, checkpointed | states kept MB | checkpointed MB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        r = lambda key, c=c: f"{c[key]:.2f} s ({c[key] / c['train_s']:.1f}×)"  # noqa: E731
        lines.append(f"| {c['kind']} | {c['P']} | {c['train_s']:.2f} | {r('one')} | {r('hundred')} | {r('one_ckpt')} | "
                     f"{r('hundred_ckpt')} | {c['stored_MB']:.2f} | {c['ckpt_MB']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-trajectory.md")))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    train, held_out, _ = load_digits_split()
    test = ti.take(held_out, torch.tensor(TEST_IDS))
    results = []
    for setting in SETTINGS:
        t0 = time.perf_counter()
        results.append(agreement(setting, train, test))
        top = results[-1]["rows"]["trajectory"]["top"]
        print(f"{setting}: Pearson {fmt(top[0])}  Spearman {fmt(top[1])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    test100 = ti.take(held_out, slice(0, 100))
    costs = []
    for kind in ("lr", "mlp32", "mlp128"):
        costs.append(cost(kind, train, test100, args.repeats))
        print(costs[-1], flush=True)
    text = report(results, costs, time.perf_counter() - start)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
