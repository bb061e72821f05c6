"""Exact attribution through a replayed training run: metagradients of a test measure in the data weights.

A training run is a pure function of per-example data weights w ∈ ℝⁿ (w = 1 is the ordinary
run). Its schedule (which examples form each mini-batch, in which order) is drawn once from a
generator and then fixed; step t minimizes the batch objective

    L_t(θ; w) = Σ_{i ∈ B_t} w_i ℓ_i(θ) / |B_t|

through a pure optimizer step θ_{t+1}, s_{t+1} = step(θ_t, s_t, ∇_θ L_t(θ_t; w)) (weight decay,
momentum and Adam moments live in the step, `ti.optim`). Removing example z means w_z = 0
while every other example keeps its place in the schedule: the batches it was in shrink in
their sum but keep their divisor |B_t|, exactly what `TrainingRun.replay` computes.

`trajectory_influence` returns score[t, i] = −∂m_t(θ_T)/∂w_i, the first-order prediction of
m_t(θ_T with w_i = 0) − m_t(θ_T): the library's one sign (positive = helpful, removing the
example raises the test loss). It is computed by reverse mode through the run (Hara, Nitanda
& Maehara 2019; Ilyas & Engstrom 2025): a stack of k test cotangents λ ∈ ℝ^{k×P} starts at
∇m_t(θ_T) and is pulled back through each step's vector-Jacobian product, which holds the
Hessian-vector product of the batch loss and the optimizer state's own terms (the vjp of
the whole step, gradient included, so momentum and Adam adjoints are exact); the same product yields the
w-cotangent of the batch's examples, accumulated into the scores.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import optree
import torch
from torch.func import grad, vjp, vmap
from tqdm.auto import tqdm

from ..core import checks
from ..core import data as D
from ..core import tree as tr
from ..core.objective import per_example
from ..core.optim import Optimizer, check_optimizer
from ..core.transforms import grad_fn
from ..core.tree import PyTree

__all__ = ["TrainingRun", "group_influence", "replay_effect", "training_run", "trajectory_influence"]

DEFAULT_MEMORY_BUDGET = 1 << 30   # bytes of stored training states in trajectory_influence
PROGRESS = "progress.pt"
LARGE_STACK = 2 << 20             # bytes of a cotangent stack above which the reverse pass goes in row blocks
ROW_BLOCK = 16                    # rows per block (see _pullback_blocks)


@dataclass(frozen=True, eq=False)
class TrainingRun:
    """A finished mini-batch training run whose schedule and data weights are fixed, replayable exactly.

    Built by `ti.training_run`; the input of `ti.trajectory_influence` and `ti.replay_effect`.

    Attributes:
      loss: `(params, batch) -> Tensor[B]`, the per-example training loss.
      params0: θ_0, the initial parameters (a pytree).
      train: the training set, leading axis n.
      optimizer: the pure optimizer (`init`, `step`).
      batches: T LongTensors; `batches[t]` holds the training ids of step t's mini-batch
        (T = epochs · ⌈n / batch_size⌉).
      weights: `[n]` the data weights the run was trained with.

    Examples:
      >>> run = ti.training_run(loss, params, train, ti.optim.sgd(lr=0.1), epochs=2, batch_size=25,
      ...                       generator=torch.Generator().manual_seed(0))
      >>> run.steps                                   # 2 epochs of ⌈60 / 25⌉ batches
      6
      >>> torch.equal(ti.ravel(run.params_at([6])[0]), ti.ravel(run.final_params()))
      True
    """

    loss: Callable
    params0: Any
    train: Any
    optimizer: Optimizer
    batches: tuple
    weights: torch.Tensor
    final: tuple = field(repr=False)        # (θ_T, s_T)

    @property
    def steps(self) -> int:
        """T, the number of optimizer steps."""
        return len(self.batches)

    def final_params(self) -> PyTree:
        """θ_T, the parameters after the last step (a pytree like `params0`)."""
        return self.final[0]

    def final_state(self) -> PyTree:
        """s_T, the optimizer state after the last step."""
        return self.final[1]

    def params_at(self, steps: Sequence[int]) -> list:
        """θ_t for each t in `steps`, by one replay of the run.

        E.g. `[(θ, lr) for θ in run.params_at(range(0, run.steps, steps_per_epoch))]` are the
        checkpoints of `ti.tracin`.

        Args:
          steps: a non-empty sequence of ints in [0, T] (θ_0 = `params0`).

        Returns:
          A list of parameter pytrees, one per entry of `steps`.

        Raises:
          ArgumentError: `steps` empty, not ints, or outside [0, T].

        Cost: max(steps) optimizer steps; memory len(steps) parameter sets.
        """
        items = list(steps) if hasattr(steps, "__iter__") and not isinstance(steps, (str, bytes)) else None
        if not items or not all(checks.is_int(t) and 0 <= int(t) <= self.steps for t in items):
            raise checks.ArgumentError(f"ti.TrainingRun.params_at: `steps` must be a non-empty sequence of ints in "
                                       f"[0, {self.steps}]; got {checks.describe(steps)}.")
        wanted = [int(t) for t in items]
        parts, kept = (self.loss, self.train, self.optimizer, self.batches), {}
        theta, state = self.params0, self.optimizer.init(self.params0)
        for t in range(max(wanted) + 1):
            kept[t] = theta
            if t < max(wanted):
                theta, state = _advance(parts, theta, state, t, self.weights)
        return [kept[t] for t in wanted]

    def replay(self, weights: torch.Tensor) -> TrainingRun:
        """The same run (same initial parameters, schedule and optimizer) with other data weights.

        Exact, not a prediction: `weights[S] = 0` removes the examples S while every other
        example keeps its place in the schedule (the batch divisor |B_t| is unchanged).

        Args:
          weights: `[n_train]` finite floating tensor.

        Returns:
          A new `TrainingRun` trained with `weights`.

        Raises:
          TypeError: `weights` not a floating tensor.
          ValueError: `weights` not `[n_train]` or not finite.

        Cost: one training run (T batch gradients).
        """
        w = _check_weights("ti.TrainingRun.replay", weights, self.weights.shape[0], self.weights)
        return _trained(self.loss, self.params0, self.train, self.optimizer, self.batches, w)


def _check_weights(where: str, weights, n: int, like: torch.Tensor) -> torch.Tensor:
    """`weights` as a finite floating tensor `[n]` with the dtype and device of `like`, else ValueError/TypeError."""
    if not isinstance(weights, torch.Tensor) or not weights.is_floating_point():
        got = weights.dtype if isinstance(weights, torch.Tensor) else type(weights).__name__
        raise TypeError(f"{where}: `weights` must be a floating tensor of shape [{n}]; got {got}.")
    if tuple(weights.shape) != (n,):
        raise ValueError(f"{where}: `weights` must have shape [{n}] (one weight per training example); "
                         f"got {list(weights.shape)}.")
    if not bool(torch.isfinite(weights).all()):
        raise ValueError(f"{where}: `weights` has non-finite values (nan or inf).")
    return weights.detach().to(dtype=like.dtype, device=like.device)


def _batch_objective(loss: Callable) -> Callable:
    """`(θ, batch, w) -> Σ_i w_i ℓ_i(θ) / |B|`, 0-d."""
    def objective(params, batch, w):
        return (w * per_example(loss, params, batch, where="ti.training_run")).sum() / w.shape[0]

    return objective


def _advance(run_parts: tuple, theta, state, t: int, weights: torch.Tensor) -> tuple:
    """One optimizer step t of the run from (θ_t, s_t): returns (θ_{t+1}, s_{t+1})."""
    loss, train, optimizer, batches = run_parts
    ids = batches[t]
    g = grad(_batch_objective(loss))(theta, D.take(train, ids), weights[ids])
    return optimizer.step(theta, state, g)


def _trained(loss, params0, train, optimizer, batches: tuple, weights: torch.Tensor) -> TrainingRun:
    parts = (loss, train, optimizer, batches)
    theta, state = params0, optimizer.init(params0)
    for t in range(len(batches)):
        theta, state = _advance(parts, theta, state, t, weights)
    return TrainingRun(loss, params0, train, optimizer, batches, weights, (theta, state))


def _check_count(where: str, name: str, value) -> int:
    return checks.integer(where, name, value, minimum=1)


def training_run(loss: Callable, params0: PyTree, train: PyTree, step: Optimizer, *, epochs: int, batch_size: int,
                 generator: torch.Generator, weights: torch.Tensor | None = None) -> TrainingRun:
    """Trains by mini-batch steps on a schedule fixed by `generator`, with per-example data weights.

    The schedule: for each epoch, `torch.randperm(n, generator=g)` split into consecutive
    batches of `batch_size` (the last one shorter when n is not a multiple), drawn from a
    copy of `generator` (the caller's generator is not advanced) and stored in the run.
    Step t takes `step.step(θ, s, ∇_θ Σ_{i∈B_t} w_i ℓ_i(θ)/|B_t|)`. With w = 1 this is
    the plain `torch.optim.SGD/Adam/AdamW` loop with the matching `ti.optim` step, bit for
    bit (docs/design.md, "Trajectory influence").

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example (reduction="none").
      params0: initial parameters, a pytree of floating tensors (not modified).
      train: training set, a pytree of tensors with leading axis n.
      step: a pure optimizer (`ti.optim.sgd(...)`, `adam`, `adamw`, or any object with
        `init(params) -> state` and `step(params, state, grads) -> (params, state)`).
      epochs: passes over the data, >= 1.
      batch_size: examples per step, >= 1.
      generator: the `torch.Generator` that fixes the schedule.
      weights: `[n]` data weights (default all ones, the ordinary run).

    Returns:
      A `TrainingRun`: `.final_params()` (θ_T, dtype and device of `params0`),
      `.replay(weights)`, and the input of `ti.trajectory_influence`.

    Raises:
      ArgumentError: `loss` not a function, `params0` not a pytree of finite floating
        tensors, `epochs` or `batch_size` not an int >= 1, or `step` without `init`/`step`.
      TypeError: `generator` not a torch.Generator, or `weights` not a floating tensor.
      ValueError: `train` empty or its leaves of differing lengths, or `weights` not a
        finite `[n]` tensor.

    Cost: T = epochs · ⌈n/batch_size⌉ batch gradients, O(T · batch_size) per-example loss
    gradients; memory θ_T and s_T only (no trajectory is kept).

    Examples:
      One full-batch SGD step is θ_1 = θ_0 − lr ∇(mean loss)(θ_0):

      >>> run = ti.training_run(loss, params, train, ti.optim.sgd(lr=0.1), epochs=1, batch_size=60,
      ...                       generator=torch.Generator().manual_seed(0))
      >>> g = torch.func.grad(lambda p: loss(p, train).mean())(params)
      >>> torch.allclose(run.final_params()["weight"], params["weight"] - 0.1 * g["weight"])
      True
    """
    where = "ti.training_run"
    checks.function(where, "loss", loss, "(params, batch) -> Tensor[B]")
    ref = checks.params(where, params0, name="params0")
    check_optimizer(where, step)
    n = D._count_examples(train, name="train", call=where)
    checks.floating_like(where, "train", train, ref)
    epochs = _check_count(where, "epochs", epochs)
    batch_size = _check_count(where, "batch_size", batch_size)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"{where}: `generator` must be a torch.Generator that fixes the schedule, "
                        f"e.g. torch.Generator().manual_seed(0); got {type(generator).__name__}.")
    like = optree.tree_leaves(params0, namespace="")[0]
    w = torch.ones(n, dtype=like.dtype, device=like.device) if weights is None else _check_weights(where, weights, n, like)
    local = tr.fork_generator(generator)
    device = optree.tree_leaves(train, namespace="")[0].device
    batches = tuple(ids.to(device) for _ in range(epochs)
                    for ids in torch.randperm(n, generator=local, device=generator.device).split(batch_size))
    return _trained(loss, params0, train, step, batches, w)


# ---------------------------------------------------------------- the reverse pass


def _split_state(state) -> tuple[list, Callable]:
    """(the floating tensor leaves of `state`, `floats -> state` putting them back beside the other leaves)."""
    leaves, spec = optree.tree_flatten(state, namespace="", none_is_leaf=False)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor) and leaf.is_floating_point()]

    def rebuild(floats):
        full = list(leaves)
        for i, leaf in zip(where, floats):
            full[i] = leaf
        return optree.tree_unflatten(spec, full)

    return [leaves[i] for i in where], rebuild


def _pullback(parts: tuple, theta, state, t: int, weights: torch.Tensor, lam, mu: list) -> tuple:
    """Pulls the cotangent stacks (λ for θ_{t+1}, μ for s_{t+1}'s floating leaves) back through step t.

    Returns (λ for θ_t, μ for s_t, the w-cotangents `[k, |B_t|]` of the batch's examples), from
    one vector-Jacobian product of the whole step (θ_t, s_t, w_{B_t}) ↦ (θ_{t+1}, s_{t+1}), the
    gradient of the batch loss included, so the Hessian-vector product and the optimizer's
    state terms are exact. Two ways to batch it over the k rows, chosen by the size of the
    cotangent stack (k × the bytes of θ and s, against `LARGE_STACK`, about a cache's worth):
    a small stack goes in one batched autograd backward (`_pullback_graph`), a large one in
    blocks of `ROW_BLOCK` rows through `vmap` over a `torch.func.vjp` (`_pullback_blocks`).
    Both are exact; they agree to round-off.
    """
    large = tr.leading_size(lam) * _state_bytes(theta, state) > LARGE_STACK
    return (_pullback_blocks if large else _pullback_graph)(parts, theta, state, t, weights, lam, mu)


def _pullback_graph(parts: tuple, theta, state, t: int, weights: torch.Tensor, lam, mu: list) -> tuple:
    """`_pullback` for a small stack: one batched autograd backward through the step's graph.

    The graph is built once with autograd (`create_graph`) and its backward runs batched over
    the k rows (`is_grads_batched`, vmap inside autograd); for small stacks this is the faster
    way (docs/costs.md, "ti.trajectory_influence").
    """
    loss, train, optimizer, batches = parts
    ids = batches[t]
    floats, rebuild = _split_state(state)
    leaves, spec = optree.tree_flatten(theta, namespace="")
    k = tr.leading_size(lam)
    with torch.enable_grad():
        inputs = [x.detach().requires_grad_(True) for x in [*leaves, *floats, weights[ids]]]
        p, f, w = inputs[:len(leaves)], inputs[len(leaves):-1], inputs[-1]
        params = optree.tree_unflatten(spec, p)
        value = _batch_objective(loss)(params, D.take(train, ids), w)
        g = torch.autograd.grad(value, p, create_graph=True, allow_unused=True, materialize_grads=True)
        new_theta, new_state = optimizer.step(params, rebuild(f), optree.tree_unflatten(spec, list(g)))
        outputs = [*spec.flatten_up_to(new_theta), *_split_state(new_state)[0]]
        cotangents = [*spec.flatten_up_to(lam), *mu]
        live = [i for i, out in enumerate(outputs) if out.requires_grad]
        raw: Sequence[torch.Tensor | None] = torch.autograd.grad(
            [outputs[i] for i in live], inputs, [cotangents[i] for i in live], is_grads_batched=True,
            allow_unused=True) if live else [None] * len(inputs)
    pulled = [torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device) if d is None else d.detach()
              for x, d in zip(inputs, raw)]
    return optree.tree_unflatten(spec, pulled[:len(leaves)]), pulled[len(leaves):-1], pulled[-1]


def _pullback_blocks(parts: tuple, theta, state, t: int, weights: torch.Tensor, lam, mu: list) -> tuple:
    """`_pullback` for a large stack: `vmap` over one `torch.func.vjp` of the step, in blocks of rows.

    The step's gradient is `torch.func.grad`; blocks of `ROW_BLOCK` rows keep a block's
    intermediates in cache, and no row loop runs where autograd's legacy batching of
    `_pullback_graph` would loop (tanh_backward, log_softmax and convolution backward);
    measurements in docs/costs.md, "ti.trajectory_influence".
    """
    loss, train, optimizer, batches = parts
    ids = batches[t]
    batch = D.take(train, ids)
    floats, rebuild = _split_state(state)
    objective = _batch_objective(loss)

    def step(params, f, w):
        new_theta, new_state = optimizer.step(params, rebuild(f), grad(objective)(params, batch, w))
        return new_theta, _split_state(new_state)[0]

    pull = vjp(step, theta, floats, weights[ids])[1]
    blocks = [vmap(pull)(tr.map(lambda x, a=a: x[a:a + ROW_BLOCK], (lam, mu)))
              for a in range(0, tr.leading_size(lam), ROW_BLOCK)]
    return tuple(optree.tree_map(lambda *xs: torch.cat(xs), *blocks, namespace=""))


def _state_bytes(theta, state) -> int:
    leaves = optree.tree_leaves(theta, namespace="") + _split_state(state)[0]
    return sum(leaf.numel() * leaf.element_size() for leaf in leaves)


def _segment_length(where: str, steps: int, per_state: int, memory_budget) -> tuple[int, bool]:
    """(segment length L, keep every state?): all T states when they fit, else checkpoints every ⌈√T⌉ steps."""
    memory_budget = checks.integer(where, "memory_budget", memory_budget, minimum=1,
                                   hint="It is a number of bytes, e.g. memory_budget=2**30.")
    length = max(1, math.isqrt(steps - 1) + 1) if steps > 1 else 1      # ⌈√T⌉
    if steps * per_state <= memory_budget:
        return length, True
    needed = (math.ceil(steps / length) + length) * per_state
    if needed > memory_budget:
        raise ValueError(f"{where}: `memory_budget` = {memory_budget} bytes holds fewer than the {needed} bytes of "
                         f"⌈T/L⌉ + L = {math.ceil(steps / length) + length} training states ({per_state} bytes each, "
                         f"T = {steps}, L = {length}) that checkpointing needs; raise memory_budget to at least {needed}.")
    return length, False


class _States:
    """The training states (θ_t, s_t) for t < T, each computed by replaying the run.

    Keeping every state: one forward replay, stored as it goes. Checkpointed: the replay keeps
    (θ_t, s_t) only at t = 0, L, 2L, …, and `segment(a, b)` recomputes the states of one
    segment from its checkpoint; the recomputed states are bit for bit those of the replay.
    """

    def __init__(self, run: TrainingRun, length: int, keep_all: bool):
        self.parts = (run.loss, run.train, run.optimizer, run.batches)
        self.run, self.length, self.keep_all = run, length, keep_all
        self.kept = {}
        theta, state = run.params0, run.optimizer.init(run.params0)
        for t in range(run.steps):
            if keep_all or t % length == 0:
                self.kept[t] = (theta, state)
            theta, state = _advance(self.parts, theta, state, t, run.weights)
        if not _same(theta, run.final_params()):
            raise RuntimeError("ti.trajectory_influence: replaying the run did not reproduce its final parameters, so "
                               "the loss or the step is not deterministic (dropout, a random op, a stateful module); "
                               "make both pure functions of their inputs.")

    def segment(self, a: int, b: int) -> list:
        """[(θ_t, s_t) for t in range(a, b)]."""
        if self.keep_all:
            return [self.kept[t] for t in range(a, b)]
        theta, state = self.kept[a]
        out = []
        for t in range(a, b):
            out.append((theta, state))
            theta, state = _advance(self.parts, theta, state, t, self.run.weights)
        return out


def _same(x, y) -> bool:
    return all(torch.equal(a, b) for a, b in zip(optree.tree_leaves(x, namespace=""), optree.tree_leaves(y, namespace="")))


def _fingerprint(run: TrainingRun, test, chunk_size, length: int) -> str:
    """A digest of everything that fixes the scores: initial parameters, weights, schedule, data, test set, chunking."""
    h = hashlib.sha256(f"{run.steps}|{chunk_size}|{length}".encode())
    parts: tr.PyTree = (run.params0, run.weights, list(run.batches), run.train, test)
    for leaf in optree.tree_leaves(parts, namespace=""):
        h.update(f"{tuple(leaf.shape)}{leaf.dtype}".encode())
        h.update(leaf.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _save(folder: Path, progress: dict) -> None:
    """Writes `progress` to folder/progress.pt atomically (temporary file, fsync, os.replace)."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{PROGRESS}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(progress, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / PROGRESS)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(where: str, folder: Path, fingerprint: str) -> dict | None:
    path = folder / PROGRESS
    if not path.exists():
        return None
    progress = torch.load(path, weights_only=False)
    if progress.get("fingerprint") != fingerprint:
        raise ValueError(f"{where}: `out` folder {str(folder)!r} holds the progress of another computation (other run, "
                         "test set or chunking); pass another folder, or delete it to start over.")
    return progress


def trajectory_influence(run: TrainingRun, test: PyTree, *, measure: Callable | None = None, chunk_size: int | None = None,
                         memory_budget: int = DEFAULT_MEMORY_BUDGET, out: str | os.PathLike | None = None,
                         progress: bool = False) -> torch.Tensor:
    """Returns score[t, i] = −∂m_t(θ_T)/∂w_i: the predicted change m_t(θ_T with w_i = 0) − m_t(θ_T).

    The exact gradient in the data weights of each test measure m_t at the run's final
    parameters, by reverse mode through the run: one vector-Jacobian product of the pure step
    per step, batched over the test cotangents (docs/design.md, "Trajectory influence"). First
    order in w; `ti.replay_effect` gives the exact change. Positive = helpful.

    Args:
      run: a `TrainingRun` from `ti.training_run`.
      test: test set, a pytree of tensors with leading axis n_test.
      measure: `(params, batch) -> Tensor[B]`, one value per test point (default the run's loss).
      chunk_size: test measures k propagated together per sweep (default all n_test).
      memory_budget: bytes the stored training states may take (default 1 GiB): all T states
        when they fit, else a checkpoint every L = ⌈√T⌉ steps (identical scores).
      out: a folder for resumable progress, written atomically after every segment; a later
        call with the same run, test set and chunking resumes with identical results.
      progress: show a tqdm progress bar over the reverse steps.

    Returns:
      `[n_test, n_train]` tensor, dtype and device of the parameters; positive = helpful.

    Raises:
      TypeError: `run` is not a `TrainingRun`.
      ArgumentError: a bad `chunk_size`, `memory_budget` or `measure`; test data of another
        dtype or device than the run.
      ValueError: `memory_budget` below ⌈T/L⌉ + L states, an `out` folder of another computation.
      RuntimeError: the replay did not reproduce θ_T (a random or stateful loss or step).

    Cost: one forward replay (two when checkpointed) plus, per sweep of k = `chunk_size` test
    measures, T step vjps batched over k, about k batch Hessian-vector products each: time
    O(T · k · |B| · P) per sweep, ⌈n_test / k⌉ sweeps. Memory: the stored states (T, or
    about 2√T, of θ and s) plus 2–3 stacks of k cotangents of the size of θ and s.

    Examples:
      After one full-batch SGD step θ_1 = θ_0 − (lr/n) Σ_i w_i ∇ℓ_i(θ_0), the score is
      (lr/n) ∇m_t(θ_1) · ∇ℓ_i(θ_0):

      >>> run = ti.training_run(loss, params, train, ti.optim.sgd(lr=0.5), epochs=1, batch_size=60,
      ...                       generator=torch.Generator().manual_seed(0))
      >>> scores = ti.trajectory_influence(run, test)
      >>> scores.shape
      torch.Size([5, 60])
      >>> g_test = ti.ravel(ti.per_example_grads(loss, run.final_params(), test), batch_ndim=1)
      >>> g_train = ti.ravel(ti.per_example_grads(loss, params, train), batch_ndim=1)
      >>> torch.allclose(scores, 0.5 / 60 * g_test @ g_train.T)
      True
    """
    where = "ti.trajectory_influence"
    if not isinstance(run, TrainingRun):
        raise TypeError(f"{where}: `run` must be a TrainingRun from ti.training_run(...); got {type(run).__name__}.")
    n_test = D._count_examples(test, name="test", call=where)
    checks.chunk_size(where, chunk_size)
    measure = run.loss if measure is None else checks.function(where, "measure", measure, "(params, batch) -> Tensor[B]")
    checks.floating_like(where, "test", test, run.weights)
    theta_T = run.final_params()
    length, keep_all = _segment_length(where, run.steps, _state_bytes(theta_T, run.final_state()), memory_budget)
    folder = None if out is None else Path(out)
    fingerprint: str | None = None
    saved: dict | None = None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        fingerprint = _fingerprint(run, test, chunk_size, length)
        saved = _load(where, folder, fingerprint)
    size = n_test if chunk_size is None else chunk_size
    starts = list(range(0, n_test, size))
    done = [] if saved is None else list(saved["done"])
    resume = None if saved is None or saved["position"] is None else saved
    if len(done) == len(starts):
        return torch.cat(done, dim=0)
    states = _States(run, length, keep_all)
    remaining = run.steps * (len(starts) - len(done)) - (0 if resume is None else run.steps - resume["position"])
    bar = tqdm(total=remaining, desc=where, disable=not progress)
    measure_grads = grad_fn(measure, call=where, name="measure")
    for c in range(len(done), len(starts)):
        if resume is None:
            sweep = _start(measure_grads(theta_T, D.take(test, slice(starts[c], starts[c] + size))), run)
        else:
            sweep, resume = {key: resume[key] for key in ("lam", "mu", "total", "position")}, None

        def save(sweep):
            if folder is not None:
                _save(folder, {"fingerprint": fingerprint, "done": done, **sweep})

        done.append(-_sweep(states, sweep, save, bar))
        save({"position": None})
    bar.close()
    return torch.cat(done, dim=0)


def _start(lam, run: TrainingRun) -> dict:
    """A sweep's starting point: λ = the test gradients at θ_T `[k, ...]`, μ = 0, no scores yet, position T."""
    k = tr.leading_size(lam)
    mu = [torch.zeros((k, *leaf.shape), dtype=leaf.dtype, device=leaf.device) for leaf in _split_state(run.final_state())[0]]
    total = torch.zeros(k, run.weights.shape[0], dtype=run.weights.dtype, device=run.weights.device)
    return {"lam": lam, "mu": mu, "total": total, "position": run.steps}


def _sweep(states: _States, sweep: dict, save: Callable, bar) -> torch.Tensor:
    """Reverse steps `position − 1` down to 0, segment by segment (`save(sweep)` after each but the last);
    returns the accumulated ∂m/∂w `[k, n_train]`.
    """
    run = states.run
    lam, mu, total = sweep["lam"], sweep["mu"], sweep["total"]
    for a in reversed(range(0, sweep["position"], states.length)):
        b = min(a + states.length, run.steps)
        for t, (theta, state) in zip(range(b - 1, a - 1, -1), states.segment(a, b)[::-1]):
            lam, mu, dw = _pullback(states.parts, theta, state, t, run.weights, lam, mu)
            total = total.index_add(1, run.batches[t], dw)
            bar.update(1)
        if a > 0:
            save({"lam": lam, "mu": mu, "total": total, "position": a})
    return total


# ---------------------------------------------------------------- groups


def _group_masks(where: str, groups, n: int, device) -> torch.Tensor:
    """`groups` (a list of id sequences, or a bool mask `[n_groups, n]`) as a float-ready bool mask `[n_groups, n]`."""
    if isinstance(groups, torch.Tensor) and groups.dtype == torch.bool:
        if groups.dim() != 2 or groups.shape[1] != n:
            raise ValueError(f"{where}: a mask `groups` must have shape [n_groups, {n}]; got {list(groups.shape)}.")
        return groups.to(device)
    if isinstance(groups, torch.Tensor) or not isinstance(groups, (list, tuple)) or not groups:
        raise ValueError(f"{where}: `groups` must be a non-empty list of training-id sequences (e.g. [[3, 7], [12]]) "
                         f"or a bool mask [n_groups, {n}]; got {type(groups).__name__}.")
    mask = torch.zeros(len(groups), n, dtype=torch.bool, device=device)
    for g, ids in enumerate(groups):
        ids = torch.as_tensor(ids, device=device).reshape(-1)
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.dtype.is_complex:
            raise ValueError(f"{where}: group {g} must hold integer training ids; got {ids.dtype}.")
        if ids.numel() and not bool(((ids >= 0) & (ids < n)).all()):
            raise ValueError(f"{where}: group {g} has ids outside [0, {n - 1}] (the training set has {n} examples).")
        mask[g, ids] = True
    return mask


def group_influence(scores: torch.Tensor, groups: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
    """First-order effect of removing each group S: −Σ_{z∈S} ∂m/∂w_z = Σ_{z∈S} score[:, z].

    Args:
      scores: `[n_test, n_train]` from `ti.trajectory_influence`.
      groups: a list of training-id sequences, or a bool mask `[n_groups, n_train]`.

    Returns:
      `[n_test, n_groups]`, dtype and device of `scores`: the predicted
      m(θ_T with w_S = 0) − m(θ_T); positive = helpful. Compare with `ti.replay_effect`
      (exact) to see the nonlinearity.

    Raises:
      ValueError: `scores` not 2-D; `groups` empty, not id sequences nor a `[n_groups, n_train]`
        bool mask, or holding non-integer or out-of-range ids.

    Cost: one `[n_test, n_train] × [n_train, n_groups]` product.

    Examples:
      >>> scores = torch.arange(300.).reshape(5, 60)
      >>> effect = ti.group_influence(scores, [[0, 1], [7]])
      >>> torch.equal(effect, torch.stack([scores[:, 0] + scores[:, 1], scores[:, 7]], dim=1))
      True
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError("ti.group_influence: `scores` must be a [n_test, n_train] tensor from ti.trajectory_influence; "
                         f"got {type(scores).__name__}{list(scores.shape) if isinstance(scores, torch.Tensor) else ''}.")
    mask = _group_masks("ti.group_influence", groups, scores.shape[1], scores.device)
    return scores @ mask.to(scores.dtype).T


def replay_effect(run: TrainingRun, test: PyTree, groups: Sequence[Sequence[int] | torch.Tensor], *, measure: Callable | None = None,
                  progress: bool = False) -> torch.Tensor:
    """The exact change m(θ_T with w_S = 0) − m(θ_T) of every test measure for each group S, by replaying the run.

    Each group is one replay of the whole run (`run.replay`), the same schedule with the
    weights of S set to 0; the loop over groups is inherent (one training run each).

    Args:
      run: a `TrainingRun`.
      test: test set, leading axis n_test.
      groups: a list of training-id sequences, or a bool mask `[n_groups, n_train]`
        (`[[i] for i in ids]` for single removals).
      measure: `(params, batch) -> Tensor[B]` (default the run's loss).
      progress: show a tqdm progress bar over the groups.

    Returns:
      `[n_test, n_groups]`, dtype and device of the parameters: the ground truth that
      `trajectory_influence` and `group_influence` predict (positive = removing S raises m).

    Raises:
      TypeError: `run` is not a `TrainingRun`.
      ArgumentError: a bad `measure`, or test data of another dtype or device than the run.
      ValueError: bad test data or `groups` (as `ti.group_influence`).

    Cost: n_groups training runs (T batch gradients each) and n_groups + 1 passes of
    `measure` over the test set.

    Examples:
      After one full-batch SGD step, removing z_0 takes back its share (lr/n) ∇ℓ_0(θ_0):

      >>> run = ti.training_run(loss, params, train, ti.optim.sgd(lr=0.5), epochs=1, batch_size=60,
      ...                       generator=torch.Generator().manual_seed(0))
      >>> effect = ti.replay_effect(run, test, [[0], [1, 2]])
      >>> effect.shape
      torch.Size([5, 2])
      >>> g0 = ti.per_example_grads(loss, params, ti.take(train, [0]))
      >>> theta = {k: run.final_params()[k] + 0.5 / 60 * g0[k].squeeze(0) for k in params}
      >>> torch.allclose(effect[:, 0], loss(theta, test) - loss(run.final_params(), test))
      True
    """
    where = "ti.replay_effect"
    if not isinstance(run, TrainingRun):
        raise TypeError(f"{where}: `run` must be a TrainingRun from ti.training_run(...); got {type(run).__name__}.")
    D._count_examples(test, name="test", call=where)
    checks.floating_like(where, "test", test, run.weights)
    measure = run.loss if measure is None else checks.function(where, "measure", measure, "(params, batch) -> Tensor[B]")
    mask = _group_masks(where, groups, run.weights.shape[0], run.weights.device)

    def measured(params):
        with torch.no_grad():
            return per_example(measure, params, test, where=where, name="measure")

    base = measured(run.final_params())
    columns = [measured(run.replay(run.weights.masked_fill(m, 0.0)).final_params()) - base
               for m in tqdm(mask, desc=where, disable=not progress)]
    return torch.stack(columns, dim=1)
