"""The demo: Koh & Liang's Figure 2 on the digits data that ships with scikit-learn.

A multinomial logistic regression (L2 1e-2, float64, standardized pixels, 1000 training
points, the remaining 797 for test) is trained to a tight optimum θ̂. Every chosen method
scores all training points for the chosen test points; the training points with the
largest |score| under any method (the top k of each method, united per test point) are
removed one at a time and the model is retrained, warm-started from θ̂. Predicted and
actual changes of the test loss are then compared per method.

TracIn needs checkpoints of a training run. The demo records its own: a short,
deterministic full-batch gradient descent from zero (`GD_STEPS` steps of size `GD_LR`),
one checkpoint per step. TracIn and EmpiricalIF are not on the scale of a leave-one-out
change; they are compared by correlation, which is scale-invariant.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import plot
from .core import checks
from .core import data as D
from .core import tree as tr
from .core.model import functionalize
from .core.objective import objective
from .core.transforms import hessian, hvp
from .distributed import shard
from .methods.empirical_if import empirical_if
from .methods.influence import influence
from .methods.tracin import tracin
from .pipeline import TOP_K_HINT, Folder, FolderError, metrics, retrain_sets, retrain_stage, table_text
from .solvers import cg, direct, lissa, minimize
from .validate import newton_trainer

__all__ = ["METHODS", "N_TRAIN", "L2", "GD_STEPS", "GD_LR", "Problem", "DemoResult", "FolderError", "load_digits_split",
           "digits_problem", "gd_checkpoints", "settings", "check_out", "claim_out", "run"]

N_TRAIN = 1000
L2 = 1e-2
GD_STEPS = 20
GD_LR = 2.0
IMAGE_SHAPE = (8, 8)


def load_digits_split(n_train: int = N_TRAIN):
    """Returns `(train, test, images)`: standardized float64 digits, and the raw 8×8 images.

    Pixels are standardized with the training mean and standard deviation (+1e-6, so constant
    pixels stay 0).

    Args:
      n_train: the first n_train of scikit-learn's 1797 digits train; the rest are the test set.

    Returns:
      `train = (x [n_train, 64] float64, y [n_train] int64)`, `test` the same for the rest
      (797 points for n_train = 1000), `images = (train images, test images)`, `[n, 8, 8]`.

    Examples:
      >>> train, test, images = ti.demo.load_digits_split()
      >>> train[0].shape, test[0].shape, images[0].shape
      (torch.Size([1000, 64]), torch.Size([797, 64]), torch.Size([1000, 8, 8]))
      >>> torch.allclose(train[0].mean(0), torch.zeros(64, dtype=torch.float64), atol=1e-9)
      True
    """
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X, dtype=torch.float64), torch.tensor(y)
    mean, std = X[:n_train].mean(0), X[:n_train].std(0) + 1e-6
    Z = (X - mean) / std
    raw = X.reshape(-1, *IMAGE_SHAPE)
    return (Z[:n_train], y[:n_train]), (Z[n_train:], y[n_train:]), (raw[:n_train], raw[n_train:])


@dataclass(frozen=True)
class Problem:
    """The trained digits model: data, the pure model and θ̂ (built by `digits_problem`).

    Attributes:
      train: `(x [n_train, 64], y [n_train])`.
      test: `(x [n_test, 64], y [n_test])`.
      images: `(train images, test images)`, `[n, 8, 8]`.
      apply: `(params, x) -> logits [B, 10]`.
      params: θ̂, `{"weight": [10, 64], "bias": [10]}` float64.
      l2: the L2 coefficient of the objective.
      group: a `torch.distributed` process group over which scoring is sharded, or None.

    Examples:
      >>> problem = ti.demo.digits_problem(n_train=100)
      >>> problem.loss(problem.params, problem.test).shape
      torch.Size([1697])
    """

    train: tuple
    test: tuple
    images: tuple
    apply: Callable
    params: dict
    l2: float
    group: dist.ProcessGroup | None = None   # a torch.distributed process group: scoring is sharded over it

    @property
    def train_part(self) -> tuple:
        """This process's contiguous shard of `train` in rank order (all of it without a group)."""
        if self.group is None:
            return self.train
        return shard(self.train, dist.get_rank(self.group), dist.get_world_size(self.group))

    def loss(self, params, batch) -> torch.Tensor:
        """Cross entropy per example, `[B]`."""
        x, y = batch
        return F.cross_entropy(self.apply(params, x), y, reduction="none")

    def objective(self, *, sharded: bool = False):
        """R(θ) = mean training loss + (l2/2)‖θ‖²; `sharded`: over this process's shard, reduced over the group."""
        if sharded:
            return objective(self.loss, self.train_part, l2=self.l2, group=self.group)
        return objective(self.loss, self.train, l2=self.l2)


def digits_problem(n_train: int = N_TRAIN, l2: float = L2) -> Problem:
    """Returns the digits logistic regression trained from zero to gradient max-norm 1e-12.

    Args:
      n_train: training points (the rest of the 1797 digits are the test set).
      l2: the L2 coefficient.

    Returns:
      A `Problem` holding θ̂ (L-BFGS, then Newton steps).

    Raises:
      ConvergenceError: training does not reach the tolerance.

    Cost: L-BFGS iterations of O(n_train · 650) each, then dense 650 × 650 Newton steps.

    Examples:
      >>> problem = ti.demo.digits_problem(n_train=100)
      >>> g = torch.func.grad(problem.objective())(problem.params)
      >>> bool(ti.ravel(g).abs().max() <= 1e-12)
      True
    """
    train, test, images = load_digits_split(n_train)
    apply, params = functionalize(torch.nn.Linear(64, 10).double())
    untrained = Problem(train, test, images, apply, tr.zeros_like(params), l2)
    params = minimize(untrained.objective(), untrained.params, gtol=1e-12, newton_steps=5)
    return Problem(train, test, images, apply, params, l2)


def gd_checkpoints(R: Callable, params, *, steps: int = GD_STEPS, lr: float = GD_LR) -> list:
    """Returns `[(θ_t, lr), ...]`: full-batch gradient descent on the objective `R` from θ = 0.

    Deterministic; θ_t is the point at which step t's gradient is taken (θ_0 = 0), the
    checkpoints `ti.tracin` takes.

    Args:
      R: `params -> 0-d tensor`, e.g. `ti.objective(loss, train, l2=...)`.
      params: the structure of θ (only shapes, dtypes and devices are read).
      steps: number of checkpoints.
      lr: step size.

    Returns:
      `steps` pairs `(θ_t, lr)`.

    Cost: `steps` full gradients of `R`.

    Examples:
      >>> R = ti.objective(loss, train, l2=1e-2)
      >>> checkpoints = ti.demo.gd_checkpoints(R, params, steps=3, lr=0.5)
      >>> (theta0, lr0), (theta1, lr1) = checkpoints[:2]
      >>> len(checkpoints), lr0, bool((theta0["weight"] == 0).all())
      (3, 0.5, True)
      >>> torch.allclose(theta1["weight"], -0.5 * torch.func.grad(R)(theta0)["weight"])
      True
    """
    grad_R = torch.func.grad(R)
    theta, checkpoints = tr.zeros_like(params), []
    for _ in range(steps):
        checkpoints.append((theta, lr))
        theta = tr.add_scaled(theta, -lr, grad_R(theta))
    return checkpoints


class Method(NamedTuple):
    """A row of the demo's table: how to score, and whether scores share the leave-one-out scale."""

    label: str
    scale_free: bool
    score: Callable   # (problem, test, generator) -> [n_test, n_train]


def _influence(problem, test, ihvp):
    return influence(problem.loss, problem.params, problem.train_part, test, ihvp=ihvp, group=problem.group)


def _direct(problem, test, generator):
    return _influence(problem, test, direct(hessian(problem.objective(sharded=True), problem.params)))


def _cg(problem, test, generator):
    return _influence(problem, test, cg(hvp(problem.objective(sharded=True), problem.params), tol=1e-8, maxiter=300))


def _lissa(problem, test, generator):
    return _influence(problem, test, lissa(problem.loss, problem.params, problem.train_part, l2=problem.l2,
                                           scale="auto", depth=1000, repeats=1, batch_size=50,
                                           generator=generator, group=problem.group))


def _tracin(problem, test, generator):
    return tracin(problem.loss, gd_checkpoints(problem.objective(), problem.params), problem.train_part, test, group=problem.group)


def _empirical(problem, test, generator):
    return empirical_if(problem.loss, problem.params, problem.train_part, test, radius=1e-3, group=problem.group)


METHODS = {
    "direct": Method("influence, dense Hessian (Cholesky)", False, _direct),
    "cg": Method("influence, conjugate gradients (tol 1e-8)", False, _cg),
    "lissa": Method("influence, LiSSA (depth 1000, batch 50)", False, _lissa),
    "tracin": Method(f"TracIn ({GD_STEPS} GD checkpoints)", True, _tracin),
    "empirical": Method("EmpiricalIF (ascent/descent, r=1e-3)", True, _empirical),
}
FILES = ("figure2.png", *(f"top_examples_{name}.png" for name in METHODS), "scores.npz", "loo.jsonl", "table.json")


class DemoResult(NamedTuple):
    """Everything the demo computed (`run`'s result).

    Attributes:
      test_ids: the scored test ids.
      scores: method -> `[n_test, n_train]`, positive = helpful.
      retrained: training ids removed and retrained, sorted.
      actual: `[n_test, len(retrained)]`, the actual change of the test loss.
      table: one dict per method (method, pearson, spearman, sign, seconds), metrics averaged
        over test points.

    Examples:
      >>> ti.demo.DemoResult._fields
      ('test_ids', 'scores', 'retrained', 'actual', 'table')
    """

    test_ids: list
    scores: dict
    retrained: list
    actual: torch.Tensor
    table: list


def settings(methods, test_ids, top_k: int, seed: int) -> dict:
    """The settings that decide a demo run's results: its identity in `run.json` and `loo.jsonl`.

    Args:
      methods: names from `METHODS`.
      test_ids: ids into the test points.
      top_k: training points per method and test point to retrain without.
      seed: seed of the stochastic methods.

    Returns:
      A JSON-serializable dict.

    Examples:
      >>> ti.demo.settings(["cg"], (0, 1), 5, 0)["test_ids"]
      [0, 1]
    """
    return {"demo": "digits logistic regression", "methods": list(methods), "test_ids": list(test_ids),
            "top_k": int(top_k), "seed": int(seed)}


def _flags(settings: dict) -> str:
    return (f"--method {' '.join(settings['methods'])} --test-ids {' '.join(map(str, settings['test_ids']))} "
            f"--top-k {settings['top_k']} --seed {settings['seed']}")


def _folder(out: str, settings: dict) -> Folder:
    return Folder(out, settings, FILES, "the demo's", _flags)


def check_out(out: str, settings: dict, fresh: bool) -> str:
    """Says what a run with `settings` will do with the folder `out`; reads only.

    Args:
      out: the output folder.
      settings: from `settings(...)`.
      fresh: the run will start afresh (`--fresh`).

    Returns:
      "new" (no results of the demo there), "resume" (a run with the same settings: its
      retrained models are reused) or "fresh" (`fresh` given: the demo's own files go).

    Raises:
      FolderError: `out` holds the demo's files of a run with other settings, or without
        `run.json` (an older version's), and `fresh` is False. Nothing is changed.

    Examples:
      >>> import tempfile
      >>> out, settings = tempfile.mkdtemp(), ti.demo.settings(["cg"], [0], 5, 0)
      >>> ti.demo.check_out(out, settings, fresh=False)
      'new'
      >>> ti.demo.claim_out(out, settings, fresh=False)
      >>> ti.demo.check_out(out, settings, fresh=False), ti.demo.check_out(out, settings, fresh=True)
      ('resume', 'fresh')
    """
    return _folder(out, settings).check(fresh)


def claim_out(out: str, settings: dict, fresh: bool) -> None:
    """Makes `out` this run's; call after `check_out`, on one process.

    With `fresh` deletes the demo's own files there; removes half-written outputs of an
    interrupted run; writes `run.json` (used in `check_out`'s example).

    Args:
      out: the output folder (created if missing).
      settings: from `settings(...)`.
      fresh: delete the demo's own files first.
    """
    _folder(out, settings).claim(fresh)


def run(methods, test_ids, top_k: int, out: str, *, seed: int = 0, progress: bool = True,
        echo: Callable = print, group=None) -> DemoResult | None:
    """Runs the demo and writes its files into `out` (which must exist and be writable).

    Files: `figure2.png` (predicted vs actual change in test loss, one panel per method and test point),
    `top_examples_<method>.png` (most helpful and harmful training images of every test point, per method),
    `scores.npz` (scores per method, test and training ids, retrained ids, actual changes),
    `loo.jsonl` (one record per retrained model, id -1 the base run; resumed if present, refused
    if it belongs to another run). Each of the others is written in a staging folder inside
    `out` and moved into place whole, so an interrupted run never leaves a half-written file.

    Args:
      methods: names from `METHODS`, in table order.
      test_ids: ids into the 797 test points.
      top_k: training points per method and test point to retrain without.
      out: output folder.
      seed: seed of the generator for the stochastic methods (LiSSA).
      progress: show tqdm bars (retraining).
      echo: where the report lines go.
      group: a `torch.distributed` process group (e.g. under `torchrun`): every process trains
        the same θ̂, the scoring is sharded over the group's processes (each scores its
        contiguous shard of the training set; curvature products all-reduce) and gives the
        single-process scores; rank 0 then retrains, prints and writes, the others return None.

    Returns:
      A `DemoResult` (None on ranks other than 0).

    Raises:
      ArgumentError: `top_k` not an int in [2, 1000] (checked before any work).
      FolderError: `out/loo.jsonl` belongs to another run or is damaged.

    Cost: training θ̂ on the 1000 digits, each method's scores of the test points, and one
    Newton retraining per retrained id (at most len(methods) · top_k per test point).

    Examples:
      >>> import os, tempfile
      >>> out = tempfile.mkdtemp()
      >>> result = ti.demo.run(["direct"], [0], 2, out, progress=False, echo=lambda line: None)
      >>> result.scores["direct"].shape, result.actual.shape
      (torch.Size([1, 1000]), torch.Size([1, 2]))
      >>> sorted(os.listdir(out))
      ['figure2.png', 'loo.jsonl', 'scores.npz', 'table.json', 'top_examples_direct.png']
    """
    checks.integer("ti.demo.run", "top_k", top_k, minimum=2, maximum=N_TRAIN, hint=TOP_K_HINT)
    start = time.perf_counter()
    problem = replace(digits_problem(), group=group)
    echo(f"digits: {D.num_examples(problem.train)} training / {D.num_examples(problem.test)} test points; "
         f"logistic regression, l2={problem.l2:g}, float64, trained in {time.perf_counter() - start:.1f} s")
    test = D.take(problem.test, torch.tensor(test_ids))
    generator = torch.Generator().manual_seed(seed)
    scores, seconds = {}, {}
    for name in methods:
        tic = time.perf_counter()
        scores[name] = METHODS[name].score(problem, test, generator)
        seconds[name] = time.perf_counter() - tic
    if group is not None and dist.get_rank(group) != 0:
        return None
    sets = retrain_sets(scores, top_k)
    retrained = sorted(set().union(*sets))
    meta = settings(methods, test_ids, top_k, seed)
    train_fn = newton_trainer(problem.loss, problem.params, problem.train, l2=problem.l2, gtol=1e-10)
    actual = retrain_stage(train_fn, problem.params, problem.train, test, retrained, measure=problem.loss,
                           path=os.path.join(out, "loo.jsonl"), meta=meta, progress=progress, echo=echo,
                           describe=f"(each of the top {top_k} training points by |score| of each method, united per "
                                    "test point), warm-started from θ̂ (Newton iterations with the full-data Hessian, "
                                    "to gradient max-norm 1e-10)",
                           hint=f"Or pass --fresh to start {out} afresh.")                # [n_test, len(retrained)]
    columns = {i: j for j, i in enumerate(retrained)}
    table = [metrics(name, scores[name], actual, columns, sets, top_k) | {"seconds": seconds[name]} for name in methods]
    echo("")
    echo(f"test ids {list(test_ids)}: predicted vs actual change in test loss when a training point is removed")
    echo("(pearson/spearman over each test point's retrained set, then averaged over test points; "
         f"sign@{top_k}: sign agreement on each method's own top {top_k})")
    echo(table_text(table, top_k))
    echo("")
    for name in methods:
        echo(f"  {name:<10} {METHODS[name].label}")
    if "tracin" in methods:
        echo(f"TracIn checkpoints: recorded by the demo from {GD_STEPS} steps of deterministic full-batch gradient "
             f"descent from zero, step size {GD_LR:g}.")
    if any(METHODS[name].scale_free for name in methods):
        echo("TracIn and EmpiricalIF have their own scale: compare them by correlation (Pearson is scale-invariant), "
             "not by magnitude.")
    result = DemoResult(list(test_ids), scores, retrained, actual, table)
    with _folder(out, meta).staged() as staging:      # written whole, then moved into place file by file
        _write(result, problem, sets, top_k, staging)
    written = ", ".join(name for name in FILES if os.path.exists(os.path.join(out, name)))
    echo(f"wrote {written} to {out}  (total {time.perf_counter() - start:.1f} s)")
    return result


def _write(result: DemoResult, problem: Problem, sets: list, top_k: int, out: str) -> None:
    """The figure, the example images, the scores and the table, into `out`."""
    columns = {i: j for j, i in enumerate(result.retrained)}
    index = [torch.tensor([columns[i] for i in ids]) for ids in sets]
    actual = [result.actual[t, cols] for t, cols in enumerate(index)]
    predicted = {name: [s[t, ids] for t, ids in enumerate(sets)] for name, s in result.scores.items()}
    scale_free = [name for name in result.scores if METHODS[name].scale_free]
    n_train = D.num_examples(problem.train)
    plot.loo_scatter(actual, predicted, labels=[f"test {i}" for i in result.test_ids], scale_free=scale_free,
                     title=f"Digits logistic regression ({n_train} train, l2 {problem.l2:g}): predicted against actual "
                           f"change in test loss, top {top_k} removals per test point",
                     path=os.path.join(out, "figure2.png"))
    ids = list(result.test_ids)
    for name, scores in result.scores.items():
        plot.top_examples(problem.images[0], scores, problem.images[1][ids], k=6, labels=problem.train[1],
                          test_label=problem.test[1][ids].tolist(), names=[f"test {i}" for i in ids],
                          title=f"{name} ({METHODS[name].label}): most helpful and harmful training digits",
                          path=os.path.join(out, f"top_examples_{name}.png"))
    np.savez(os.path.join(out, "scores.npz"), test_ids=np.array(result.test_ids),
             train_ids=np.arange(D.num_examples(problem.train)), retrained_ids=np.array(result.retrained),
             actual=result.actual.numpy(), methods=np.array(list(result.scores)),
             **{f"scores_{name}": s.numpy() for name, s in result.scores.items()})
    with open(os.path.join(out, "table.json"), "w") as f:
        json.dump({"test_ids": result.test_ids, "top_k": top_k, "rows": result.table}, f, indent=1)
