"""Ground truth by retraining: the actual change of a test measure when one training point is removed.

Each removed point is a separate model, so the loop over removed indices is inherent; every
retrained model is measured on all test points at once. Results go to a JSON-lines file as
they are produced, one object per retrained model, so a run killed at any moment resumes
where it stopped:

    {"id": -1, "values": [m_1, ..., m_n_test], "meta": ...}   the base run: retrained on all of `train`
    {"id": 17, "values": [m_1, ..., m_n_test]}    retrained without training point 17

`values` holds `measure(θ, test)` for every test point, written with full float precision;
`meta` is the caller's description of the run (e.g. which test points), checked on resume.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import optree
import torch
from tqdm.auto import tqdm

from ..core import data as D
from ..core import tree as tr
from ..core.errors import ConvergenceError, check_params
from ..core.objective import objective, per_example
from ..solvers._minimize import gradient, max_norm, minimize
from ..solvers import direct
from ..core.transforms import hessian

__all__ = ["leave_one_out", "lbfgs_trainer", "newton_trainer", "measure_all"]

BASE_ID = -1


def lbfgs_trainer(loss: Callable, *, l2: float = 0.0, gtol: float = 1e-10, maxiter: int = 1000,
                  newton_steps: int = 0, chunk_size: int | None = None) -> Callable:
    """Returns `train_fn(params, data) -> params`, full-batch L-BFGS on the training objective.

    `train_fn` minimizes `ti.objective(loss, data, l2=l2)`, i.e. (1/|data|) Σ loss + (l2/2)‖θ‖²,
    with `ti.minimize`, starting from the `params` it is given: warm-started from θ̂, a
    leave-one-out retraining of a convex model takes a few L-BFGS iterations. L-BFGS stalls
    near a gradient max-norm of 1e-9 in float64; for a tighter `gtol` add `newton_steps`
    (dense Hessian, small models only).

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      l2: weight decay λ₂ >= 0, as in `ti.objective`.
      gtol: gradient max-norm at which training stops.
      maxiter: L-BFGS iterations at most.
      newton_steps: exact Newton steps after L-BFGS, taken only while the gradient is above `gtol`.
      chunk_size: examples per chunk in the objective.

    Returns:
      `train_fn(params, data) -> params`: new, detached parameters; the inputs are not modified.

    Raises:
      ConvergenceError: from `train_fn`, when the gradient stays above `gtol`.
    """
    def train_fn(params, data):
        return minimize(objective(loss, data, l2=l2, chunk_size=chunk_size), params, gtol=gtol,
                        maxiter=maxiter, newton_steps=newton_steps)

    return train_fn


def newton_trainer(loss: Callable, params, train, *, l2: float = 0.0, gtol: float = 1e-10, maxiter: int = 50,
                   chunk_size: int | None = None) -> Callable:
    """Returns `train_fn(params, data) -> params`: Newton iterations with the Hessian of the full training set.

    For leave-one-out retraining of small convex models. The Hessian H₀ of
    R(θ) = (1/n) Σ loss + (l2/2)‖θ‖² on all of `train` at `params` (θ̂) is computed and
    factorized once, here; `train_fn` then iterates θ ← θ − H₀⁻¹ ∇R_data(θ) on the objective
    of the `data` it is given. Removing one point changes the Hessian by O(1/n), so each
    iteration gains a few digits and a removal reaches `gtol` = 1e-10 in a handful of
    gradient evaluations, exactly (no L-BFGS stall near 1e-9). When an iteration fails to
    halve the gradient (a point that bends the curvature a lot), that call switches to exact
    Newton steps with the Hessian of its own data at the current θ (one dense Hessian each).
    For data far from `train` (large subsets removed) `lbfgs_trainer` is cheaper.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: θ̂, the optimum on `train`; also where H₀ is taken.
      train: the full training set.
      l2: weight decay λ₂ >= 0, as in `ti.objective`.
      gtol: gradient max-norm at which an iteration stops.
      maxiter: iterations at most, each one gradient over `data` and one solve.
      chunk_size: examples per chunk in the objective and the Hessian.

    Returns:
      `train_fn(params, data) -> params`: new, detached parameters.

    Raises:
      ConvergenceError: from `train_fn`, when the gradient is still above `gtol` after
        `maxiter` iterations.

    Cost: one dense Hessian (P×P) at construction; per call, iterations × one gradient.
    """
    check_params("ti.newton_trainer", params)
    solve = direct(hessian(objective(loss, train, l2=l2, chunk_size=chunk_size), params))

    def train_fn(start, data):
        R = objective(loss, data, l2=l2, chunk_size=chunk_size)
        theta, step, previous = start, solve, float("inf")
        for _ in range(maxiter):
            g = gradient(R, theta)
            worst = max_norm(g)
            if worst <= gtol:
                return theta
            if worst > 0.5 * previous:      # the shared Hessian no longer contracts: exact Newton from here on
                step = direct(hessian(R, theta))
            theta, previous = tr.sub(theta, step(g)), worst
        raise ConvergenceError(f"ti.newton_trainer: gradient max-norm {worst:.3e} > gtol={gtol:g} after "
                               f"maxiter={maxiter} iterations; raise `maxiter`, or use ti.lbfgs_trainer for data "
                               "far from `train`.", info=theta)

    return train_fn


def measure_all(measure: Callable, params, test, chunk_size: int | None, where: str) -> torch.Tensor:
    """`measure(params, z)` for every test point, chunk by chunk: `[n_test]`, detached."""
    with torch.no_grad():
        return torch.cat([per_example(measure, params, chunk, where=where, name="measure")
                          for chunk in D.chunks(test, chunk_size)])


def _check_indices(indices, n: int, where: str) -> list[int]:
    ids = torch.as_tensor(indices)
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{where}: `indices` must be a 1-d sequence of integer training ids; got {ids.dtype} of shape {list(ids.shape)}.")
    if ids.numel() and not bool(((ids >= 0) & (ids < n)).all()):
        bad = ids[(ids < 0) | (ids >= n)][0].item()
        raise ValueError(f"{where}: `indices` must lie in [0, {n - 1}] (the training set has {n} points); got {bad}.")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{where}: `indices` must be distinct; drop the repeated ids (e.g. with torch.unique).")
    return ids.tolist()


def _read_done(path: str, n_test: int, meta, where: str) -> dict[int, list[float]]:
    """Finished records of a JSON-lines file; a partially written last line is cut off the file."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        raw = f.read()
    complete = raw.rfind(b"\n") + 1            # bytes up to the last newline; the rest is a torn write
    if complete < len(raw):
        with open(path, "r+b") as f:
            f.truncate(complete)
    done: dict[int, list[float]] = {}
    for number, line in enumerate(raw[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key, values = int(record["id"]), record["values"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{where}: `out` file {path!r} line {number} is not a leave-one-out record "
                             f"({type(err).__name__}: {err}); pass a new `out` path.") from None
        if len(values) != n_test:
            raise ValueError(f"{where}: `out` file {path!r} line {number} holds {len(values)} test values, but `test` has "
                             f"{n_test} points: the file belongs to another run. Pass a new `out` path or delete the file.")
        if key == BASE_ID and record.get("meta") != meta:
            raise ValueError(f"{where}: `out` file {path!r} was written for another run: its base record has "
                             f"meta={record.get('meta')!r}, this call meta={meta!r}. Pass a new `out` path or delete the file.")
        done.setdefault(key, values)
    return done


def _without(key: int, n: int, device) -> torch.Tensor:
    """Boolean mask `[n]` selecting every training point but `key`."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[key] = False
    return keep


def _append(f, key: int, values: torch.Tensor, meta) -> list[float]:
    """Writes one record (the base record with `meta`) and forces it to disk; returns the values as written."""
    record = values.cpu().tolist()
    line = {"id": key, "values": record} | ({"meta": meta} if key == BASE_ID else {})
    f.write((json.dumps(line) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())
    return record


def leave_one_out(train_fn: Callable, params, train, test, indices, *, measure: Callable,
                  out: str | os.PathLike | None = None, meta=None, chunk_size: int | None = None,
                  progress: bool = True) -> torch.Tensor:
    """Returns the actual change of `measure` on every test point when each training point is removed.

    `actual[t, j] = measure(θ_{-i}, z_t) − measure(θ_full, z_t)` for `i = indices[j]`, where
    `θ_{-i} = train_fn(params, train without i)` and `θ_full = train_fn(params, train)` (the
    base run, retrained by the same `train_fn`, so both sides share its tolerance). With the
    loss as `measure` this is the quantity every score predicts, in the same sign: positive
    means removing the point raises the test loss (it was helpful).

    Resumable: with `out`, each retrained model's values are appended to that JSON-lines file
    (flushed and fsynced) as soon as it is measured; a rerun skips ids already in the file and
    cuts off a partially written last line, so a run killed at any moment loses at most the
    model in progress and never duplicates one. The file format is in this module's docstring.

    Args:
      train_fn: `(params, data) -> params`, e.g. `ti.lbfgs_trainer(loss, l2=1e-2)`; it is
        warm-started from `params`.
      params: the trained parameters θ̂.
      train: the training set, a pytree of tensors with leading axis n_train.
      test: the test points, leading axis n_test; all are measured at once per model.
      indices: distinct training ids to remove one at a time, a sequence or 1-d tensor.
      measure: `(params, batch) -> Tensor[B]`, the per-example quantity the scores predict;
        pass the training loss to compare with influence scores (it has no default, so that
        the compared quantity is always explicit).
      out: path of the JSON-lines file (created if missing, resumed if present); None keeps
        results in memory only.
      meta: JSON-serializable description of the run (which test points, which model),
        written into the base record; resuming a file whose base record has another `meta`
        is refused, so results of one setup are never mixed into another.
      chunk_size: test points measured at once.
      progress: show a tqdm progress bar over the retrainings.

    Returns:
      `[n_test, len(indices)]`, dtype and device of `params`; column j belongs to `indices[j]`.

    Raises:
      ValueError: `indices` not distinct integers in range; `measure` not per-example;
        `out` written for a different number of test points or another `meta`, or not a
        leave-one-out file.
      ConvergenceError: from `train_fn`.

    Cost: len(indices) + 1 calls of `train_fn` (fewer when resuming), each followed by one
    pass of `measure` over the test points.
    """
    where = "ti.leave_one_out"
    for name, fn in (("train_fn", train_fn), ("measure", measure)):
        if not callable(fn):
            raise TypeError(f"{where}: `{name}` must be a function; got {type(fn).__name__}.")
    check_params(where, params)
    n_train = D.num_examples(train, name="train", where=where)
    n_test = D.num_examples(test, name="test", where=where)
    ids = _check_indices(indices, n_train, where)
    meta = json.loads(json.dumps(meta))          # as it reads back from the file (tuples become lists)
    done = _read_done(os.fspath(out), n_test, meta, where) if out is not None else {}
    todo = [key for key in [BASE_ID, *ids] if key not in done]
    device = optree.tree_leaves(train, namespace="")[0].device
    sink = open(out, "ab") if out is not None else None
    try:
        bar = tqdm(total=len(ids) + 1, initial=len(ids) + 1 - len(todo), desc="leave-one-out", disable=not progress)
        for key in todo:
            retrained = train_fn(params, train if key == BASE_ID else D.take(train, _without(key, n_train, device)))
            check_params(f"{where}: `train_fn` output", retrained)
            values = measure_all(measure, retrained, test, chunk_size, where)
            done[key] = _append(sink, key, values, meta) if sink is not None else values.cpu().tolist()
            bar.update()
        bar.close()
    finally:
        if sink is not None:
            sink.close()
    leaf = optree.tree_leaves(params, namespace="")[0]
    as_tensor = lambda key: torch.tensor(done[key], dtype=leaf.dtype, device=leaf.device)  # noqa: E731
    if not ids:
        return torch.zeros(n_test, 0, dtype=leaf.dtype, device=leaf.device)
    return torch.stack([as_tensor(key) for key in ids], dim=1) - as_tensor(BASE_ID)[:, None]
