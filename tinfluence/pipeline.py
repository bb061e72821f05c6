"""`tinfluence run TASK.py`: the influence pipeline for a user's own model, and the pieces it shares with the demo.

A task file is plain Python that defines, at module level, what `Task` lists (the data,
the per-example loss, the parameters or a checkpoint, the method settings). The pipeline
then, into one output folder:

1. trains the model (or loads it) and keeps θ̂ in `model.pt`;
2. scores every chosen test point with each method, one file per test point plus an index
   (`scores/<method>/`, `ti.influence_to_files` / `ti.io.ScoreWriter`, resumable);
3. selects per test point the top-k training points by |score| (united over methods);
4. retrains without each of them (`loo.jsonl`, `ti.leave_one_out`, resumable, base run id -1);
5. writes `figure2.png`, `top_examples_<method>.png` (when the task gives `images`),
   `table.json` (correlations per method) and `changes.csv` (predicted against actual change
   for every retrained model).

The folder's identity is `run.json` (the task file's sha256, a hash of the data and the
initial parameters, every setting); a folder holding another task's or other settings' run
is refused and left as it is. Outputs of stage 5 are written in a staging folder and moved
into place whole. Score sign as everywhere: score ≈ L_test(θ̂ without z) − L_test(θ̂),
positive = helpful.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import runpy
import shutil
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import optree
import torch

from . import plot
from .core import data as D
from .core.objective import objective
from .core.transforms import hessian, hvp
from .io.scores import _atomic_write, _hash_tree, _score_writer, influence_to_files, read_scores, run_identity
from .methods.empirical_if import empirical_if
from .methods.similarity import grad_dot
from .methods.tracin import tracin
from .solvers import cg, direct, lissa
from .validate import lbfgs_trainer, leave_one_out, newton_trainer, pearson, sign_agreement, spearman
from .validate.loo import leave_one_out_records

__all__ = ["Task", "TaskError", "FolderError", "Folder", "load_task", "run_task", "retrain_sets", "metrics",
           "table_text", "retrain_stage", "METHODS", "RUN_FILE"]

RUN_FILE = "run.json"      # the settings of the run a folder holds, written before any work
STAGING = ".writing-"      # prefix of the folder in which the outputs are written before they are moved into place
WHERE = "tinfluence run"
TOP_K_HINT = "(A correlation needs at least 2 retrained points per test point.)"


class TaskError(ValueError):
    """A task file that does not define what the pipeline needs; the message names the field and the fix."""


class FolderError(ValueError):
    """An output folder holds results this run must not touch: another run's, or damaged ones."""


# ---------------------------------------------------------------------------------------------
# the output folder: identity, claim, staging (shared with the demo)


@dataclass(frozen=True)
class Folder:
    """An output folder of one kind of run: its identity `settings` (run.json) and the names it writes.

    Attributes:
      out: the folder's path.
      settings: the run's identity, JSON-serializable, written to `run.json` by `claim`.
      files: the names (files or folders) a run of this kind owns.
      owner: names the kind in messages ("the demo's").
      flags: `settings -> str`, the settings spelled as command-line options.

    Examples:
      >>> import os, tempfile
      >>> out = tempfile.mkdtemp()
      >>> folder = ti.pipeline.Folder(out, {"top_k": 5}, ("table.json",), "the example's", str)
      >>> folder.check(fresh=False)
      'new'
      >>> folder.claim(fresh=False)
      >>> folder.check(fresh=False), sorted(os.listdir(out))
      ('resume', ['run.json'])
      >>> ti.pipeline.Folder(out, {"top_k": 6}, ("table.json",), "the example's", str).check(fresh=False)
      Traceback (most recent call last):
      ...
      tinfluence.pipeline.FolderError: ... holds results of a run with other settings ...
    """

    out: str
    settings: dict
    files: tuple
    owner: str
    flags: Callable

    def check(self, fresh: bool) -> str:
        """Says what a run will do with the folder; reads only.

        Returns:
          "new" (none of its files there), "resume" (same settings) or "fresh" (`fresh` given).

        Raises:
          FolderError: the folder holds this kind's files of a run with other settings, or
            without `run.json`, and `fresh` is False. Nothing is changed.
        """
        present = [name for name in (*self.files, RUN_FILE) if os.path.exists(os.path.join(self.out, name))]
        if not present:
            return "new"
        if fresh:
            return "fresh"
        try:
            with open(os.path.join(self.out, RUN_FILE)) as f:
                theirs = json.load(f)
        except (OSError, ValueError):
            theirs = None
        if theirs == self.settings:
            return "resume"
        if isinstance(theirs, dict) and theirs.keys() == self.settings.keys():
            held = f"results of a run with other settings ({self.flags(theirs)})"
        elif isinstance(theirs, dict):
            held = f"results of another kind of run ({RUN_FILE} with the keys {', '.join(theirs)})"
        else:
            held = f"{self.owner} files ({', '.join(present)}) without a readable {RUN_FILE} (an older version's run)"
        raise FolderError(f"{self.out} holds {held}; this command has {self.flags(self.settings)}. Nothing was changed. "
                          f"Name a new folder with --out, or pass --fresh to delete that run's files "
                          f"({', '.join((*self.files, RUN_FILE))}) in {self.out} and start afresh.")

    def claim(self, fresh: bool) -> None:
        """Makes the folder this run's; call after `check`, on one process.

        With `fresh` deletes this kind's own files there; removes half-written outputs of an
        interrupted run; writes `run.json`.
        """
        os.makedirs(self.out, exist_ok=True)
        for name in (*self.files, RUN_FILE) if fresh else ():
            path = os.path.join(self.out, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            elif os.path.exists(path):
                os.remove(path)
        for entry in os.scandir(self.out):
            if entry.name.startswith(STAGING) and entry.is_dir():
                shutil.rmtree(entry.path)
        run_file, text = Path(self.out) / RUN_FILE, json.dumps(self.settings, indent=1).encode()
        if not run_file.exists() or run_file.read_bytes() != text:
            _atomic_write(run_file, text, WHERE)

    @contextlib.contextmanager
    def staged(self) -> Iterator[str]:
        """Yields a staging folder inside `out`; on success every file in it is moved into `out` whole."""
        staging = tempfile.mkdtemp(prefix=STAGING, dir=self.out)
        yield staging
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(self.out, name))
        os.rmdir(staging)


# ---------------------------------------------------------------------------------------------
# selection, retraining, comparison (shared with the demo)


def retrain_sets(scores: dict, top_k: int) -> list:
    """Per test point, the union over methods of the top-k training ids by |score| (sorted lists).

    Args:
      scores: method name -> `[n_test, n_train]` scores.
      top_k: ids per method and test point, 1 <= top_k <= n_train.

    Returns:
      `n_test` sorted lists of training ids, each of top_k to (methods · top_k) ids.

    Cost: O(methods · n_test · n_train) for the top-k.

    Examples:
      >>> scores = {"cg": torch.tensor([[3., -1., 0., 2.]]), "tracin": torch.tensor([[0., 0.5, -4., 1.]])}
      >>> ti.pipeline.retrain_sets(scores, 2)
      [[0, 2, 3]]
    """
    tops = torch.cat([s.abs().topk(top_k, dim=1).indices for s in scores.values()], dim=1)   # [n_test, m·k]
    return [sorted(set(row.tolist())) for row in tops]


def metrics(name: str, scores: torch.Tensor, actual: torch.Tensor, columns: dict, sets: list, top_k: int) -> dict:
    """Mean over test points of Pearson/Spearman on each test's retrained set, and top-k sign agreement.

    Args:
      name: the method's name, the row's "method".
      scores: `[n_test, n_train]`.
      actual: `[n_test, n_retrained]` actual changes (`ti.leave_one_out`); column `columns[i]`
        is training id i.
      columns: training id -> column of `actual`.
      sets: per test point, the retrained ids it is compared on (`retrain_sets`), 2 or more each.
      top_k: sign agreement counts each set's min(top_k, len(set)) largest |scores|.

    Returns:
      `{"method", "pearson", "spearman", "sign"}`, the three metrics as floats.

    Raises:
      ValueError: a set of fewer than 2 ids, or non-finite values (as `ti.pearson`).

    Examples:
      >>> scores = torch.tensor([[1., -2., 3., 0.5]])
      >>> m = ti.pipeline.metrics("cg", scores, 2 * scores[:, [0, 1, 2]], {0: 0, 1: 1, 2: 2}, [[0, 1, 2]], 2)
      >>> m["method"], round(m["pearson"], 12), round(m["spearman"], 12), m["sign"]
      ('cg', 1.0, 1.0, 1.0)
    """
    rows = []
    for t, ids in enumerate(sets):
        cols = torch.tensor([columns[i] for i in ids])
        s, a = scores[t, ids], actual[t, cols]
        rows.append((pearson(s, a), spearman(s, a), sign_agreement(s, a, k=min(top_k, len(ids)))))
    p, r, g = (torch.stack(col).mean().item() for col in zip(*rows))
    return {"method": name, "pearson": p, "spearman": r, "sign": g}


def table_text(table: list, top_k: int) -> str:
    """The rows of `metrics` (with "seconds") as the printed table.

    Args:
      table: rows of `metrics`, each with a "seconds" entry added.
      top_k: the k of the sign-agreement column's title.

    Returns:
      The table as one string: a header, a rule, one line per row.

    Examples:
      >>> row = {"method": "cg", "pearson": 0.9, "spearman": 0.8, "sign": 1.0, "seconds": 1.5}
      >>> text = ti.pipeline.table_text([row], 10)
      >>> text.splitlines()[0].split(), text.splitlines()[2].split()
      (['method', 'pearson', 'spearman', 'sign@10', 'time', '[s]'], ['cg', '0.9000', '0.8000', '1.000', '1.50'])
    """
    head = f"{'method':<10} {'pearson':>8} {'spearman':>9} {f'sign@{top_k}':>9} {'time [s]':>9}"
    lines = [head, "-" * len(head)]
    lines += [f"{r['method']:<10} {r['pearson']:>8.4f} {r['spearman']:>9.4f} {r['sign']:>9.3f} {r['seconds']:>9.2f}"
              for r in table]
    return "\n".join(lines)


def retrain_stage(train_fn: Callable, params, train, test, retrained: list, *, measure: Callable, path: str,
                  meta: dict, progress: bool, echo: Callable, describe: str, hint: str) -> torch.Tensor:
    """Step 4: retrains without each id of `retrained` into the JSON-lines file `path`, saying what it resumes.

    Args:
      train_fn: `(params, data) -> params`, as for `ti.leave_one_out`.
      params: θ̂, the warm start.
      train: the training set, leading axis n_train.
      test: the test points, leading axis n_test.
      retrained: distinct training ids to remove one at a time.
      measure: `(params, batch) -> Tensor[B]`, the measured change.
      path: the JSON-lines file (created, or resumed).
      meta: the run's settings, its identity in the file.
      progress: show a tqdm bar.
      echo: `str -> None`, where the report lines go.
      describe: how `retrained` was chosen, for the report.
      hint: appended to a `FolderError`'s message.

    Returns:
      `[n_test, len(retrained)]`, the actual change of `measure` (as `ti.leave_one_out`).

    Raises:
      FolderError: `path` belongs to another run or is damaged (nothing is changed); `hint` is appended.

    Cost: len(retrained) + 1 calls of `train_fn` (fewer when resuming).

    Examples:
      >>> import os, tempfile
      >>> path, lines = os.path.join(tempfile.mkdtemp(), "loo.jsonl"), []
      >>> train_fn = ti.newton_trainer(loss, params, train, l2=1e-2)
      >>> for _ in range(2):
      ...     actual = ti.pipeline.retrain_stage(train_fn, params, train, test, [0, 5], measure=loss, path=path,
      ...                                        meta={}, progress=False, echo=lines.append, describe="", hint="")
      >>> actual.shape, lines[1], lines[4].startswith("resumed 3/3 models")
      (torch.Size([5, 2]), 'retraining 3 models ...', True)
    """
    try:
        records = leave_one_out_records(path, params, train, test, meta=meta)
    except ValueError as err:
        raise FolderError(f"{err} {hint}") from None
    models, resumed = len(retrained) + 1, len(records.keys() & {-1, *retrained})
    echo(f"leave-one-out: {models} models, the base run and {len(retrained)} removals {describe}")
    echo(f"resumed {resumed}/{models} models from {path}; {models - resumed} to retrain ..." if resumed
         else f"retraining {models} models ...")
    tic = time.perf_counter()
    actual = leave_one_out(train_fn, params, train, test, retrained, measure=measure, out=path, meta=meta,
                           progress=progress)
    echo(f"leave-one-out: retrained {models - resumed} models in {time.perf_counter() - tic:.1f} s"
         + (f" ({resumed} resumed)" if resumed else ""))
    return actual


# ---------------------------------------------------------------------------------------------
# the task file


METHODS = {
    "direct": "influence, dense Hessian (Cholesky)",
    "cg": "influence, conjugate gradients on Hessian-vector products",
    "lissa": "influence, LiSSA (depth 1000, batch 50)",
    "tracin": "TracIn over the task's `checkpoints` (own scale)",
    "empirical": "EmpiricalIF (ascent/descent, r=1e-3; own scale)",
    "grad_dot": "gradient dot product (own scale)",
}
SCALE_FREE = ("tracin", "empirical", "grad_dot")


@dataclass(frozen=True)
class Task:
    """What a task file defines, after loading and checking (module-level names of the same spelling).

    Built by `load_task`. Required: `train`, `test` (data sets: pytrees of tensors with a
    shared leading example axis, e.g. `(x, y)` or a dict), `loss(params, batch) -> Tensor[B]`
    (one loss per example) and `params` (a dict of tensors: the initial parameters, e.g. from
    `ti.functionalize`). Every other field has the default shown by its comment in the source:
    `name`, `checkpoint`, `trained`, `fit`, `retrain`, `method` (names of `METHODS`), `l2`,
    `damping`, `gtol`, `cg_tol`, `cg_maxiter`, `top_k` (>= 2), `test_ids`, `seed`,
    `checkpoints` (for "tracin"), `images`, `labels`.

    Examples:
      >>> task = ti.pipeline.Task(train, test, loss, params)
      >>> task.method, task.dtype, task.tol("cg_tol")           # float64 parameters: tight defaults
      (('cg',), torch.float64, 1e-08)
    """

    train: object
    test: object
    loss: Callable
    params: dict
    name: str = "task"
    checkpoint: str | None = None     # a file of trained parameters (torch.save of a dict) to load instead of training
    trained: bool = False             # `params` are already trained: skip step 1
    fit: Callable | None = None       # (params, data) -> params, training from params; default ti.lbfgs_trainer
    retrain: Any = None               # "newton", "lbfgs" or (params, data) -> params; default: `fit`, else "lbfgs"
    method: tuple = ("cg",)
    l2: float = 0.0
    damping: float = 0.0
    gtol: float | None = None         # gradient max-norm of training; default 1e-9 (float64), 1e-4 (float32)
    cg_tol: float | None = None       # CG relative residual; default 1e-8 (float64), 1e-4 (float32)
    cg_maxiter: int = 300
    top_k: int = 10
    test_ids: tuple = (0, 1, 2)
    seed: int = 0
    checkpoints: Any = None           # for "tracin": [(params_t, lr_t), ...] or a function () -> that list
    images: tuple | None = None       # (train images [n_train, H, W], test images [n_test, H, W]) for top_examples
    labels: tuple | None = None       # (train labels [n_train], test labels [n_test]) for the figures' titles
    path: str = field(default="", repr=False)
    sha256: str = field(default="", repr=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the parameters (and of every score)."""
        params: Any = self.params   # a pytree (optree's PyTree type matches no dict for a static checker)
        return optree.tree_leaves(params, namespace="")[0].dtype

    def tol(self, name: str) -> float:
        """`gtol` or `cg_tol`, or its default for the parameters' dtype."""
        given = getattr(self, name)
        if given is not None:
            return given
        single = self.dtype in (torch.float32, torch.float16, torch.bfloat16)
        return {"gtol": 1e-4 if single else 1e-9, "cg_tol": 1e-4 if single else 1e-8}[name]


_HELP = {
    "train": "a data set: a pytree of tensors sharing a leading example axis, e.g. `train = (x, y)` or a dict of "
             "tensors (a training function goes in `fit`)",
    "test": "a data set like `train`, e.g. `test = (x_test, y_test)`",
    "loss": "`def loss(params, batch): ...` returning one loss per example, shape [B]",
    "params": "a dict of tensors, e.g. `apply, params = ti.functionalize(model)`",
}


def _fail(path: str, name: str, problem: str) -> TaskError:
    return TaskError(f"{WHERE}: task file {path!r}: `{name}` {problem}")


def _data(path: str, name: str, value) -> object:
    leaves = optree.tree_leaves(value, namespace="")
    if callable(value) or not leaves or not all(isinstance(x, torch.Tensor) for x in leaves):
        got = type(value).__name__ if not leaves else ", ".join(sorted({type(x).__name__ for x in leaves}))
        raise _fail(path, name, f"must be {_HELP[name]}; got {got}.")
    sizes = {x.shape[0] if x.dim() else None for x in leaves}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise _fail(path, name, f"must hold tensors with one shared, non-zero leading example axis; got leading "
                                f"sizes {sorted(map(str, sizes))}.")
    return value


def _params(path: str, value) -> dict:
    if not (isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       and v.is_floating_point() for k, v in value.items())):
        raise _fail(path, "params", f"must be {_HELP['params']} (floating tensors); got {type(value).__name__}.")
    return {k: v.detach() for k, v in value.items()}


def _load_checkpoint(path: str, file: str, params: dict) -> dict:
    """The trained parameters of `file` (a torch.save'd dict with the keys and shapes of `params`)."""
    full = file if os.path.isabs(file) else os.path.join(os.path.dirname(os.path.abspath(path)), file)
    try:
        state = torch.load(full, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise _fail(path, "checkpoint", f"names {full!r}, which cannot be read ({err}); give the path of a file "
                                        "written by torch.save(params_dict), relative to the task file.") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or any(k not in state for k in params):
        missing = sorted(set(params) - set(state)) if isinstance(state, dict) else list(params)
        raise _fail(path, "checkpoint", f"{full!r} lacks the parameters {missing[:5]}; save the dict of the very "
                                        "names in `params` (e.g. torch.save(params, file)).")
    bad = [k for k in params if state[k].shape != params[k].shape]
    if bad:
        raise _fail(path, "checkpoint", f"{full!r} holds {bad[0]} of shape {list(state[bad[0]].shape)}, `params` "
                                        f"{list(params[bad[0]].shape)}; save the model this task defines.")
    return {k: state[k].to(params[k].dtype) for k in params}


def _choice(path: str, name: str, value, kinds) -> Any:
    """`value` when it is of `kinds` (never a bool), else a TaskError naming the field."""
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = " or ".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise _fail(path, name, f"must be {kind}; got {value!r} ({type(value).__name__}).")
    return value


def load_task(path: str | os.PathLike, **overrides) -> Task:
    """Runs the task file at `path` (with `runpy`) and returns its checked `Task`.

    Args:
      path: the task file, plain Python defining `train`, `test`, `loss` and `params` at
        module level (e.g. tinfluence/tasks/digits.py).
      **overrides: values that replace the file's (the command line's --top-k, --test-ids,
        --method).

    Returns:
      The `Task`, with `path` made absolute and `sha256` the file's digest.

    Raises:
      TaskError: the file is missing or raises (the message carries its error), or a field is
        missing or wrong (the message names the field and what to write).

    Examples:
      >>> import os, tinfluence.tasks
      >>> task = ti.pipeline.load_task(os.path.join(os.path.dirname(tinfluence.tasks.__file__), "digits.py"))
      >>> task.name, task.top_k, task.method[:2]
      ('digits', 100, ('direct', 'cg'))
      >>> ti.pipeline.load_task("no/such/task.py")
      Traceback (most recent call last):
      ...
      tinfluence.pipeline.TaskError: tinfluence run: task file 'no/such/task.py' does not exist; ...
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TaskError(f"{WHERE}: task file {path!r} does not exist; pass the path of a Python file defining "
                        "`train`, `test`, `loss` and `params` (see examples/ or tinfluence/tasks/digits.py).")
    raw = Path(path).read_bytes()
    try:
        names = runpy.run_path(path, run_name="__tinfluence_task__")
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        raise TaskError(f"{WHERE}: task file {path!r} raised {type(err).__name__}: {err}") from err
    names = {**{k: v for k, v in names.items() if not k.startswith("__")}, **overrides}
    for name in _HELP:
        if name not in names:
            raise _fail(path, name, f"is missing; define {_HELP[name]}.")
    known = {f.name for f in fields(Task)} - {"path", "sha256"}
    given = {k: v for k, v in names.items() if k in known}
    given["train"], given["test"] = _data(path, "train", given["train"]), _data(path, "test", given["test"])
    if not callable(given["loss"]):
        raise _fail(path, "loss", f"must be {_HELP['loss']}; got {type(given['loss']).__name__}.")
    given["params"] = _params(path, given["params"])
    given.setdefault("name", Path(path).stem)
    if given.get("checkpoint") is not None:
        given["params"] = _load_checkpoint(path, _choice(path, "checkpoint", given["checkpoint"], str), given["params"])
        given["trained"] = True
    method = given.get("method", Task.method)
    method = (method,) if isinstance(method, str) else tuple(method)
    unknown = [m for m in method if m not in METHODS]
    if not method or unknown or len(set(method)) != len(method):
        raise _fail(path, "method", f"must be one of {', '.join(METHODS)} or a list of distinct ones; got {method!r}.")
    if "tracin" in method and given.get("checkpoints") is None:
        raise _fail(path, "checkpoints", "is missing, and method 'tracin' needs it: define `checkpoints = [(params_t, "
                                         "lr_t), ...]` from a training run (or ti.load_checkpoints(...)), or drop 'tracin'.")
    given["method"] = method
    for name in ("l2", "damping"):
        number = float(_choice(path, name, given.get(name, 0.0), (int, float)))
        if not number >= 0:
            raise _fail(path, name, f"must be >= 0; got {number}.")
        given[name] = number
    for name in ("fit", "retrain"):
        value = given.get(name)
        if value is not None and not callable(value) and not (name == "retrain" and value in ("newton", "lbfgs")):
            also = ' (or "newton" / "lbfgs")' if name == "retrain" else ""
            raise _fail(path, name, f"must be a function `(params, data) -> params` that trains starting from "
                                    f"`params`{also}; got {value!r}.")
    n_train, n_test = D.num_examples(given["train"]), D.num_examples(given["test"])
    top_k = _choice(path, "top_k", given.get("top_k", Task.top_k), int)
    if not 2 <= top_k <= n_train:
        raise _fail(path, "top_k", f"must be between 2 and {n_train} (the training set size); got {top_k}. {TOP_K_HINT}")
    ids = given.get("test_ids", tuple(range(min(3, n_test))))
    ids = tuple(int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids))
    bad = [i for i in ids if not 0 <= i < n_test]
    if not ids or bad or len(set(ids)) != len(ids):
        raise _fail(path, "test_ids", f"must be distinct ids into `test` (0 to {n_test - 1}); got {list(ids)}.")
    given["test_ids"] = ids
    if given.get("images") is not None:
        images = given["images"]
        if not (isinstance(images, (tuple, list)) and len(images) == 2
                and [len(images[0]), len(images[1])] == [n_train, n_test]):
            raise _fail(path, "images", f"must be (train images, test images) with {n_train} and {n_test} images; "
                                        f"got {type(images).__name__}.")
        given["images"] = tuple(images)
    for name in ("seed", "cg_maxiter"):
        if name in given:
            _choice(path, name, given[name], int)
    return Task(**given, path=os.path.abspath(path), sha256=hashlib.sha256(raw).hexdigest())


def _data_hash(task: Task) -> str:
    h = hashlib.sha256()
    for tree in (task.train, task.test, task.params):
        _hash_tree(h, tree)
    return h.hexdigest()[:16]


def task_settings(task: Task) -> dict:
    """The settings that decide a task run's results: its identity in `run.json`, `loo.jsonl` and the score files."""
    return {"task": task.name, "file": os.path.basename(task.path), "file_sha256": task.sha256[:16],
            "data": _data_hash(task), "n_train": D.num_examples(task.train), "n_test": D.num_examples(task.test),
            "dtype": str(task.dtype).removeprefix("torch."), "trained": task.trained, "method": list(task.method),
            "l2": task.l2, "damping": task.damping, "gtol": task.tol("gtol"), "cg_tol": task.tol("cg_tol"),
            "cg_maxiter": task.cg_maxiter, "top_k": task.top_k, "test_ids": list(task.test_ids), "seed": task.seed}


def _flags(settings: dict) -> str:
    return (f"task {settings['task']} ({settings['file']}, sha256 {settings['file_sha256']}, data {settings['data']}), "
            f"--method {' '.join(settings['method'])} --test-ids {' '.join(map(str, settings['test_ids']))} "
            f"--top-k {settings['top_k']}")


FILES = ("model.pt", "scores", "loo.jsonl", "figure2.png", *(f"top_examples_{m}.png" for m in METHODS),
         "table.json", "changes.csv")


def task_folder(out: str, task: Task) -> Folder:
    """The output folder of `task`'s run."""
    return Folder(out, task_settings(task), FILES, "tinfluence run's", _flags)


# ---------------------------------------------------------------------------------------------
# the stages


def _trainer(task: Task, kind, params) -> Callable:
    """The `train_fn(params, data)` of step 4; "newton" expands around θ̂ = `params`."""
    if callable(kind):
        return kind
    if kind == "newton":
        return newton_trainer(task.loss, params, task.train, l2=task.l2, gtol=task.tol("gtol"))
    return lbfgs_trainer(task.loss, l2=task.l2, gtol=task.tol("gtol"), newton_steps=5)


def _fitted(task: Task, out: str, echo: Callable) -> dict:
    """Step 1: θ̂, from `out/model.pt` when a run saved it, else trained (or the task's trained params) and saved."""
    path = Path(out) / "model.pt"
    if path.exists():
        params = torch.load(path, map_location="cpu", weights_only=True)
        echo(f"model: θ̂ loaded from {path} (saved by this run)")
        return {k: params[k].to(task.params[k].device) for k in task.params}
    tic = time.perf_counter()
    if task.trained:
        params = task.params
        echo("model: the task's trained parameters" + (f" ({task.checkpoint})" if task.checkpoint else ""))
    else:
        fit = task.fit or _trainer(task, "lbfgs", task.params)
        params = {k: v.detach() for k, v in fit(task.params, task.train).items()}
        how = "the task's fit" if task.fit else f"L-BFGS and Newton-CG to gradient max-norm {task.tol('gtol'):g}"
        echo(f"model: trained in {time.perf_counter() - tic:.1f} s ({how})")
    buffer = io.BytesIO()
    torch.save({k: v.cpu() for k, v in params.items()}, buffer)
    _atomic_write(path, buffer.getvalue(), WHERE)
    return params


def _checkpoints(task: Task) -> list:
    return task.checkpoints() if callable(task.checkpoints) else list(task.checkpoints)


def _ihvp(task: Task, name: str, params) -> Callable:
    R = objective(task.loss, task.train, l2=task.l2)
    if name == "direct":
        return direct(hessian(R, params), damping=task.damping)
    if name == "cg":
        return cg(hvp(R, params), damping=task.damping, tol=task.tol("cg_tol"), maxiter=task.cg_maxiter)
    # a fresh generator per call: every block of test points gets the same draws, resumed or not
    return lambda v: lissa(task.loss, params, task.train, l2=task.l2, damping=task.damping, scale="auto", depth=1000,
                           batch_size=50, generator=torch.Generator().manual_seed(task.seed))(v)


def _own_scale(task: Task, name: str, params, test) -> torch.Tensor:
    if name == "tracin":
        return tracin(task.loss, _checkpoints(task), task.train, test)
    if name == "empirical":
        return empirical_if(task.loss, params, task.train, test, radius=1e-3)
    return grad_dot(task.loss, params, task.train, test)


def _score_stage(task: Task, name: str, params, folder: Path, meta: dict, progress: bool, echo: Callable,
                 hint: str) -> torch.Tensor:
    """Step 2 for one method: `[n_test_ids, n_train]` scores of `task.test_ids`, through `<id>.npy` files in `folder`.

    Blocks of 64 test ids (positions in `task.test_ids`) are scored together; a block whose
    files all verify is skipped, so a resumed run writes the bytes of an uninterrupted one.

    Raises:
      FolderError: `folder` holds another run's score files (nothing is changed); `hint` is appended.
    """
    n_train, ids, block = D.num_examples(task.train), list(task.test_ids), 64
    run = run_identity(params, task.train, task.test, block_size=block, meta=meta)
    try:
        writer = _score_writer(WHERE, folder, run=run, n_train=n_train, dtype=task.dtype)
    except ValueError as err:
        raise FolderError(f"{err} {hint}") from None
    done = writer.done & set(ids)
    if done:
        echo(f"scores {name}: resumed {len(done)}/{len(ids)} test points from {folder}")
    if done == set(ids):
        pass                      # nothing to compute: no curvature is built, the files are only read
    elif name in SCALE_FREE:      # the estimators outside ti.influence: the same files, block by block
        for start in range(0, len(ids), block):
            part = ids[start:start + block]
            if set(part) <= writer.done:
                continue
            scores = _own_scale(task, name, params, D.take(task.test, torch.tensor(part)))
            for row, test_id in enumerate(part):
                if test_id not in writer.done:
                    writer.write(test_id, scores[row])
    else:
        influence_to_files(task.loss, params, task.train, task.test, ihvp=_ihvp(task, name, params), out=folder,
                           test_ids=ids, block_size=block, meta=meta, progress=progress)
    return read_scores(folder, ids)


def _changes_csv(path: str, task: Task, scores: dict, actual: torch.Tensor, retrained: list, sets: list) -> None:
    """One row per (test point, retrained training point): predicted change per method and the actual change."""
    columns = {i: j for j, i in enumerate(retrained)}
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["test_id", "train_id", "actual", *(f"predicted_{m}" for m in scores)])
        for t, ids in enumerate(sets):
            for i in ids:
                w.writerow([task.test_ids[t], i, repr(actual[t, columns[i]].item()),
                            *(repr(s[t, i].item()) for s in scores.values())])


def _figures(staging: str, task: Task, scores: dict, actual: torch.Tensor, retrained: list, sets: list) -> None:
    columns = {i: j for j, i in enumerate(retrained)}
    truth = [actual[t, torch.tensor([columns[i] for i in ids])] for t, ids in enumerate(sets)]
    predicted = {m: [s[t, ids] for t, ids in enumerate(sets)] for m, s in scores.items()}
    names = [f"test {i}" for i in task.test_ids]
    plot.loo_scatter(truth, predicted, labels=names, scale_free=[m for m in scores if m in SCALE_FREE],
                     title=f"{task.name} ({D.num_examples(task.train)} train, l2 {task.l2:g}, damping {task.damping:g}): "
                           f"predicted against actual change in test loss, top {task.top_k} removals per test point",
                     path=os.path.join(staging, "figure2.png"))
    if task.images is None:
        return
    train_images, test_images = task.images
    ids = list(task.test_ids)
    labels = task.labels or (None, None)
    test_label = torch.as_tensor(labels[1])[ids].tolist() if labels[1] is not None else None
    for m, s in scores.items():
        plot.top_examples(train_images, s, torch.as_tensor(test_images)[ids], k=min(6, s.shape[1]), labels=labels[0],
                          test_label=test_label, names=names,
                          title=f"{task.name}, {m} ({METHODS[m]}): most helpful and harmful training examples",
                          path=os.path.join(staging, f"top_examples_{m}.png"))


def _harmful_text(task: Task, scores: dict, actual: torch.Tensor, retrained: list, k: int = 5) -> list:
    """Lines naming each test point's most harmful training points by the first method, with their actual change."""
    first, columns = next(iter(scores)), {i: j for j, i in enumerate(retrained)}
    s, lines = scores[first], [f"most harmful training points by {first} (predicted / actual change in test loss):"]
    for t, test_id in enumerate(task.test_ids):
        picks = (-s[t]).topk(min(k, s.shape[1])).indices.tolist()
        cells = [f"#{i} {s[t, i].item():+.2e}" + (f"/{actual[t, columns[i]].item():+.2e}" if i in columns else "")
                 for i in picks]
        lines.append(f"  test {test_id}: " + ", ".join(cells))
    return lines


def run_task(task: Task, out: str, *, progress: bool = True, echo: Callable = print) -> dict:
    """Runs the five stages of the pipeline for `task` into `out` (claimed with `task_folder(out, task).claim`).

    Args:
      task: a `Task` from `load_task`.
      out: the output folder, claimed beforehand.
      progress: show tqdm bars.
      echo: `str -> None`, where the report lines go.

    Returns:
      `{"scores": method -> [n_test_ids, n_train], "retrained": ids, "actual": [n_test_ids, len(ids)], "table": rows}`;
      scores positive = helpful.

    Raises:
      FolderError: a result file in `out` belongs to another run or is damaged; nothing is changed.

    Cost: one training, each method's scores of the test ids, len(retrained) + 1 retrainings
    (resumed ones skipped), and the figures.

    Examples:
      >>> import os, tempfile
      >>> out = tempfile.mkdtemp()
      >>> task = ti.pipeline.Task(train, test, loss, params, method=("direct",), l2=1e-2, trained=True,
      ...                         top_k=2, test_ids=(0,))
      >>> ti.pipeline.task_folder(out, task).claim(fresh=False)
      >>> result = ti.pipeline.run_task(task, out, progress=False, echo=lambda line: None)
      >>> scores = result["scores"]
      >>> scores["direct"].shape, result["actual"].shape, len(result["retrained"])
      (torch.Size([1, 60]), torch.Size([1, 2]), 2)
      >>> sorted(os.listdir(out))
      ['changes.csv', 'figure2.png', 'loo.jsonl', 'model.pt', 'run.json', 'scores', 'table.json']
    """
    start = time.perf_counter()
    folder = task_folder(out, task)
    meta = folder.settings
    n_train, n_test = D.num_examples(task.train), D.num_examples(task.test)
    echo(f"{task.name}: {n_train} training / {n_test} test points, {sum(v.numel() for v in task.params.values())} "
         f"parameters, {str(task.dtype).removeprefix('torch.')}; test ids {list(task.test_ids)}")
    params = _fitted(task, out, echo)
    hint = f"Or pass --fresh to start {out} afresh."
    test = D.take(task.test, torch.tensor(task.test_ids))
    scores, seconds = {}, {}
    for name in task.method:
        tic = time.perf_counter()
        scores[name] = _score_stage(task, name, params, Path(out) / "scores" / name, meta | {"method": name},
                                    progress, echo, hint)
        seconds[name] = time.perf_counter() - tic
        echo(f"scores {name}: {n_train} training points × {len(task.test_ids)} test points in {seconds[name]:.1f} s")
    sets = retrain_sets(scores, task.top_k)
    retrained = sorted(set().union(*sets))
    retrain = task.retrain if task.retrain is not None else (task.fit or "lbfgs")
    actual = retrain_stage(_trainer(task, retrain, params), params, task.train, test, retrained, measure=task.loss,
                           path=os.path.join(out, "loo.jsonl"), meta=meta, progress=progress, echo=echo,
                           describe=f"(the top {task.top_k} training points by |score| of each method, united per "
                                    f"test point), warm-started from θ̂ ({retrain if isinstance(retrain, str) else 'fit'})",
                           hint=hint)
    columns = {i: j for j, i in enumerate(retrained)}
    table = [metrics(m, scores[m], actual, columns, sets, task.top_k) | {"seconds": seconds[m]} for m in task.method]
    echo("")
    echo(f"test ids {list(task.test_ids)}: predicted vs actual change in test loss when a training point is removed")
    echo(table_text(table, task.top_k))
    for line in _harmful_text(task, scores, actual, retrained):
        echo(line)
    with folder.staged() as staging:
        _figures(staging, task, scores, actual, retrained, sets)
        _changes_csv(os.path.join(staging, "changes.csv"), task, scores, actual, retrained, sets)
        with open(os.path.join(staging, "table.json"), "w") as f:
            json.dump({"test_ids": list(task.test_ids), "top_k": task.top_k, "rows": table}, f, indent=1)
    echo(f"wrote {', '.join(n for n in FILES if os.path.exists(os.path.join(out, n)))} to {out}  "
         f"(total {time.perf_counter() - start:.1f} s)")
    return {"scores": scores, "retrained": retrained, "actual": actual, "table": table}
