"""Ground truth by retraining: the actual change of a test measure when one training point is removed.

Each removed point is a separate model, so the loop over removed indices is inherent; every
retrained model is measured on all test points at once. Results go to a JSON-lines file as
they are produced, one object per retrained model, so a run killed at any moment resumes
where it stopped:

    {"id": -1, "run": "3f9c...", "values": [m_1, ..., m_n_test], "meta": ..., "n_train": n, "dtype": "float64"}
    {"id": 17, "run": "3f9c...", "values": [m_1, ..., m_n_test]}    retrained without training point 17

The first record is the base run, retrained on all of `train`. `values` holds
`measure(θ, test)` for every test point, finite, written with full float precision. `run`
is the run's identity, a hash of its settings (`meta`, the caller's description of the run,
the training-set size, the number of test points and the dtype); the base record also
spells the settings out. On resume every record is checked: its identity, its number of
values, their finiteness, no repeated id; a file that fails is refused, never changed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Callable, Sequence

import optree
import torch
from tqdm.auto import tqdm

from ..core import checks
from ..core import data as D
from ..core import tree as tr
from ..core.errors import ConvergenceError
from ..core.objective import objective, per_example
from ..core.transforms import hessian
from ..core.tree import PyTree
from ..solvers import direct
from ..solvers._minimize import gradient, max_norm, minimize

__all__ = ["leave_one_out", "leave_one_out_records", "lbfgs_trainer", "newton_trainer", "measure_all"]

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
      ArgumentError: `loss` not a function; `l2` < 0, `gtol` <= 0, `maxiter` < 1,
        `newton_steps` < 0 or a bad `chunk_size` (checked here, not at the first retraining).
      ConvergenceError: from `train_fn`, when the gradient stays above `gtol`.

    Cost: per call, up to `maxiter` L-BFGS iterations of one gradient over `data` each
    (O(n·P) per pass), plus one dense Hessian (O(P²) memory) per Newton step.

    Examples:
      >>> rest = ti.take(train, torch.arange(1, 60))                    # without training point 0
      >>> theta = ti.lbfgs_trainer(loss, l2=1e-2, newton_steps=3)(params, rest)
      >>> g = torch.func.grad(lambda p: loss(p, rest).mean() + 0.5e-2 * ti.vdot(p, p))(theta)
      >>> bool(ti.ravel(g).abs().max() <= 1e-10)
      True
    """
    _check_training("ti.lbfgs_trainer", loss, l2, gtol, maxiter, chunk_size)
    newton_steps = checks.integer("ti.lbfgs_trainer", "newton_steps", newton_steps, minimum=0)

    def train_fn(params, data):
        return minimize(objective(loss, data, l2=l2, chunk_size=chunk_size), params, gtol=gtol,
                        maxiter=maxiter, newton_steps=newton_steps)

    return train_fn


def newton_trainer(loss: Callable, params: PyTree, train: PyTree, *, l2: float = 0.0, gtol: float = 1e-10, maxiter: int = 50,
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
      ArgumentError: `loss` not a function, `params` not finite floating tensors; `l2` < 0,
        `gtol` <= 0, `maxiter` < 1 or a bad `chunk_size`.
      ConvergenceError: from `train_fn`, when the gradient is still above `gtol` after
        `maxiter` iterations.

    Cost: one dense Hessian (O(n·P²) time, P² memory) and its Cholesky factor (O(P³)) at
    construction; per call, iterations × one gradient over `data` and one O(P²) solve.

    Examples:
      >>> rest = ti.take(train, torch.arange(1, 60))                    # without training point 0
      >>> theta = ti.newton_trainer(loss, params, train, l2=1e-2)(params, rest)
      >>> g = torch.func.grad(lambda p: loss(p, rest).mean() + 0.5e-2 * ti.vdot(p, p))(theta)
      >>> bool(ti.ravel(g).abs().max() <= 1e-10)
      True
    """
    _check_training("ti.newton_trainer", loss, l2, gtol, maxiter, chunk_size)
    checks.params("ti.newton_trainer", params)
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


def _check_training(where: str, loss, l2, gtol, maxiter, chunk_size) -> None:
    """The options a trainer factory shares, checked when it is built (not at the first retraining)."""
    checks.function(where, "loss", loss, "(params, batch) -> Tensor[B]")
    checks.number(where, "l2", l2, minimum=0.0)
    checks.number(where, "gtol", gtol, minimum=0.0, exclusive=True)
    checks.integer(where, "maxiter", maxiter, minimum=1)
    checks.chunk_size(where, chunk_size)


def measure_all(measure: Callable, params, test, chunk_size: int | None, where: str) -> torch.Tensor:
    """`measure(params, z)` for every test point, chunk by chunk: `[n_test]`, detached."""
    with torch.no_grad():
        return torch.cat([per_example(measure, params, chunk, where=where, name="measure")
                          for chunk in D.chunks(test, chunk_size)])


def _check_indices(indices, n: int, where: str) -> list[int]:
    return checks.ids(where, "indices", indices, n, unique=True, empty=True).tolist()


def _settings(where: str, meta, params, train, test) -> dict:
    """The settings a leave-one-out file is written for, with `run`, their hash (the run's identity)."""
    try:
        meta = json.loads(json.dumps(meta, allow_nan=False))   # as it reads back from the file (tuples become lists)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: `meta` must be JSON-serializable with finite numbers (dicts, lists, str, int, "
                        f"float, bool, None); got {type(meta).__name__} ({err}).") from None
    settings = {"meta": meta, "n_train": D._count_examples(train, name="train", call=where),
                "n_test": D._count_examples(test, name="test", call=where),
                "dtype": str(optree.tree_leaves(params, namespace="")[0].dtype).removeprefix("torch.")}
    run = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return settings | {"run": run}


def _refuse(where: str, path: str, number: int, problem: str):
    return ValueError(f"{where}: `out` file {path!r} line {number} {problem}. Pass a new `out` path, or delete "
                      "the file to start over.")


def _parse(line: bytes, where: str, path: str, number: int, n_test: int) -> dict:
    """One record with `n_test` finite values; raises ValueError naming the line otherwise."""
    try:
        record = json.loads(line)
        key, values = record["id"], record["values"]
        if type(key) is not int or not isinstance(values, list):
            raise TypeError(f"id {key!r} and values of type {type(values).__name__}")
    except (ValueError, KeyError, TypeError) as err:
        raise _refuse(where, path, number, f"is not a leave-one-out record ({type(err).__name__}: {err})") from None
    if len(values) != n_test:
        raise _refuse(where, path, number, f"holds {len(values)} test values, but `test` has {n_test} points: "
                                           "the file belongs to another run")
    bad = next((t for t, v in enumerate(values) if type(v) not in (int, float) or not math.isfinite(v)), None)
    if bad is not None:
        raise _refuse(where, path, number, f"holds {values[bad]!r} for test point {bad}, where a finite number "
                                           "was expected (the file was edited or written by another program)")
    return record


def _check_run(record: dict, settings: dict, base_seen: bool, where: str, path: str, number: int) -> None:
    """The record belongs to this run, and the first record is the base run."""
    key = record["id"]
    if key == BASE_ID:
        differ = [k for k in ("meta", "n_train", "dtype") if record.get(k) != settings[k]]
        if differ:
            theirs = ", ".join(f"{k}={record.get(k)!r}" for k in differ)
            ours = ", ".join(f"{k}={settings[k]!r}" for k in differ)
            raise _refuse(where, path, number, f"was written for another run: its base record has {theirs}, this call {ours}")
    elif not base_seen:
        raise _refuse(where, path, number, f"is the record of training point {key}, but a file's first record must be "
                                           "its base run (id -1): the file holds records without their base record, "
                                           "of another run or edited")
    if record.get("run") != settings["run"]:
        raise _refuse(where, path, number, f"belongs to another run (its run identity {record.get('run')!r}, this "
                                           f"call's {settings['run']!r}, a hash of `meta`, the training-set size, "
                                           "the number of test points and the dtype): records of two runs are mixed")


def _read_done(path: str, settings: dict, where: str) -> tuple[dict[int, list[float]], int, int]:
    """`(done, complete, size)`: the checked records by id, the bytes up to the last newline, the file size.

    Reads only; bytes after the last newline are a torn write, which the caller cuts off
    before appending.
    """
    if not os.path.exists(path):
        return {}, 0, 0
    with open(path, "rb") as f:
        raw = f.read()
    complete = raw.rfind(b"\n") + 1
    done: dict[int, list[float]] = {}
    lines: dict[int, int] = {}
    for number, line in enumerate(raw[:complete].splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse(line, where, path, number, settings["n_test"])
        _check_run(record, settings, BASE_ID in done, where, path, number)
        key = record["id"]
        if key in done:
            raise _refuse(where, path, number, f"repeats training point {key} of line {lines[key]}"
                          if key != BASE_ID else f"repeats the base record of line {lines[key]}")
        done[key], lines[key] = record["values"], number
    return done, complete, len(raw)


def leave_one_out_records(out: str | os.PathLike, params, train, test, *, meta=None) -> dict[int, list[float]]:
    """The finished records of a `ti.leave_one_out` file, checked as a resumed call checks them; reads only.

    Args:
      out: the JSON-lines file, as given to `ti.leave_one_out`.
      params: as given to `ti.leave_one_out` (only its dtype is read).
      train: as given to `ti.leave_one_out` (only its size is read).
      test: as given to `ti.leave_one_out` (only its size is read).
      meta: as given to `ti.leave_one_out`.

    Returns:
      `{id: [measure per test point]}` (id -1: the base run); empty when `out` does not exist.

    Raises:
      ValueError: a record of another run, without its base record, repeated, non-finite,
        or not a leave-one-out record; the message names the file and the line.
    """
    where = "ti.leave_one_out_records"
    checks.params(where, params)
    return _read_done(os.fspath(out), _settings(where, meta, params, train, test), where)[0]


def _without(key: int, n: int, device) -> torch.Tensor:
    """Boolean mask `[n]` selecting every training point but `key`."""
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[key] = False
    return keep


def _model(key: int) -> str:
    """Names the retrained model `key` in messages."""
    return "the base run (retrained on all of `train`)" if key == BASE_ID else f"the model retrained without training point {key}"


def _check_finite(values: torch.Tensor, key: int, where: str) -> None:
    """Raises ValueError naming the removal when a retrained model's measure is NaN or infinite."""
    bad = (~torch.isfinite(values)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{where}: {_model(key)} gives a non-finite `measure` on test points {bad[:10]} "
                         f"({values[bad[0]].item()} on test point {bad[0]}); nothing was written for it. Check that "
                         "`train_fn` converges on that data and that `measure` is finite there; the finished "
                         "models stay in `out`, so a rerun resumes after the fix.")


def _append(f, key: int, values: torch.Tensor, settings: dict) -> list[float]:
    """Writes one record (the base record with the settings) and forces it to disk; returns the values as written."""
    record = values.cpu().tolist()
    line = {"id": key, "run": settings["run"], "values": record}
    if key == BASE_ID:
        line |= {k: settings[k] for k in ("meta", "n_train", "dtype")}
    f.write((json.dumps(line, allow_nan=False) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())
    return record


def leave_one_out(train_fn: Callable, params: PyTree, train: PyTree, test: PyTree, indices: Sequence[int] | torch.Tensor, *,
                  measure: Callable,
                  out: str | os.PathLike | None = None, meta: object = None, chunk_size: int | None = None,
                  progress: bool = True) -> torch.Tensor:
    """Returns the actual change of `measure` on every test point when each training point is removed.

    `actual[t, j] = measure(θ_{-i}, z_t) − measure(θ_full, z_t)` for `i = indices[j]`, where
    `θ_{-i} = train_fn(params, train without i)` and `θ_full = train_fn(params, train)` (the
    base run, by the same `train_fn`). With the loss as `measure` this is what every score
    predicts, in the same sign: positive = removing the point raises the test loss.

    Resumable: with `out`, each model's values are appended (fsynced) to that JSON-lines file
    as soon as measured; a rerun skips the ids there. Records carry the run's identity and are
    checked on resume (format in the module docstring); a file that fails is left as it is.

    Args:
      train_fn: `(params, data) -> params`, e.g. `ti.lbfgs_trainer(loss, l2=1e-2)`; it is
        warm-started from `params`.
      params: the trained parameters θ̂.
      train: the training set, a pytree of tensors with leading axis n_train.
      test: the test points, leading axis n_test; all are measured at once per model.
      indices: distinct training ids to remove one at a time, a sequence or 1-d tensor.
      measure: `(params, batch) -> Tensor[B]`, the per-example quantity the scores predict
        (the training loss to compare with influence scores); no default, so it is explicit.
      out: path of the JSON-lines file (created if missing, resumed if present); None keeps
        results in memory only.
      meta: JSON-serializable description of the run (which test points, which model);
        hashed with the training-set size, the number of test points and the dtype into
        every record as the run's identity, so results of two setups are never mixed.
      chunk_size: test points measured at once.
      progress: show a tqdm progress bar over the retrainings.

    Returns:
      `[n_test, len(indices)]`, dtype and device of `params`; column j belongs to `indices[j]`.

    Raises:
      ValueError: `measure` not per-example or non-finite on a retrained model; `out` holding
        records of another run, or damaged (the message names the line).
      TypeError: `meta` not JSON-serializable.
      ArgumentError: `indices` not distinct ids in range; `train_fn` or `measure` not a
        function, bad `params`, data of another dtype or device, a bad `chunk_size`.
      ConvergenceError: from `train_fn`.

    Cost: len(indices) + 1 calls of `train_fn` (fewer when resuming), each followed by one
    pass of `measure` over the test points; memory one retrained model at a time.

    Examples:
      >>> train_fn = ti.newton_trainer(loss, params, train, l2=1e-2)
      >>> actual = ti.leave_one_out(train_fn, params, train, test, [0, 5], measure=loss, progress=False)
      >>> actual.shape
      torch.Size([5, 2])
      >>> theta = ti.lbfgs_trainer(loss, l2=1e-2, newton_steps=3)(params, ti.take(train, torch.arange(1, 60)))
      >>> torch.allclose(actual[:, 0], loss(theta, test) - loss(params, test), rtol=0, atol=1e-9)
      True
    """
    where = "ti.leave_one_out"
    for name, fn in (("train_fn", train_fn), ("measure", measure)):
        if not callable(fn):
            raise checks.ArgumentError(f"{where}: `{name}` must be a function; got {type(fn).__name__}.")
    ref = checks.params(where, params)
    checks.chunk_size(where, chunk_size)
    checks.flag(where, "progress", progress)
    for name, data in (("train", train), ("test", test)):
        D._count_examples(data, name=name, call=where)
        checks.floating_like(where, name, data, ref)
    settings = _settings(where, meta, params, train, test)
    n_train, n_test = settings["n_train"], settings["n_test"]
    ids = _check_indices(indices, n_train, where)
    path = os.fspath(out) if out is not None else None
    done, complete, size = _read_done(path, settings, where) if path is not None else ({}, 0, 0)
    todo = [key for key in [BASE_ID, *ids] if key not in done]
    device = optree.tree_leaves(train, namespace="")[0].device
    sink = open(path, "ab") if path is not None and todo else None     # nothing to do: the file is not touched
    try:
        if sink is not None and complete < size:
            sink.truncate(complete)                  # a torn last line: the model in progress when a run was killed
        with tqdm(total=len(ids) + 1, initial=len(ids) + 1 - len(todo), desc="leave-one-out models",
                  disable=not progress) as bar:            # the base run and one model per removal
            for key in todo:
                retrained = train_fn(params, train if key == BASE_ID else D.take(train, _without(key, n_train, device)))
                checks.params(f"{where}: {_model(key)} (`train_fn` output)", retrained)
                values = measure_all(measure, retrained, test, chunk_size, where)
                _check_finite(values, key, where)
                done[key] = _append(sink, key, values, settings) if sink is not None else values.cpu().tolist()
                bar.update()
    finally:
        if sink is not None:
            sink.close()
    leaf = optree.tree_leaves(params, namespace="")[0]
    as_tensor = lambda key: torch.tensor(done[key], dtype=leaf.dtype, device=leaf.device)  # noqa: E731
    if not ids:
        return torch.zeros(n_test, 0, dtype=leaf.dtype, device=leaf.device)
    return torch.stack([as_tensor(key) for key in ids], dim=1) - as_tensor(BASE_ID)[:, None]
