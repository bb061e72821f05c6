"""Resumable per-test-point score files: atomic writes, restart after SIGKILL, byte-identical output."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

import tinfluence as ti

SCRIPT = """
import sys, time, torch
import torch.nn.functional as F
import tinfluence as ti
torch.set_num_threads(1)
params, train, test = torch.load(sys.argv[1])
delay = float(sys.argv[3])
def loss(p, b):
    return F.cross_entropy(b[0] @ p["weight"].T + p["bias"], b[1], reduction="none")
H = ti.hessian(ti.objective(loss, train, l2=1e-2), params)
solve = ti.direct(H, damping=1e-3)
def ihvp(v):
    time.sleep(delay)
    return solve(v)
ti.influence_to_files(loss, params, train, test, ihvp=ihvp, out=sys.argv[2], test_ids=range(3, 23), block_size=2,
                      progress=False)
"""


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def saved_problem(digits_lr, tmp_path):
    path = tmp_path / "problem.pt"
    torch.save((digits_lr.params, ti.take(digits_lr.train, slice(0, 200)), ti.take(digits_lr.test, slice(0, 30))), path)
    return path


def _command(problem, out, delay):
    return [sys.executable, "-c", SCRIPT, str(problem), str(out), str(delay)]


def test_killed_run_resumes_to_identical_files(saved_problem, tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    job = subprocess.Popen(_command(saved_problem, out, 0.3))
    index = out / "index.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (index.exists() and len(index.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = len(ti.io.ScoreWriter(out).done)
    assert 4 <= finished < 20, "the run must be killed mid-way"
    subprocess.run(_command(saved_problem, out, 0.0), check=True, timeout=120)
    subprocess.run(_command(saved_problem, reference, 0.0), check=True, timeout=120)
    assert _files(out) == _files(reference)
    assert [json.loads(line)["id"] for line in (out / "index.jsonl").read_text().splitlines()] == list(range(3, 23))


def test_files_hold_influence_rows_and_skip_finished(digits_lr, tmp_path):
    train, test = ti.take(digits_lr.train, slice(0, 200)), ti.take(digits_lr.test, slice(0, 6))
    ihvp = ti.direct(ti.hessian(digits_lr.objective(train), digits_lr.params), damping=1e-3)
    calls = []
    counted = lambda v: calls.append(1) or ihvp(v)  # noqa: E731
    ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=counted, out=tmp_path, test_ids=[5, 0, 2],
                          block_size=2, progress=False)
    expected = ti.influence(digits_lr.loss, digits_lr.params, train, ti.take(test, torch.tensor([5, 0, 2])), ihvp=ihvp)
    # blocks of 2 test points vs 3 at once take other BLAS paths: round-off relative to the row's scale
    torch.testing.assert_close(ti.io.read_scores(tmp_path), expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))
    assert len(calls) == 2
    (tmp_path / "index.jsonl").write_text((tmp_path / "index.jsonl").read_text()[:-7])   # a torn last line
    assert ti.io.ScoreWriter(tmp_path).done == {5, 0, 2}
    ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=counted, out=tmp_path, test_ids=[5, 0, 2],
                          block_size=2, progress=False)
    assert len(calls) == 2


def test_influence_to_files_rejects_bad_ids(digits_lr, tmp_path):
    train, test = ti.take(digits_lr.train, slice(0, 50)), ti.take(digits_lr.test, slice(0, 3))
    with pytest.raises(ValueError, match=r"ti.influence_to_files: `test_ids` must be distinct rows of `test` in \[0, 3\)"):
        ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=lambda v: v, out=tmp_path, test_ids=[0, 3])
    with pytest.raises(ValueError, match="ti.influence_to_files: `block_size` must be an int >= 1; got 0"):
        ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=lambda v: v, out=tmp_path, block_size=0)
    with pytest.raises(ValueError, match=r"ti.io.read_scores: no score file for test ids \[7\]"):
        ti.io.read_scores(tmp_path, [7])
