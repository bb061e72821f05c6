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

For the 64-128-10 MLP and a small digits CNN also EK-FAC (`ti.ekfac`) and Gauss-Newton (`ti.cg` over
`ti.ggn_vp`) influence at the final parameters; and on the MLP the LDS (`ti.lds`) of every method over random
removal subsets of 1 %, 10 % and 50 %, each "retrained" by the exact same-schedule replay.

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
from torch.func import vmap

import tinfluence as ti
from tinfluence.demo import load_digits_split
from tinfluence.methods import trajectory as T

torch.set_default_dtype(torch.float64)
torch.set_num_threads(1)

TEST_IDS = list(range(5))
TOP = 30
BATCH = 100


def model(kind: str):
    """`(loss, params0, predict)` for "lr" (64→10, zero init), "mlp<h>" (64-h-10 tanh) or "cnn" (seeded init).

    "cnn": the 8×8 image, Conv2d(1, 8, 3) (8 × 6 × 6), tanh, flattened, Linear(288, 10): 2970 parameters.
    """
    torch.manual_seed(0)
    if kind == "lr":
        module = nn.Linear(64, 10)
    elif kind == "cnn":
        module = nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3), nn.Tanh(), nn.Flatten(),
                               nn.Linear(288, 10))
    else:
        module = nn.Sequential(nn.Linear(64, int(kind[3:])), nn.Tanh(), nn.Linear(int(kind[3:]), 10))
    apply, params = ti.functionalize(module)
    params = ti.tree.zeros_like(params) if kind == "lr" else params

    def predict(p, batch):
        return apply(p, batch[0])

    def loss(p, batch):
        return F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")

    return loss, params, predict


def output_loss(outputs, batch):
    return F.cross_entropy(outputs, batch[1], reduction="none")


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
    ("CNN conv8-10", "cnn", "sgd", 0.1, 0.0, 10),
]
DEEP = {"mlp128", "cnn"}      # rows that also get EK-FAC and GGN influence at the final parameters
DAMPING = 1e-2                # λ of EK-FAC and of CG over the GGN (the runs have no weight decay)
CG_TOL = 1e-6
REPLAY_CHUNK = 32             # removals replayed together (vmap over weight vectors)
FRACTIONS = (0.01, 0.1, 0.5)  # LDS: share of the training set removed
SUBSETS = 20                  # LDS: retrained (replayed) models per fraction
LDS_TEST = 50                 # LDS: test points (the first of the held-out split)


def optimizer(name: str, lr: float, momentum: float):
    """`ti.optim.sgd(lr, momentum)`, or `ti.optim.adam(lr, b1=momentum)`."""
    return ti.optim.sgd(lr, momentum=momentum) if name == "sgd" else ti.optim.adam(lr, b1=momentum)


def correlations(scores: torch.Tensor, actual: torch.Tensor) -> tuple[list, list]:
    """Per test point Pearson and Spearman of `[n_test, k]` predictions against `[n_test, k]` actual changes."""
    return ti.pearson(scores, actual).tolist(), ti.spearman(scores, actual).tolist()


def replayed(run, test, masks: torch.Tensor) -> torch.Tensor:
    """`[n_test, n_groups]`: m(θ_T with w_S = 0) − m(θ_T) for each removal mask `[n_groups, n]`, exactly.

    The same quantity as `ti.replay_effect`, with REPLAY_CHUNK replays run at once by `vmap` over their weight
    vectors (same schedule, same steps; equal to ti.replay_effect up to round-off, checked in `agreement`).
    """
    parts = (run.loss, run.train, run.optimizer, run.batches)

    def final(w):
        theta, state = run.params0, run.optimizer.init(run.params0)
        for t in range(run.steps):
            theta, state = T._advance(parts, theta, state, t, w)
        return run.loss(theta, test)

    base = run.loss(run.final_params(), test)
    weights = run.weights.expand(masks.shape[0], -1).masked_fill(masks, 0.0)
    return torch.cat([vmap(final)(w) for w in weights.split(REPLAY_CHUNK)]).T - base[:, None]


def singles(ids, n: int) -> torch.Tensor:
    """Masks `[len(ids), n]` removing one example each."""
    return torch.zeros(len(ids), n, dtype=torch.bool).scatter_(1, torch.as_tensor(ids).reshape(-1, 1), True)


def scores_for(kind: str, run, loss, predict, train, test, lr: float) -> tuple[dict, dict]:
    """Every method's `[n_test, n_train]` scores for the run, and the seconds each took."""
    per_epoch = math.ceil(ti.num_examples(train) / BATCH)
    params = run.final_params()
    makers = {
        "trajectory": lambda: ti.trajectory_influence(run, test),
        "TracIn": lambda: ti.tracin(loss, [(p, lr) for p in run.params_at(range(0, run.steps, per_epoch))], train, test),
        "grad-dot": lambda: ti.grad_dot(loss, params, train, test),
    }
    if kind in DEEP:
        makers["EK-FAC"] = lambda: ti.influence(loss, params, train, test, ihvp=ti.ekfac(
            loss, params, train, predict=predict, output_loss=output_loss, fisher="ggn", damping=DAMPING).ihvp)
        makers["GGN (CG)"] = lambda: ti.influence(loss, params, train, test, ihvp=ti.cg(
            ti.ggn_vp(predict, params, train, output_loss=output_loss), damping=DAMPING, tol=CG_TOL, maxiter=1000))
    scores, seconds = {}, {}
    for name, make in makers.items():
        start = time.perf_counter()
        scores[name] = make()
        seconds[name] = time.perf_counter() - start
    return scores, seconds


def trained(setting, train):
    _, kind, opt, lr, momentum, epochs = setting
    loss, params0, predict = model(kind)
    run = ti.training_run(loss, params0, train, optimizer(opt, lr, momentum), epochs=epochs,
                          batch_size=BATCH, generator=torch.Generator().manual_seed(0))
    return run, loss, predict


def agreement(setting, train, test) -> dict:
    kind, lr = setting[1], setting[3]
    run, loss, predict = trained(setting, train)
    methods, seconds = scores_for(kind, run, loss, predict, train, test, lr)
    scores = methods["trajectory"]
    n = ti.num_examples(train)

    top = scores.abs().topk(TOP, dim=1).indices                                  # [n_test, 30]
    ids = top.unique()
    column = {int(i): c for c, i in enumerate(ids)}
    cols = torch.tensor([[column[int(i)] for i in row] for row in top])
    effects = replayed(run, test, singles(ids, n))
    check = T.replay_effect(run, test, [[int(i)] for i in ids[:2]])              # the library's own replay
    replay_gap = float((effects[:, :2] - check).abs().max() / effects.abs().max())
    actual_top = effects.gather(1, cols)
    rand = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:TOP]
    actual_rand = replayed(run, test, singles(rand, n))
    rows = {}
    for name, s in methods.items():
        rows[name] = {"top": correlations(s.gather(1, top), actual_top),
                      "random": correlations(s[:, rand], actual_rand)}
    helpful = scores.topk(10, dim=1).indices                                     # the 10 most helpful per point
    groups = torch.zeros(len(helpful), n, dtype=torch.bool).scatter_(1, helpful, True)
    predicted = ti.group_influence(scores, groups).diagonal()
    exact = replayed(run, test, groups).diagonal()
    return {"setting": setting, "rows": rows, "group": (predicted.tolist(), exact.tolist()),
            "actual_scale": float(actual_top.abs().max()), "replay_gap": replay_gap, "seconds": seconds}


def lds_study(train, test) -> dict:
    """LDS (`ti.lds`) of every method on the digits 64-128-10 MLP, against same-schedule replays of random subsets.

    `ti.lds` retrains through its `train_fn(params, data)`: here the data are the training ids (`torch.arange(n)`),
    so `data` is the kept subset, and the "retraining" is the exact replay of the run with the weights of the
    removed examples set to 0 (every kept example in its place in the schedule). Replays are cached by subset,
    so every method is scored on the same models.
    """
    setting = ("MLP 64-128-10", "mlp128", "sgd", 0.1, 0.0, 10)
    run, loss, predict = trained(setting, train)
    methods, seconds = scores_for("mlp128", run, loss, predict, train, test, setting[3])
    n = ti.num_examples(train)
    cache = {}

    def replay(_, kept):
        key = kept.numpy().tobytes()
        if key not in cache:
            cache[key] = run.replay(torch.zeros(n).index_fill_(0, kept, 1.0)).final_params()
        return cache[key]

    out = {}
    for removed in FRACTIONS:
        for name, s in methods.items():
            r = ti.lds(replay, run.final_params(), torch.arange(n), test, s, measure=loss, subsets=SUBSETS,
                       fraction=1 - removed, generator=torch.Generator().manual_seed(FRACTIONS.index(removed) + 1),
                       progress=False)
            out[(removed, name)] = (float(r.mean), float(r.low), float(r.high), float(r.per_test.min()))
        print(f"LDS, {removed:.0%} removed: " + ", ".join(f"{k[1]} {v[0]:.3f}" for k, v in out.items() if k[0] == removed),
              flush=True)
    return {"lds": out, "replays": len(cache), "seconds": seconds}


def timed(fn, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` calls, seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cost(kind: str, train, test100, repeats: int) -> dict:
    loss, params0, _ = model(kind)
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
        "hundred_one_block": timed(lambda: one_block(lambda: ti.trajectory_influence(run, test100)), repeats),
        "one_ckpt": timed(lambda: ti.trajectory_influence(run, one, memory_budget=budget), repeats),
        "hundred_ckpt": timed(lambda: ti.trajectory_influence(run, test100, memory_budget=budget), repeats),
        "stored_MB": run.steps * per_state / 2**20, "ckpt_MB": budget / 2**20,
    }


def one_block(fn):
    """`fn()` with every cotangent stack in one batched autograd backward per step.

    The reverse pass as it was before large stacks went in row blocks through vmap over torch.func.vjp.
    """
    saved, T.LARGE_STACK = T.LARGE_STACK, 1 << 62
    try:
        return fn()
    finally:
        T.LARGE_STACK = saved


def fmt(values) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def report(results: list, lds: dict, costs: list, seconds: float) -> str:
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
        "(`ti.replay_effect`; here replayed REPLAY_CHUNK at a time under `vmap` over the weight vectors, "
        f"equal to `ti.replay_effect` to {max(r['replay_gap'] for r in results):.1e} relative, checked on 2 removals "
        "per setting), i.e. the change of the test cross entropy when z is removed and every other example "
        "keeps its place in the schedule. Scores: positive = helpful (removal raises the test loss).", "",
        f"`top {TOP}`: for each test point the {TOP} removals of largest |trajectory score| (the same set for every "
        f"method); `random {TOP}`: {TOP} random training ids, the same for every point and method. Each cell lists the "
        "five test points in order. TracIn: checkpoints at the start of every epoch, weighted by the learning rate; "
        "grad-dot: at the final parameters. For the 64-128-10 MLP and the CNN also classic influence at the final "
        f"parameters, (1/n) g_testᵀ (C + λI)⁻¹ g_z with λ = {DAMPING:g}: `EK-FAC` (`ti.ekfac`, fisher=\"ggn\", "
        f"the curvature C a Kronecker-factored Gauss-Newton matrix) and `GGN (CG)` (`ti.cg` over `ti.ggn_vp`, "
        f"tol {CG_TOL:g}: the exact Gauss-Newton matrix). Both predict the change at an optimum of the training "
        "objective, which these 10-epoch runs without weight decay are not; the rankings are what compares.", "",
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
    lines += ["", "Seconds per method (5 test points, one thread):", "",
              "| model | " + " | ".join(results[-1]["seconds"]) + " |", "|---|" + "---|" * len(results[-1]["seconds"])]
    for res in results:
        if res["setting"][1] in DEEP:
            lines.append(f"| {res['setting'][0]} | " + " | ".join(f"{v:.2f}" for v in res["seconds"].values()) + " |")
    names = list(dict.fromkeys(name for _, name in lds["lds"]))
    lines += ["", "## LDS on the digits 64-128-10 MLP (same schedule)", "",
              f"`ti.lds` over {SUBSETS} random subsets per fraction (the same subsets for every method), each "
              "\"retrained\" by the exact replay of the run (plain SGD, lr 0.1, 10 epochs, batches of 100) with the "
              f"removed examples' weights set to 0; {lds['replays']} replays in all. Test measure: the cross entropy "
              f"of the first {LDS_TEST} held-out points. Each cell: the mean LDS over test points [95 % interval], "
              "and the lowest test point's LDS.", "",
              "| removed | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for removed in FRACTIONS:
        cells = [lds["lds"][(removed, name)] for name in names]
        lines.append(f"| {removed:.0%} | " + " | ".join(f"{m:.3f} [{lo:.3f}, {hi:.3f}], min {mn:.3f}"
                                                         for m, lo, hi, mn in cells) + " |")
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
              "(L = ⌈√T⌉), so each segment is replayed a second time. `one block`: the 100 cotangent rows in one "
              "batched autograd backward per step, as before (now a stack over "
              f"{T.LARGE_STACK / 2**20:g} MiB goes through vmap over torch.func.vjp in blocks of {T.ROW_BLOCK} rows; "
              "same scores to round-off), measured in the same run.", "",
              "| model | P | train s | 1 measure, kept | 100 measures, kept | 100 measures, kept, one block | "
              "1 measure, checkpointed | 100 measures, checkpointed | states kept MB | checkpointed MB |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for c in costs:
        r = lambda key, c=c: f"{c[key]:.2f} s ({c[key] / c['train_s']:.1f}×)"  # noqa: E731
        lines.append(f"| {c['kind']} | {c['P']} | {c['train_s']:.2f} | {r('one')} | {r('hundred')} | "
                     f"{r('hundred_one_block')} | {r('one_ckpt')} | {r('hundred_ckpt')} | {c['stored_MB']:.2f} | {c['ckpt_MB']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).with_name("RESULTS-trajectory.md")))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", help="comma-separated model kinds of the agreement rows (a quick look), e.g. cnn")
    args = parser.parse_args()
    start = time.perf_counter()
    train, held_out, _ = load_digits_split()
    test = ti.take(held_out, torch.tensor(TEST_IDS))
    results = []
    for setting in SETTINGS if args.only is None else [x for x in SETTINGS if x[1] in args.only.split(",")]:
        t0 = time.perf_counter()
        results.append(agreement(setting, train, test))
        top = results[-1]["rows"]["trajectory"]["top"]
        print(f"{setting}: Pearson {fmt(top[0])}  Spearman {fmt(top[1])}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    lds = lds_study(train, ti.take(held_out, slice(0, LDS_TEST)))
    test100 = ti.take(held_out, slice(0, 100))
    costs = []
    for kind in ("lr", "mlp32", "mlp128", "cnn"):
        costs.append(cost(kind, train, test100, args.repeats))
        print(costs[-1], flush=True)
    text = report(results, lds, costs, time.perf_counter() - start)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
