"""The accuracy ladder: every method and peer scored against one shared retraining ground truth.

    python benchmarks/ladder.py                   # every task (digits-lr, digits-mlp, digits-cnn, fmnist-mlp), full settings
    python benchmarks/ladder.py --quick           # the digits tasks with fewer retrained models (<= 10 min on 2 cores, empty cache)
    python benchmarks/ladder.py --task digits-mlp --methods tracin,grad-dot

Ground truth. For each task, `subsets` random training subsets are drawn per removal fraction
(1 %, 10 %, 50 % of the training points removed; the subsets are the ones `ti.lds` draws for
that fraction and seed), and one model is retrained per subset in each variant:

  same-schedule  the base run's initialization and mini-batch order; the removed examples get
                 weight 0 in the mini-batch loss Σ_{i∈B} w_i ℓ_i / |B| (the contract of
                 trajectory influence: every other example keeps its place in the schedule);
  fresh-seed     a new initialization and a new order per model, trained on the kept examples
                 only (the setting of TRAK, dattri and kronfluence's LDS numbers);
  optimum        (convex tasks) the unique regularized optimum on the kept examples, L-BFGS + Newton
                 warm-started from θ̂: initialization and order do not matter, so one variant.

Each retrained model's per-test-point loss and margin are measured once and appended, one
JSON line per model (flushed and fsynced), to benchmarks/.cache/ladder/<task>-<key>/ground-truth.jsonl,
whose key hashes the task's settings and the source of the functions that define the ground
truth; a rerun skips the models already there, cuts a torn last line and checks every record's
identity (job and subset hash). Models are trained in `--workers` (2) processes. Leave-one-out
retrainings (same schedule, one example weighted 0) give the LOO correlations.

Scores. Every method (tinfluence's and each peer's, `ladder_methods.py`) runs in a fresh child
process on the base model (like run.py): wall time of the whole call, peak RSS rise. LDS per
(variant, fraction) comes from `ti.lds` over the recorded models; LOO Pearson/Spearman from
`ti.pearson`/`ti.spearman` over all (test point, removed id) pairs. Results: RESULTS-ladder.md
and benchmarks/ladder-<task>.png (wall time, log scale, against LDS).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import tasks as T
import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti

CACHE = os.path.join(HERE, ".cache", "ladder")
DOCS = os.path.join(ROOT, "docs")
FRACTIONS = (0.01, 0.10, 0.50)          # share of the training points removed
REPEATS, REPEAT_BELOW = 2, 10.0   # a method is called twice (the time is the faster call) when its first call took < 10 s
PEERS_PYTHON = os.environ.get("TINFLUENCE_PEERS_PYTHON", "/work/venv-peers/bin/python")


# ---------------------------------------------------------------- tasks

@dataclass(frozen=True)
class Spec:
    """A ladder task: data, model, training schedule and ground-truth sizes."""

    name: str
    kind: str                 # "lr", "mlp" or "cnn"
    data: str                 # "digits" or "fmnist"
    n_train: int
    n_test: int
    l2: float
    dtype: str = "float64"
    hidden: int = 128
    epochs: int = 30          # SGD (deep tasks: the training run; LR: the TracIn run)
    lr: float = 0.1
    batch: int = 32
    every: int = 5            # TracIn checkpoint every `every` epochs
    subsets: int = 50         # retrained models per (variant, fraction)
    loo: int = 50             # training ids retrained one at a time
    ensemble: int = 50        # independently trained models for TRAK ensembles


SPECS = {
    "digits-lr": Spec("digits-lr", "lr", "digits", 1000, 100, 1e-2, epochs=10, every=2),
    "digits-mlp": Spec("digits-mlp", "mlp", "digits", 1000, 100, 1e-2),
    "digits-cnn": Spec("digits-cnn", "cnn", "digits", 1000, 100, 1e-2),
    "fmnist-mlp": Spec("fmnist-mlp", "mlp", "fmnist", 5000, 200, 1e-4, dtype="float32", epochs=5, lr=0.05,
                       batch=64, every=1),
}
QUICK = {"subsets": 20, "loo": 20, "ensemble": 10}
QUICK_TASKS = ("digits-lr", "digits-mlp", "digits-cnn")


def variants(spec: Spec) -> tuple[str, ...]:
    return ("optimum",) if spec.kind == "lr" else ("same-schedule", "fresh-seed")


def module(kind: str, d: int, c: int, hidden: int) -> nn.Module:
    """The task's architecture. The CNN reads the 64 digits features as one 8×8 channel."""
    if kind == "lr":
        return nn.Linear(d, c)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, c))
    side = round(d ** 0.5)
    return nn.Sequential(nn.Unflatten(1, (1, side, side)), nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * (side // 2) ** 2, c))


class LadderTask(T.Task):
    """`tasks.Task` (so that benchmarks/peers.py adapters take it) with a CNN and seeded initializations.

    `info` holds the Spec as a dict; `ensemble` the state_dicts of the TRAK ensemble.
    """

    ensemble = ()

    @property
    def spec(self) -> Spec:
        return Spec(**self.info["spec"])

    def make_model(self, state: dict | None = None) -> nn.Module:
        d, c = self.train[0].shape[1], int(self.train[1].max()) + 1
        torch.manual_seed(0)
        model = module(self.kind, d, c, self.hidden).to(self.dtype)
        model.load_state_dict(state if state is not None else self.state)
        return model.eval()

    def init_state(self, seed: int = 0) -> dict:
        """The initial parameters drawn with torch.manual_seed(seed)."""
        d, c = self.train[0].shape[1], int(self.train[1].max()) + 1
        torch.manual_seed(seed)
        return {k: v.to(self.dtype) for k, v in module(self.kind, d, c, self.hidden).state_dict().items()}


def load_data(spec: Spec):
    dtype = getattr(torch, spec.dtype)
    if spec.data == "digits":
        train, test = T.digits(spec.n_train, spec.n_test)
    else:
        train, test = T.fmnist(spec.n_train, spec.n_test, dtype=dtype)
    return (train[0].to(dtype), train[1]), (test[0].to(dtype), test[1])


def train_sgd(task: LadderTask, seeds: list, *, weights: torch.Tensor | None = None, kept: torch.Tensor | None = None,
              every: int | None = None) -> list:
    """Deterministic mini-batch SGD (weight decay l2) of K = len(seeds) models at once (vmapped over models).

    Model k starts from `init_state(seeds[k])`; its order is drawn each epoch by
    `torch.randperm(generator=Generator(seeds[k]))` over its pool: all training ids, or the
    row `kept[k]` (`[K, m]` ids). The mini-batch objective is Σ_{i∈B} w_i ℓ_i / |B| with
    `weights[k]` (`[K, n_train]`; default 1), each step θ ← θ − lr (∇ + l2 θ), as
    torch.optim.SGD(weight_decay=l2). The same-schedule variant is seeds all 0 and 0/1 weights.

    Returns per model its final state_dict, or with `every` its `[(state_dict, lr), ...]`
    saved every `every` epochs.
    """
    spec = task.spec
    apply, _ = ti.functionalize(task.make_model(task.init_state(0)))
    inits = [task.init_state(seed) for seed in seeds]
    params = {name: torch.stack([init[name] for init in inits]) for name in inits[0]}
    X, y = task.train
    n, K = len(X), len(seeds)
    w = torch.ones(K, n, dtype=task.dtype) if weights is None else weights.to(task.dtype)
    pools = torch.arange(n).expand(K, n) if kept is None else kept
    shared = kept is None and len(set(seeds)) == 1             # one order for every model: the batch is shared

    def batch_loss(p, xb, yb, wb):
        return (F.cross_entropy(apply(p, xb), yb, reduction="none") * wb).mean()

    step = torch.func.vmap(torch.func.grad(batch_loss), in_dims=(0, None, None, 0) if shared else 0)
    generators = [torch.Generator().manual_seed(seed) for seed in (seeds[:1] if shared else seeds)]
    saved = [[] for _ in range(K)]
    for epoch in range(spec.epochs):
        order = torch.stack([pool[torch.randperm(pools.shape[1], generator=g)] for pool, g in zip(pools, generators)])
        for ids in order.split(spec.batch, dim=1):                                    # [K or 1, B]
            wb = w.gather(1, ids.expand(K, -1))
            grads = step(params, X[ids[0]], y[ids[0]], wb) if shared else step(params, X[ids], y[ids], wb)
            params = {name: p - spec.lr * (grads[name] + task.l2 * p) for name, p in params.items()}
        if every and (epoch + 1) % every == 0:
            for k in range(K):
                saved[k].append(({name: p[k].clone() for name, p in params.items()}, spec.lr))
    return saved if every else [{name: p[k].clone() for name, p in params.items()} for k in range(K)]


def train_optimum(task: LadderTask, kept: torch.Tensor) -> dict:
    """The regularized optimum on the kept examples: L-BFGS + Newton (gtol 1e-10), warm-started from θ̂."""
    _, params, loss = T.pure(task)
    trainer = ti.lbfgs_trainer(loss, l2=task.l2, gtol=1e-10, newton_steps=5)
    fitted = trainer(params, ti.take(task.train, kept))
    return {k: v.detach().clone() for k, v in fitted.items()}


def measures(task: LadderTask, state: dict) -> tuple[list, list]:
    """Per test point: the cross-entropy loss and the margin (logit of the label minus logsumexp of the others)."""
    X, y = task.test
    with torch.no_grad():
        logits = task.make_model(state)(X).to(torch.float64)
        loss = F.cross_entropy(logits, y, reduction="none")
        own = logits.gather(1, y[:, None])[:, 0]
        others = logits.scatter(1, y[:, None], float("-inf")).logsumexp(1)
    return loss.tolist(), (own - others).tolist()


GROUND_TRUTH_SOURCE = (Spec, module, LadderTask, load_data, train_sgd, train_optimum, measures)


def source_hash() -> str:
    """Hash of the code that defines tasks and ground truth (and of tasks.py, whose loaders and closed forms it uses)."""
    text = "".join(inspect.getsource(obj) for obj in GROUND_TRUTH_SOURCE) + inspect.getsource(T)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def task_key(spec: Spec) -> str:
    return hashlib.sha256(json.dumps([asdict(spec), source_hash(), torch.__version__]).encode()).hexdigest()[:12]


def build_task(spec: Spec, folder: str) -> tuple[LadderTask, str]:
    """The base model (same-schedule run on all the data, seed 0; LR: the optimum), its TracIn checkpoints; cached."""
    path = os.path.join(folder, "task.pt")
    if os.path.exists(path):
        return load_task(path), path
    train, test = load_data(spec)
    task = LadderTask(spec.name, spec.kind, train, test, state={}, l2=spec.l2, hidden=spec.hidden, info={"spec": asdict(spec)})
    start = time.perf_counter()
    task.checkpoints = train_sgd(task, [0], every=spec.every)[0]
    if spec.kind == "lr":
        task.state = T._optimum(task, newton=True)
    else:
        task.state = task.checkpoints[-1][0]
    task.info["train_seconds"] = time.perf_counter() - start
    os.makedirs(folder, exist_ok=True)
    torch.save(dict(task.__dict__), path + ".part")
    os.replace(path + ".part", path)
    return task, path


def load_task(path: str) -> LadderTask:
    task = LadderTask.__new__(LadderTask)
    task.__dict__.update(torch.load(path, weights_only=False))
    return task


# ---------------------------------------------------------------- subsets and jobs

def draw_subsets(n_train: int, removed: float, m: int, seed: int) -> torch.Tensor:
    """The `m` kept-masks `[m, n_train]` (bool) that `ti.lds` draws for `fraction = 1 - removed` and this seed.

    Obtained through ti.lds itself (a training function that records the subsets it is given),
    so that the ground truth is retrained on exactly the subsets ti.lds later evaluates.
    """
    seen = []

    def record(params, kept_ids):
        seen.append(kept_ids.clone())
        return params

    ti.lds(record, {}, torch.arange(n_train), torch.arange(2), torch.zeros(2, n_train),
           measure=lambda p, b: torch.zeros(len(b), dtype=torch.float64), subsets=m, fraction=1 - removed,
           generator=torch.Generator().manual_seed(seed), progress=False)
    masks = torch.zeros(m, n_train, dtype=torch.bool)
    for j, ids in enumerate(seen):
        masks[j, ids] = True
    return masks


def subset_seed(removed: float) -> int:
    """The seed of the subsets of one removal fraction (shared by every variant)."""
    return FRACTIONS.index(removed) + 1


def loo_ids(spec: Spec) -> torch.Tensor:
    return torch.arange(spec.loo) * (spec.n_train // spec.loo)


def jobs(spec: Spec) -> list[tuple[str, torch.Tensor]]:
    """Every retraining as `(job name, kept-mask [n_train])`: subsets per variant and fraction, base, leave-one-out."""
    out = []
    for removed in FRACTIONS:
        masks = draw_subsets(spec.n_train, removed, spec.subsets, seed=subset_seed(removed))
        out += [(f"{v}/{removed:g}/{j}", mask) for v in variants(spec) for j, mask in enumerate(masks)]
    full = torch.ones(spec.n_train, dtype=torch.bool)
    out.append(("loo/base", full))
    for i in loo_ids(spec).tolist():
        mask = full.clone()
        mask[i] = False
        out.append((f"loo/{i}", mask))
    return out


def mask_hash(mask: torch.Tensor) -> str:
    return hashlib.sha256(mask.numpy().tobytes()).hexdigest()[:16]


def retrain(task: LadderTask, names: list, masks: torch.Tensor) -> list:
    """Trains the models of one chunk of jobs (one group: a variant and fraction, LOO, or the ensemble); their state_dicts."""
    group = names[0].rsplit("/", 1)[0]
    if group == "ensemble":
        return train_sgd(task, [1 + int(name.split("/")[1]) for name in names])
    kept = [mask.nonzero()[:, 0] for mask in masks]
    if task.kind == "lr":
        return [train_optimum(task, ids) for ids in kept]
    if group.startswith("fresh-seed/"):
        base = 1000 * (FRACTIONS.index(float(group.split("/")[1])) + 1)
        return train_sgd(task, [base + int(name.rsplit("/", 1)[1]) for name in names], kept=torch.stack(kept))
    return train_sgd(task, [0] * len(names), weights=masks)        # same-schedule subsets, the base run and LOO


CHUNK = 10          # models trained together (vmapped) in one worker call


def chunks(todo: list) -> list:
    """`todo` `[(name, mask)]` cut into `(names, masks [K, n])` of at most CHUNK jobs of one group each."""
    groups: dict = {}
    for name, mask in todo:
        groups.setdefault(name.rsplit("/", 1)[0], []).append((name, mask))
    return [([n for n, _ in part], torch.stack([m for _, m in part]))
            for items in groups.values() for part in (items[i:i + CHUNK] for i in range(0, len(items), CHUNK))]


_WORKER: dict = {}
REUSED = {"models": 0, "results": 0}      # found in the cache by this run (reported with its wall time)


def _init_worker(path: str) -> None:
    torch.set_num_threads(1)
    _WORKER["task"] = load_task(path)


def _run_chunk(chunk):
    """`[(name, record or None, state or None)]` for one chunk: ensemble members keep their state, others are measured."""
    names, masks = chunk
    task = _WORKER["task"]
    start = time.perf_counter()
    states = retrain(task, names, masks)
    seconds = (time.perf_counter() - start) / len(names)
    out = []
    for name, mask, state in zip(names, masks, states):
        if name.startswith("ensemble/"):
            out.append((name, None, state))
            continue
        loss, margin = measures(task, state)
        out.append((name, {"job": name, "mask": mask_hash(mask), "loss": loss, "margin": margin, "seconds": seconds}, None))
    return out


# ---------------------------------------------------------------- the resumable store

def read_records(path: str, identity: dict) -> dict:
    """Finished records `{job: record}` of a ground-truth file; cuts a torn last line; refuses another identity."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    complete = raw[:raw.rfind(b"\n") + 1]
    if len(complete) < len(raw):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    lines = [json.loads(line) for line in complete.decode().splitlines() if line.strip()]
    if not lines:
        return {}
    if lines[0].get("identity") != identity:
        raise ValueError(f"ladder: {path} was written for {lines[0].get('identity')!r}, not {identity!r}; "
                         "delete the file to rebuild it.")
    done = {}
    for record in lines[1:]:
        done.setdefault(record["job"], record)
    return done


def append_record(f, record: dict) -> None:
    f.write((json.dumps(record) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


def identity(spec: Spec) -> dict:
    return {"spec": asdict(spec), "source": source_hash(), "torch": torch.__version__}


def ground_truth(spec: Spec, folder: str, task_path: str, *, workers: int = 2, limit: int | None = None,
                 progress: bool = True) -> dict:
    """Builds (or resumes) every retraining of `spec` and returns `{job: record}`.

    Each record is appended as soon as its model is measured; `limit` stops after that many new
    records (the tests simulate a kill with it). Records whose subset hash disagrees with the
    job's mask are refused (the file belongs to other subsets).
    """
    path = os.path.join(folder, "ground-truth.jsonl")
    ident = identity(spec)
    done = read_records(path, ident)
    REUSED["models"] += len(done)
    todo = []
    for name, mask in jobs(spec):
        if name in done:
            if done[name]["mask"] != mask_hash(mask):
                raise ValueError(f"ladder: {path} holds job {name} for another subset; delete the file to rebuild it.")
        else:
            todo.append((name, mask))
    if limit is not None:
        todo = todo[:limit]
    full = torch.ones(spec.n_train, dtype=torch.bool)
    todo += [(f"ensemble/{k}", full) for k in range(spec.ensemble if spec.kind != "lr" else 0)
             if not os.path.exists(os.path.join(folder, f"ensemble-{k}.pt"))]
    if not todo:
        return done
    work = chunks(todo)
    start = time.perf_counter()
    with open(path, "ab") as f:
        if not done and f.tell() == 0:
            append_record(f, {"identity": ident})
        if workers > 1 and len(work) > 1:
            pool = multiprocessing.get_context("fork").Pool(workers, _init_worker, (task_path,))
            results = pool.imap_unordered(_run_chunk, work)
        else:
            _init_worker(task_path)
            pool, results = None, map(_run_chunk, work)
        try:
            count = 0
            for part in results:
                for name, record, state in part:
                    if record is not None:
                        append_record(f, record)
                        done[name] = record
                    else:
                        target = os.path.join(folder, f"{name.replace('/', '-')}.pt")
                        torch.save(state, target + ".part")
                        os.replace(target + ".part", target)
                count += len(part)
                if progress:
                    print(f"  {spec.name}: {count}/{len(todo)} retrainings, {time.perf_counter() - start:.0f} s", flush=True)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return done


def ensemble_states(spec: Spec, folder: str) -> list:
    if spec.kind == "lr":
        return []
    return [torch.load(os.path.join(folder, f"ensemble-{k}.pt")) for k in range(spec.ensemble)]


# ---------------------------------------------------------------- metrics

def measured(spec: Spec, records: dict, variant: str, removed: float, what: str = "loss") -> torch.Tensor:
    """`[n_test, subsets]`: the recorded `what` ("loss" or "margin") of one (variant, fraction)'s models."""
    return torch.tensor([records[f"{variant}/{removed:g}/{j}"][what] for j in range(spec.subsets)], dtype=torch.float64).T


def lds(scores: torch.Tensor, values: torch.Tensor, *, removed: float, seed: int) -> ti.LDSResult:
    """`ti.lds` of `scores` `[n_test, n_train]` against recorded models `values` `[n_test, m]`.

    The subsets are `draw_subsets(n_train, removed, m, seed)`. ti.lds retrains through its
    `train_fn`; here that function looks up the recorded model of the subset it is given (and
    refuses a subset that was not recorded).
    """
    n_test, n_train = scores.shape
    columns = {mask_hash(mask): j for j, mask in enumerate(draw_subsets(n_train, removed, values.shape[1], seed))}

    def lookup(params, kept_ids):
        mask = torch.zeros(n_train, dtype=torch.bool)
        mask[kept_ids] = True
        key = mask_hash(mask)
        if key not in columns:
            raise ValueError("ladder.lds: ti.lds drew a subset that was not retrained; the masks are not ti.lds's.")
        return {"column": columns[key]}

    def measure(params, test_ids):
        return values[test_ids, params["column"]]

    return ti.lds(lookup, {}, torch.arange(n_train), torch.arange(n_test), scores.to(torch.float64), measure=measure,
                  subsets=values.shape[1], fraction=1 - removed, generator=torch.Generator().manual_seed(seed),
                  progress=False)


def loo_correlations(spec: Spec, records: dict, scores: torch.Tensor) -> tuple[float, float]:
    """Pearson and Spearman, over every (test point, removed id) pair, of scores and the actual LOO change of the loss."""
    ids = loo_ids(spec).tolist()
    base = torch.tensor(records["loo/base"]["loss"], dtype=torch.float64)
    actual = torch.stack([torch.tensor(records[f"loo/{i}"]["loss"], dtype=torch.float64) for i in ids], 1) - base[:, None]
    s = scores[:, ids].reshape(-1).to(torch.float64)
    return float(ti.pearson(s, actual.reshape(-1))), float(ti.spearman(s, actual.reshape(-1)))


def evaluate(spec: Spec, records: dict, scores: torch.Tensor) -> dict:
    """LDS (mean, low, high) per `variant/fraction`, and the LOO correlations."""
    out = {}
    for variant in variants(spec):
        for removed in FRACTIONS:
            r = lds(scores, measured(spec, records, variant, removed), removed=removed, seed=subset_seed(removed))
            out[f"{variant}/{removed:g}"] = [float(r.mean), float(r.low), float(r.high)]
    out["loo"] = list(loo_correlations(spec, records, scores))
    return out


# ---------------------------------------------------------------- methods in child processes

def child(spec_file: str) -> None:
    """Runs one method on the task file, saves its scores, prints its time and peak RSS rise."""
    with open(spec_file) as f:
        job = json.load(f)
    torch.set_num_threads(1)
    import ladder_methods
    import run

    task = load_task(job["task_file"])
    task.ensemble = ensemble_states(task.spec, os.path.dirname(job["task_file"]))
    fn = ladder_methods.REGISTRY[job["method"]].fn
    base = run._reset_peak()
    times = []
    while not times or (len(times) < REPEATS and sum(times) < REPEAT_BELOW):
        start = time.perf_counter()
        scores = fn(task)
        times.append(time.perf_counter() - start)
    peak = run._peak_mb() - base
    scores = torch.as_tensor(scores).detach().to(torch.float64).reshape(task.n_test, task.n_train)
    torch.save(scores, job["out"])
    print("RESULT " + json.dumps({"seconds": min(times), "first": times[0], "peak_mb": peak}), flush=True)


def run_method(name: str, task_path: str, python: str, timeout: float) -> dict:
    """`{"seconds", "peak_mb", "scores"}` or `{"error"}` from a fresh child process."""
    folder = os.path.dirname(task_path)
    out = os.path.join(folder, f"scores-{name}.pt")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"task_file": task_path, "method": name, "out": out}, f)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, HERE, os.environ.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run([python, os.path.abspath(__file__), "--child", f.name], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(f.name)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": failure(proc.returncode, proc.stderr)}
    return dict(json.loads(lines[-1][len("RESULT "):]), scores=torch.load(out))


def failure(status: int, stderr: str) -> str:
    """One line saying why a child failed: its last error line, or the signal that killed it."""
    errors = [line.strip() for line in stderr.splitlines() if "Error" in line or "Exception" in line]
    if errors:
        return errors[-1][:200]
    if status < 0:
        return (f"killed by signal {-status}" + (" (SIGKILL: the out-of-memory killer, or a kill from outside)"
                                                   if status == -9 else ""))
    return f"exited with status {status} and no error message"


def cached_method(name: str, task_path: str, python: str, timeout: float, methods_hash: str) -> dict:
    """`run_method`, its result kept beside the task (keyed by the methods' source) so that a rerun reuses it."""
    folder = os.path.dirname(task_path)
    path = os.path.join(folder, f"result-{name}-{methods_hash}.pt")
    if os.path.exists(path):
        REUSED["results"] += 1
        return torch.load(path, weights_only=False)
    result = run_method(name, task_path, python, timeout)
    if "error" not in result or "timed out" in result["error"]:
        torch.save(result, path + ".part")
        os.replace(path + ".part", path)
    return result


def newest_result(folder: str, name: str) -> dict | None:
    """The most recently written cached result of method `name` in a task's folder (any methods hash), or None."""
    prefix = f"result-{name}-"
    paths = [os.path.join(folder, f) for f in os.listdir(folder)
             if f.startswith(prefix) and f.endswith(".pt") and len(f) == len(prefix) + 12 + 3]
    if not paths:
        return None
    REUSED["results"] += 1
    return torch.load(max(paths, key=os.path.getmtime), weights_only=False)


def method_result(name: str, task_path: str, python: str, args, methods_hash: str) -> dict | None:
    """The result of one method for the table: run (or this methods hash's cached result), or the newest cached one.

    A method named in `--methods` (every method without it) runs, or reuses its result for this
    methods hash; any other keeps the newest result cached for it (None: never run), so that a
    partial run merges into the full table.
    """
    if not args.methods or name in args.methods.split(","):
        return cached_method(name, task_path, python, args.timeout, methods_hash)
    return newest_result(os.path.dirname(task_path), name)


# ---------------------------------------------------------------- report and figure

def _cell(v) -> str:
    mean, low, high = v
    return f"{mean:.3f} ± {(high - low) / 2:.3f}"


def task_table(spec: Spec, rows: list) -> list[str]:
    cols = [f"{v}/{r:g}" for v in variants(spec) for r in FRACTIONS]
    head = ("| method | library | time s | first call s | peak MB | " + " | ".join(f"LDS {v} {100 * float(r):g}%" for v, r in
            (c.split("/") for c in cols)) + " | LOO ρ | LOO rs |")
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['method']} | {r['library']} | — | — | — | {r['error']} |" + " |" * (len(cols) + 1))
            continue
        ev = r["eval"]
        out.append(f"| {r['method']} | {r['library']} | {r['seconds']:.3g} | {r['first']:.3g} | {r['peak_mb']:.0f} | "
                   + " | ".join(_cell(ev[c]) for c in cols) + f" | {ev['loo'][0]:.3f} | {ev['loo'][1]:.3f} |")
    return out


def best_vs_peers(spec: Spec, rows: list) -> list[str]:
    ok = [r for r in rows if "eval" in r]
    out = ["| setting | best tinfluence | LDS | best peer | LDS | ratio |", "|---|---|---|---|---|---|"]
    for v in variants(spec):
        for removed in FRACTIONS:
            c = f"{v}/{removed:g}"
            ours = [r for r in ok if r["library"] == "tinfluence"]
            theirs = [r for r in ok if r["library"] != "tinfluence"]
            if not ours or not theirs:
                continue
            a = max(ours, key=lambda r: r["eval"][c][0])
            b = max(theirs, key=lambda r: r["eval"][c][0])
            ratio = a["eval"][c][0] / b["eval"][c][0] if b["eval"][c][0] > 0 else float("nan")
            out.append(f"| {v} {100 * removed:g}% | {a['method']} | {_cell(a['eval'][c])} | {b['library']} {b['method']} | "
                       f"{_cell(b['eval'][c])} | {ratio:.2f} |")
    return out


def figure(spec: Spec, rows: list, path: str, settings: str) -> None:
    """Wall time (log) against LDS, one panel per (variant, fraction), one marker per method and peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if "eval" in r]
    vs = variants(spec)
    fig, axes = plt.subplots(len(vs), len(FRACTIONS), figsize=(5.0 * len(FRACTIONS), 3.9 * len(vs) + 1.8),
                             squeeze=False, sharex=True)
    labels = sorted({r["method"] for r in ok})
    palette = plt.get_cmap("tab10").colors + ("black", "#b8860b", "#000080", "#ff00ff", "#7fff00", "#8b0000", "#00ced1",
                                              "#808000")
    color = {label: palette[i % len(palette)] for i, label in enumerate(labels)}   # one colour per method, any library
    markers = {"tinfluence": "o", "kronfluence": "s", "dattri": "^", "traker": "D", "captum": "v", "bergson": "P"}
    handles = {}
    for i, v in enumerate(vs):
        for j, removed in enumerate(FRACTIONS):
            ax = axes[i][j]
            c = f"{v}/{removed:g}"
            for r in ok:
                mean, low, high = r["eval"][c]
                ours = r["library"] == "tinfluence"
                h = ax.errorbar(max(r["seconds"], 1e-3), mean, yerr=[[mean - low], [high - mean]],
                                fmt=markers.get(r["library"], "X"), color=color[r["method"]], markersize=9 if ours else 8,
                                capsize=3, markeredgecolor="black" if ours else color[r["method"]],
                                markerfacecolor=color[r["method"]] if ours else "white", markeredgewidth=1.5)
                handles.setdefault(f"{r['library']}: {r['method']}", h)
            ax.set_xscale("log")
            ax.axhline(0, color="grey", lw=0.6)
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{v}, {100 * removed:g}% removed", fontsize=11)
            if i == len(vs) - 1:
                ax.set_xlabel("wall time of the whole call, s (log)")
            if j == 0:
                ax.set_ylabel("LDS (Spearman, mean over test points)")
    fig.suptitle(f"{spec.name}: time against LDS — {settings}", fontsize=12)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=4, fontsize=9, frameon=False,
               title="filled, black edge: tinfluence; hollow: peers (marker = library, colour = method)", title_fontsize=9)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * ((len(handles) + 3) // 4) / len(vs), 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def settings_text(spec: Spec) -> str:
    model = {"lr": "logistic regression", "mlp": f"{spec.hidden}-unit tanh MLP", "cnn": "conv 8×3×3, tanh, avg-pool, linear"}[spec.kind]
    train = ("optimum (L-BFGS + Newton)" if spec.kind == "lr" else
             f"SGD {spec.epochs} epochs, lr {spec.lr}, batch {spec.batch}")
    return (f"{spec.n_train} train × {spec.n_test} test, {model}, {spec.dtype}, l2 {spec.l2:g}, {train}; "
            f"{spec.subsets} models per setting")


# ---------------------------------------------------------------- main

def run_task(spec: Spec, args, methods_hash: str) -> list[str]:
    import ladder_methods as LM

    folder = os.path.join(args.cache, f"{spec.name}-{task_key(spec)}")
    start = time.perf_counter()
    task, task_path = build_task(spec, folder)
    records = ground_truth(spec, folder, task_path, workers=args.workers)
    gt_seconds = time.perf_counter() - start
    print(f"{spec.name}: ground truth ready ({len(records)} models, {gt_seconds:.0f} s)", flush=True)
    rows, shown_names = [], []
    for name, method in LM.REGISTRY.items():
        row = {"method": method.label, "library": method.library}
        reason = method.unavailable(task)
        if reason:
            rows.append(dict(row, error=reason))
            shown_names.append(name)
            continue
        python = sys.executable if method.library == "tinfluence" else PEERS_PYTHON
        result = method_result(name, task_path, python, args, methods_hash)
        if result is None:
            continue
        shown_names.append(name)
        if "error" in result:
            rows.append(dict(row, error=result["error"]))
        else:
            rows.append(dict(row, seconds=result["seconds"], first=result["first"], peak_mb=result["peak_mb"],
                             eval=evaluate(spec, records, result["scores"])))
        shown = rows[-1].get("error") or f"{rows[-1]['seconds']:.2f} s, LDS {rows[-1]['eval']}"
        print(f"  {spec.name:10s} {name:18s} {shown}", flush=True)
    png = os.path.join(args.figures, f"ladder-{spec.name}.png")
    figure(spec, rows, png, settings_text(spec))
    if os.path.samefile(args.figures, HERE):          # the docs page (docs/ladder.md) shows the same figures
        shutil.copyfile(png, os.path.join(DOCS, os.path.basename(png)))
    train_s = task.info.get("train_seconds", float("nan"))
    notes = [f"- {LM.REGISTRY[n].label} ({LM.REGISTRY[n].library}): {LM.REGISTRY[n].note}" for n in shown_names
             if LM.REGISTRY[n].note]
    return ([f"## {spec.name}", "", settings_text(spec) + f"; ground truth: {len(records)} retrained models "
             f"(built in {gt_seconds:.0f} s with {args.workers} processes; one base training run takes {train_s:.2g} s); "
             f"LOO over {spec.loo} training ids (same schedule, example weight 0)" +
             ("; TRAK ensembles of independently seeded models trained on all the data (their training is not in the time)"
              if spec.kind != "lr" else ""), "",
             f"![{spec.name}](ladder-{spec.name}.png)", ""] + task_table(spec, rows) +
            ["", "Best tinfluence method against the best peer:", ""] + best_vs_peers(spec, rows) + ["", "Settings:", ""] +
            notes + [""])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child")
    parser.add_argument("--quick", action="store_true", help=f"{', '.join(QUICK_TASKS)} with {QUICK}")
    parser.add_argument("--task", action="append", choices=list(SPECS))
    parser.add_argument("--methods", help="comma-separated registry names (ladder_methods.REGISTRY) to run; every other "
                        "method's row is its newest cached result")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--cache", default=CACHE)
    parser.add_argument("--out", default=os.path.join(HERE, "RESULTS-ladder.md"))
    parser.add_argument("--figures", default=HERE, help="folder of the ladder-<task>.png figures")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child)
        return
    torch.set_num_threads(1)
    import ladder_methods as LM
    import run

    with open(LM.__file__, "rb") as f:
        methods_hash = hashlib.sha256(f.read()).hexdigest()[:12]
    names = args.task or (list(QUICK_TASKS) if args.quick else list(SPECS))
    start = time.perf_counter()
    report = ["# The accuracy ladder", "", f"Machine: {run.machine(1)}", "",
              f"Command: `python benchmarks/{' '.join(['ladder.py', *sys.argv[1:]])}`"
              + ("; the rows of the methods it does not name are their newest cached results (earlier runs)"
                 if args.methods else ""), "",
              ("LDS: Spearman correlation, over retrained models, between the predicted change of a test point's loss "
              "(the sum of the removed examples' scores) and its retrained loss, averaged over test points, ± the half "
              "width of ti.lds's 95 % interval over test points. LOO ρ / rs: Pearson / Spearman over all (test point, "
              "removed id) pairs of the scores and the actual leave-one-out change of the loss. Time: the whole call in "
              "a fresh process (wrapping, fitting, scoring every test point), one thread, the faster of two calls when "
              f"the first took under {REPEAT_BELOW:g} s (the first call also pays one-time warm-up: lazy imports, "
              "torch.func tracing); peak MB: the rise of peak RSS over both calls."), ""]
    for name in names:
        spec = SPECS[name]
        if args.quick:
            spec = replace(spec, **QUICK)
        if spec.data == "fmnist" and T.fmnist_files() is None:
            message = f"skipped: Fashion-MNIST not found; install it with `{T.FMNIST_INSTALL}`"
            print(f"{name} {message}")
            report += [f"## {name}", "", message, ""]
            continue
        report += run_task(spec, args, methods_hash)
    report += [f"Whole run: {time.perf_counter() - start:.0f} s; reused from the cache: {REUSED['models']} retrained "
               f"models and {REUSED['results']} method results.", ""]
    text = "\n".join(report) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
