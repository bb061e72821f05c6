"""Leave-one-out retraining: exact against retraining from scratch, resumable after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import tinfluence as ti


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


INDICES = [7, 512]


@pytest.fixture(scope="module")
def from_scratch(digits_lr):
    """Actual test-loss changes, each model retrained from zeros to gradient max-norm 1e-12: [797, 2]."""
    zeros = ti.tree.zeros_like(digits_lr.params)
    base = digits_lr.loss(digits_lr.params, digits_lr.test)
    columns = []
    for i in INDICES:
        keep = torch.ones(1000, dtype=torch.bool)
        keep[i] = False
        scratch = ti.minimize(digits_lr.objective(ti.take(digits_lr.train, keep)), zeros, gtol=1e-12, maxiter=100,
                              newton_steps=10)
        columns.append(digits_lr.loss(scratch, digits_lr.test) - base)
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("trainer", ["lbfgs", "newton"])
def test_matches_retraining_from_scratch(digits_lr, from_scratch, trainer):
    train_fn = (ti.lbfgs_trainer(digits_lr.loss, l2=digits_lr.l2, gtol=1e-12, newton_steps=5) if trainer == "lbfgs"
                else ti.newton_trainer(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2, gtol=1e-12))
    actual = ti.leave_one_out(train_fn, digits_lr.params, digits_lr.train, digits_lr.test, INDICES,
                              measure=digits_lr.loss, progress=False)
    assert actual.shape == (797, 2) and actual.dtype == torch.float64
    torch.testing.assert_close(actual, from_scratch, rtol=0, atol=1e-8)
    assert actual.abs().max() > 1e-4   # the removals change the test loss well above the tolerance


def test_newton_trainer_reports_failure(digits_lr):
    train_fn = ti.newton_trainer(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2, maxiter=1)
    with pytest.raises(ti.ConvergenceError, match=r"ti.newton_trainer: gradient max-norm .* > gtol=1e-10 after maxiter=1"):
        train_fn(digits_lr.params, ti.take(digits_lr.train, slice(1, None)))


def test_removing_a_point_raises_its_own_loss(digits_lr):
    """The sign: a training point helps its own prediction, so removing it raises its loss (> 0)."""
    indices = [3, 40, 900]
    train_fn = ti.newton_trainer(digits_lr.loss, digits_lr.params, digits_lr.train, l2=digits_lr.l2)
    actual = ti.leave_one_out(train_fn, digits_lr.params, digits_lr.train, ti.take(digits_lr.train, torch.tensor(indices)),
                              indices, measure=digits_lr.loss, progress=False)
    assert bool((actual.diagonal() > 0).all())


def _toy():
    """A cheap deterministic stand-in for training: parameters scaled by the data's mean feature."""
    train = (torch.linspace(0.0, 1.0, 10)[:, None], torch.zeros(10, dtype=torch.long))
    test = (torch.tensor([[1.0], [2.0], [3.0]]), torch.zeros(3, dtype=torch.long))
    params = {"w": torch.ones(1, 1)}
    calls = []

    def train_fn(p, data):
        calls.append(data[0].shape[0])
        return {"w": p["w"] * (1 + data[0].mean())}

    def measure(p, batch):
        return (batch[0] @ p["w"]).squeeze(-1)

    return train_fn, params, train, test, measure, calls


def test_writes_one_record_per_model_and_skips_them_on_rerun(tmp_path):
    train_fn, params, train, test, measure, calls = _toy()
    out = tmp_path / "loo.jsonl"
    first = ti.leave_one_out(train_fn, params, train, test, [4, 1], measure=measure, out=out, progress=False)
    assert [r["id"] for r in _records(out)] == [-1, 4, 1] and len(calls) == 3
    again = ti.leave_one_out(train_fn, params, train, test, [1, 4, 9], measure=measure, out=out, progress=False)
    assert [r["id"] for r in _records(out)] == [-1, 4, 1, 9] and len(calls) == 4
    torch.testing.assert_close(again[:, :2], first.flip(1), rtol=0, atol=0)
    in_memory = ti.leave_one_out(train_fn, params, train, test, [1, 4, 9], measure=measure, progress=False)
    torch.testing.assert_close(again, in_memory, rtol=0, atol=0)


def test_a_torn_last_line_is_cut_off_and_redone(tmp_path):
    train_fn, params, train, test, measure, calls = _toy()
    out = tmp_path / "loo.jsonl"
    expected = ti.leave_one_out(train_fn, params, train, test, [2, 5], measure=measure, out=out, progress=False)
    whole = out.read_bytes()
    out.write_bytes(whole[: whole.rfind(b'{"id": 5') + 12])          # the last record, half written
    calls.clear()
    resumed = ti.leave_one_out(train_fn, params, train, test, [2, 5], measure=measure, out=out, progress=False)
    assert calls == [9] and out.read_bytes() == whole
    torch.testing.assert_close(resumed, expected, rtol=0, atol=0)


_SCRIPT = """
import sys, time
import torch, torch.nn.functional as F
import tinfluence as ti
from sklearn.datasets import load_digits

torch.set_num_threads(1)
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X[:260] / 16.0), torch.tensor(y[:260])
train, test = (X[:200], y[:200]), (X[200:], y[200:])
apply, params = ti.functionalize(torch.nn.Linear(64, 10).double())
loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")
params = ti.minimize(ti.objective(loss, train, l2=1e-2), ti.tree.zeros_like(params), gtol=1e-9)
fit = ti.lbfgs_trainer(loss, l2=1e-2, gtol=1e-9, newton_steps=3)
pause = float(sys.argv[2])

def train_fn(p, data):
    time.sleep(pause)
    return fit(p, data)

ti.leave_one_out(train_fn, params, train, test, list(range(0, 200, 20)), measure=loss, out=sys.argv[1], progress=False)
"""


def _run(script, out, pause):
    return [sys.executable, str(script), str(out), str(pause)]


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    script = tmp_path / "loo_job.py"
    script.write_text(_SCRIPT)
    out = tmp_path / "killed.jsonl"
    job = subprocess.Popen(_run(script, out, 0.3))
    deadline = time.time() + 120
    while time.time() < deadline and job.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 4:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before it could be killed"
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    written = out.read_bytes().count(b"\n")
    assert 4 <= written < 11
    subprocess.run(_run(script, out, 0.0), check=True, timeout=120)
    reference = tmp_path / "whole.jsonl"
    subprocess.run(_run(script, reference, 0.0), check=True, timeout=120)
    resumed, whole = _records(out), _records(reference)
    assert sorted(r["id"] for r in resumed) == [-1, *range(0, 200, 20)]
    assert {r["id"]: r["values"] for r in resumed} == {r["id"]: r["values"] for r in whole}


@pytest.mark.parametrize("indices, match", [
    ([0, 10], r"ti.leave_one_out: `indices` must lie in \[0, 9\] \(the training set has 10 points\); got 10"),
    ([-1], r"ti.leave_one_out: `indices` must lie in \[0, 9\]"),
    ([1, 1], r"ti.leave_one_out: `indices` must be distinct"),
    ([0.5], r"ti.leave_one_out: `indices` must be a 1-d sequence of integer training ids; got torch.float"),
])
def test_bad_indices(indices, match):
    train_fn, params, train, test, measure, _ = _toy()
    with pytest.raises(ValueError, match=match):
        ti.leave_one_out(train_fn, params, train, test, indices, measure=measure, progress=False)


def test_bad_functions():
    train_fn, params, train, test, measure, _ = _toy()
    with pytest.raises(TypeError, match=r"ti.leave_one_out: `measure` must be a function; got NoneType"):
        ti.leave_one_out(train_fn, params, train, test, [0], measure=None)
    with pytest.raises(ValueError, match=r"ti.leave_one_out: `measure` must return one value per example, shape \[3\]"):
        ti.leave_one_out(train_fn, params, train, test, [0], measure=lambda p, b: measure(p, b).sum(), progress=False)


def test_a_file_from_another_run_is_refused(tmp_path):
    train_fn, params, train, test, measure, _ = _toy()
    out = tmp_path / "loo.jsonl"
    out.write_text(json.dumps({"id": -1, "values": [0.0, 1.0]}) + "\n")
    with pytest.raises(ValueError, match=r"line 1 holds 2 test values, but `test` has 3 points: the file belongs to another run"):
        ti.leave_one_out(train_fn, params, train, test, [0], measure=measure, out=out, progress=False)
    ti.leave_one_out(train_fn, params, train, test, [0], measure=measure, out=out.with_name("a.jsonl"), meta={"ids": (1, 2)},
                     progress=False)
    ti.leave_one_out(train_fn, params, train, test, [0], measure=measure, out=out.with_name("a.jsonl"), meta={"ids": [1, 2]},
                     progress=False)
    with pytest.raises(ValueError, match=r"was written for another run: its base record has meta=\{'ids': \[1, 2\]\}, "
                                         r"this call meta=\{'ids': \[3\]\}"):
        ti.leave_one_out(train_fn, params, train, test, [0], measure=measure, out=out.with_name("a.jsonl"), meta={"ids": [3]},
                         progress=False)
    out.write_text("not json\n")
    with pytest.raises(ValueError, match=r"ti.leave_one_out: `out` file .* line 1 is not a leave-one-out record"):
        ti.leave_one_out(train_fn, params, train, test, [0], measure=measure, out=out, progress=False)
