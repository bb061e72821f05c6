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


@pytest.mark.slow
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
    ([0, 10], r"ti.leave_one_out: `indices` ids must lie in \[0, n=10\); got 10 at position 1"),
    ([-1], r"ti.leave_one_out: `indices` ids must lie in \[0, n=10\); got -1"),
    ([1, 1], r"ti.leave_one_out: `indices` repeats a training id"),
    ([0.5], r"ti.leave_one_out: `indices` must hold integer training ids; got dtype torch.float"),
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


def _lines(path):
    return path.read_bytes().splitlines(keepends=True)


def _two_runs(tmp_path):
    """Files of the toy problem for two runs that differ only in `meta`: (path of run a, path of run b)."""
    train_fn, params, train, test, measure, _ = _toy()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    ti.leave_one_out(train_fn, params, train, test, [1, 2], measure=measure, out=a, meta={"run": "a"}, progress=False)
    ti.leave_one_out(train_fn, params, train, test, [3, 4], measure=measure, out=b, meta={"run": "b"}, progress=False)
    return a, b


def _resume(path, indices, meta):
    train_fn, params, train, test, measure, _ = _toy()
    return ti.leave_one_out(train_fn, params, train, test, indices, measure=measure, out=path, meta=meta, progress=False)


def test_every_record_carries_the_run_identity(tmp_path):
    a, b = _two_runs(tmp_path)
    runs_a, runs_b = {r["run"] for r in _records(a)}, {r["run"] for r in _records(b)}
    assert len(runs_a) == len(runs_b) == 1 and runs_a != runs_b
    assert _records(a)[0]["meta"] == {"run": "a"} and all("meta" not in r for r in _records(a)[1:])


def test_another_runs_record_in_the_middle_is_refused_and_the_file_left_alone(tmp_path):
    a, b = _two_runs(tmp_path)
    mixed = _lines(a)[:2] + _lines(b)[1:2] + _lines(a)[2:] + [b'{"id": 9, "val']     # with a torn last line
    a.write_bytes(b"".join(mixed))
    with pytest.raises(ValueError, match=r"ti.leave_one_out: `out` file '.*a.jsonl' line 3 belongs to another run .*"
                                         r"Pass a new `out` path, or delete the file to start over"):
        _resume(a, [1, 2, 3], {"run": "a"})
    assert a.read_bytes() == b"".join(mixed)     # not even the torn last line is cut off


def test_another_runs_records_without_their_base_record_are_refused(tmp_path):
    a, b = _two_runs(tmp_path)
    headless = b"".join(_lines(b)[1:])
    a.write_bytes(headless)
    for meta in ({"run": "a"}, {"run": "b"}):
        with pytest.raises(ValueError, match=r"ti.leave_one_out: `out` file '.*' line 1 is the record of training point 3, "
                                             r"but a file's first record must be its base run \(id -1\).*delete the file"):
            _resume(a, [3], meta)
    assert a.read_bytes() == headless


@pytest.mark.parametrize("token", [b"NaN", b"Infinity", b"-Infinity", b'"0.5"', b"true"])
def test_a_non_finite_or_non_number_value_in_the_file_is_refused(tmp_path, token):
    a, _ = _two_runs(tmp_path)
    lines = _lines(a)
    record = json.loads(lines[2])
    lines[2] = lines[2].replace(json.dumps(record["values"][1]).encode(), token, 1)
    a.write_bytes(b"".join(lines))
    with pytest.raises(ValueError, match=r"`out` file '.*' line 3 holds .* for test point 1.*delete the file"):
        _resume(a, [1, 2], {"run": "a"})


def test_a_repeated_record_is_refused(tmp_path):
    a, _ = _two_runs(tmp_path)
    lines = _lines(a)
    a.write_bytes(b"".join(lines + lines[1:2]))
    with pytest.raises(ValueError, match=r"line 4 repeats training point 1 of line 2"):
        _resume(a, [1, 2], {"run": "a"})


@pytest.mark.parametrize("bad_id", [-1, 6])
@pytest.mark.parametrize("broken_part", ["measure", "params"])
def test_a_non_finite_model_is_never_written(tmp_path, bad_id, broken_part):
    """A retrained model with NaN parameters, or whose measure is NaN (log of a negative), raises naming the removal."""
    train_fn, params, train, test, _, _ = _toy()
    out = tmp_path / "loo.jsonl"

    def log_measure(p, batch):
        return torch.log((batch[0] @ p["w"]).squeeze(-1))

    def broken(p, data):
        retrained = train_fn(p, data)
        if data[0].shape[0] != (10 if bad_id == -1 else 9):
            return retrained
        return {"w": retrained["w"] * (float("nan") if broken_part == "params" else -1.0)}

    ti.leave_one_out(train_fn, params, train, test, [2], measure=log_measure, out=out, progress=False)
    before = out.read_bytes()
    who = "the base run \\(retrained on all of `train`\\)" if bad_id == -1 else "the model retrained without training point 6"
    what = (r"gives a non-finite `measure` on test points \[0, 1, 2\]" if broken_part == "measure"
            else r"\(`train_fn` output\): `params` leaf \('w',\) has non-finite values")
    with pytest.raises(ValueError, match=rf"ti.leave_one_out: {who} {what}"):
        ti.leave_one_out(broken, params, train, test, [6], measure=log_measure, out=tmp_path / "new.jsonl", progress=False)
    assert b"NaN" not in (tmp_path / "new.jsonl").read_bytes()
    if bad_id == 6:
        with pytest.raises(ValueError, match=rf"{who} {what}"):
            ti.leave_one_out(broken, params, train, test, [2, 6], measure=log_measure, out=out, progress=False)
        assert out.read_bytes() == before     # nothing was appended for point 6


def test_a_complete_file_on_a_read_only_folder_is_not_opened_for_writing(tmp_path, monkeypatch):
    import builtins

    import tinfluence.validate.loo as loo_module

    train_fn, params, train, test, measure, calls = _toy()
    folder = tmp_path / "ro"
    folder.mkdir()
    out = folder / "loo.jsonl"
    expected = ti.leave_one_out(train_fn, params, train, test, [1, 2, 5], measure=measure, out=out, progress=False)
    out.write_bytes(out.read_bytes() + b'{"id": 7, "run": "tor')      # a torn record of a point not asked for now
    before, stat = out.read_bytes(), out.stat()
    opened = []

    def read_only_open(file, mode="r", *args, **kwargs):
        opened.append(mode)
        if set(mode) & set("wax+"):
            raise PermissionError(f"read-only: {file}")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(loo_module, "open", read_only_open, raising=False)
    out.chmod(0o444)
    folder.chmod(0o555)
    try:
        calls.clear()
        again = ti.leave_one_out(train_fn, params, train, test, [5, 1], measure=measure, out=out, progress=False)
    finally:
        folder.chmod(0o755)
        out.chmod(0o644)
    assert calls == [] and opened and all(set(m) <= set("rb") for m in opened)
    assert out.read_bytes() == before and (out.stat().st_mtime_ns, out.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    torch.testing.assert_close(again, expected[:, [2, 0]], rtol=0, atol=0)


def test_records_are_read_back_as_checked_on_resume(tmp_path):
    from tinfluence.validate.loo import leave_one_out_records

    _, params, train, test, _, _ = _toy()
    a, b = _two_runs(tmp_path)
    records = leave_one_out_records(a, params, train, test, meta={"run": "a"})
    assert records == {r["id"]: r["values"] for r in _records(a)} and sorted(records) == [-1, 1, 2]
    assert leave_one_out_records(tmp_path / "missing.jsonl", params, train, test) == {}
    with pytest.raises(ValueError, match=r"ti.leave_one_out_records: `out` file .* line 1 was written for another run"):
        leave_one_out_records(b, params, train, test, meta={"run": "a"})
    with pytest.raises(ValueError, match=r"line 1 was written for another run: its base record has dtype='float64', "
                                         r"this call dtype='float32'"):
        leave_one_out_records(a, {"w": params["w"].float()}, train, test, meta={"run": "a"})


def test_meta_must_be_json(tmp_path):
    train_fn, params, train, test, measure, _ = _toy()
    with pytest.raises(TypeError, match=r"ti.leave_one_out: `meta` must be JSON-serializable .* got set"):
        ti.leave_one_out(train_fn, params, train, test, [0], measure=measure, out=tmp_path / "a.jsonl", meta={1, 2})
    assert not (tmp_path / "a.jsonl").exists()
