"""Resumable per-test-point score files: atomic writes, restart after SIGKILL, byte-identical output."""

import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import numpy as np
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


def _index_ids(folder):
    """Test ids of the complete lines of the folder's index."""
    text = (folder / "index.jsonl").read_text() if (folder / "index.jsonl").exists() else ""
    return [json.loads(line)["id"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _stats(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


@pytest.mark.slow
def test_killed_run_resumes_to_identical_files(saved_problem, tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    job = subprocess.Popen(_command(saved_problem, out, 0.3))
    index = out / "index.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (index.exists() and len(index.read_text().splitlines()) >= 4):
        time.sleep(0.05)
    job.send_signal(signal.SIGKILL)
    job.wait()
    finished = len(_index_ids(out))
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
    whole = _files(tmp_path)
    ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=counted, out=tmp_path, test_ids=[5, 0, 2],
                          block_size=2, progress=False)
    assert len(calls) == 2 and _files(tmp_path) == whole
    (tmp_path / "index.jsonl").write_text((tmp_path / "index.jsonl").read_text()[:-7])   # a torn last line
    ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=counted, out=tmp_path, test_ids=[5, 0, 2],
                          block_size=2, progress=False)
    assert len(calls) == 3 and _files(tmp_path) == whole    # 2.npy, without its index line, is computed again


def test_influence_to_files_rejects_bad_ids(digits_lr, tmp_path):
    train, test = ti.take(digits_lr.train, slice(0, 50)), ti.take(digits_lr.test, slice(0, 3))
    with pytest.raises(ValueError, match=r"ti.influence_to_files: `test_ids` must be distinct rows of `test` in \[0, 3\)"):
        ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=lambda v: v, out=tmp_path, test_ids=[0, 3])
    with pytest.raises(ValueError, match="ti.influence_to_files: `block_size` must be an int >= 1; got 0"):
        ti.influence_to_files(digits_lr.loss, digits_lr.params, train, test, ihvp=lambda v: v, out=tmp_path, block_size=0)
    with pytest.raises(ValueError, match=r"ti.io.read_scores: no score file for test ids \[7\]"):
        ti.io.read_scores(tmp_path, [7])


def _limited(problem, out, limit):
    """The score-file job under `ulimit -f limit` (bytes): its completed process."""
    return subprocess.run(_command(problem, out, 0.0), capture_output=True, text=True, timeout=120, check=False,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))


@pytest.mark.slow
def test_a_file_size_limit_never_leaves_a_short_file_counted_as_done(saved_problem, tmp_path):
    """With `ulimit -f` below one score file (1728 bytes) no file is done; below the index's size the
    run stops mid-way. Each run fails with a clear error, and a rerun without the limit completes."""
    out, reference = tmp_path / "out", tmp_path / "reference"
    for limit in (1000, 2400):
        limited = _limited(saved_problem, out, limit)
        assert limited.returncode != 0
        assert re.search(r"OSError: ti.influence_to_files: (writing|appending to) '.*' failed \(.*\); (nothing was|.* is not) "
                         r"counted as done. Check the free space and the file-size limit \(`ulimit -f`\), then rerun the "
                         r"same call to resume", limited.stderr), limited.stderr[-2000:]
        done = _index_ids(out)
        assert (done == []) if limit == 1000 else (0 < len(done) < 20)
        assert all((out / f"{i}.npy").stat().st_size == 1728 for i in done)
        assert not list(out.glob(".*.tmp"))
    subprocess.run(_command(saved_problem, out, 0.0), check=True, timeout=120)
    subprocess.run(_command(saved_problem, reference, 0.0), check=True, timeout=120)
    assert _files(out) == _files(reference)


def _small(digits_lr, dtype=torch.float64, n_train=120):
    """A small problem: (loss, params, train, test, ihvp), in `dtype`."""
    cast = lambda tree: ti.tree.map(lambda t: t.to(dtype) if t.is_floating_point() else t, tree)  # noqa: E731
    params, train, test = cast(digits_lr.params), cast(ti.take(digits_lr.train, slice(0, n_train))), cast(ti.take(digits_lr.test, slice(0, 5)))
    ihvp = ti.direct(ti.hessian(ti.objective(digits_lr.loss, train, l2=digits_lr.l2), params), damping=1e-3)
    return digits_lr.loss, params, train, test, ihvp


def _to_files(problem, out, **kw):
    loss, params, train, test, ihvp = problem
    return ti.influence_to_files(loss, params, train, test, ihvp=kw.pop("ihvp", ihvp), out=out, progress=False,
                                 **{"block_size": 2} | kw)


def test_a_writer_that_cuts_files_short_is_caught_before_the_rename(digits_lr, tmp_path, monkeypatch):
    """Storage that silently drops a file's tail (simulated at fsync) is caught by reading the file back."""
    real_fsync = os.fsync

    def lossy_fsync(fd):
        if ".npy." in os.readlink(f"/proc/self/fd/{fd}"):       # a score file's temporary name: .<id>.npy.<random>.tmp
            os.ftruncate(fd, os.fstat(fd).st_size - 100)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", lossy_fsync)
    with pytest.raises(OSError, match=r"ti.influence_to_files: writing '.*/0.npy' failed \(\d+ of \d+ bytes came back\); "
                                      r"nothing was counted as done"):
        _to_files(_small(digits_lr), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []     # no score file, no index line, no temporary file
    monkeypatch.setattr(os, "fsync", real_fsync)
    _to_files(_small(digits_lr), tmp_path)
    assert _index_ids(tmp_path) == list(range(5))


OTHER_RUN = r"scores of run \w+; this call is run \w+ \(other parameters, test data, block_size or meta\)"


@pytest.mark.parametrize("change, message", [
    ({"params": 1e-9}, OTHER_RUN),
    ({"test": 1e-9}, OTHER_RUN),
    ({"block_size": 3}, OTHER_RUN),
    ({"meta": {"damping": 1e-2}}, OTHER_RUN),
    ({"n_train": 100}, r"float64 scores over n_train=120; this call gives float64 scores over n_train=100"),
    ({"dtype": torch.float32}, r"float64 scores over n_train=120; this call gives float32 scores over n_train=120"),
])
def test_a_folder_of_another_run_is_refused_and_left_alone(digits_lr, tmp_path, change, message):
    _to_files(_small(digits_lr), tmp_path, meta={"damping": 1e-3})
    before = _stats(tmp_path)
    loss, params, train, test, ihvp = _small(digits_lr, change.get("dtype", torch.float64), change.get("n_train", 120))
    if "params" in change:
        params = {k: v + change["params"] for k, v in params.items()}
    if "test" in change:
        test = (test[0] + change["test"], test[1])
    kw = {"meta": change.get("meta", {"damping": 1e-3})} | ({"block_size": change["block_size"]} if "block_size" in change else {})
    with pytest.raises(ValueError, match=r"ti.influence_to_files: folder '.*' holds another run's results "
                                         rf"\(index.jsonl line 1: {message}\). Pass a new `out` folder, or delete "
                                         r"this one to start over"):
        _to_files((loss, params, train, test, ihvp), tmp_path, **kw)
    assert _stats(tmp_path) == before


def test_damaged_files_are_recomputed_with_a_warning_and_refused_by_read_scores(digits_lr, tmp_path):
    problem = _small(digits_lr)
    _to_files(problem, tmp_path)
    whole = _files(tmp_path)
    (tmp_path / "4.npy").write_bytes(whole["4.npy"][:-10])                          # truncated
    flipped = bytearray(whole["1.npy"])
    flipped[-3] ^= 0xFF
    (tmp_path / "1.npy").write_bytes(bytes(flipped))                                # same size, other contents
    size = len(whole["4.npy"])
    assert size == 128 + 120 * 8                                                     # npy header + 120 float64 scores
    with pytest.raises(ValueError, match=rf"ti.io.read_scores: score file '.*/4.npy' \(test id 4\) holds {size - 10} bytes "
                                         rf"where its index line says {size} \(truncated or overwritten\). Rerun "
                                         r"ti.influence_to_files with the same arguments"):
        ti.io.read_scores(tmp_path, [2, 4])
    with pytest.raises(ValueError, match=r"score file '.*/1.npy' \(test id 1\) does not match the sha256 of its index line"):
        ti.io.read_scores(tmp_path, [1])
    torch.testing.assert_close(ti.io.read_scores(tmp_path, [2, 3]), torch.from_numpy(np.stack(
        [np.load(io.BytesIO(whole[f"{i}.npy"])) for i in (2, 3)])), rtol=0, atol=0)
    calls = []
    ihvp = problem[-1]
    counted = lambda v: calls.append(1) or ihvp(v)  # noqa: E731
    with pytest.warns(RuntimeWarning) as caught:
        _to_files(problem, tmp_path, ihvp=counted)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and re.search(r"ti.influence_to_files: score file '.*/1.npy' does not match the sha256 .*; "
                                            r"recomputing it", messages[0]) and f"4.npy' holds {size - 10} bytes" in messages[1]
    assert len(calls) == 2 and _files(tmp_path) == whole                             # blocks [0, 1] and [4]


def test_a_complete_folder_is_only_read(digits_lr, tmp_path):
    problem = _small(digits_lr)
    _to_files(problem, tmp_path)
    before = _stats(tmp_path)
    tmp_path.chmod(0o555)
    try:
        _to_files(problem, tmp_path, ihvp=lambda v: pytest.fail("nothing is left to compute"))
    finally:
        tmp_path.chmod(0o755)
    assert _stats(tmp_path) == before


def test_an_index_that_is_not_ours_is_refused(digits_lr, tmp_path):
    (tmp_path / "index.jsonl").write_text(json.dumps({"id": 0, "file": "../0.npy"}) + "\n" + "{}\n")
    with pytest.raises(ValueError, match=r"ti.influence_to_files: '.*index.jsonl' line 1 is not a score-index entry"):
        _to_files(_small(digits_lr), tmp_path)
    with pytest.raises(ValueError, match=r"ti.io.read_scores: '.*index.jsonl' line 1 is not a score-index entry"):
        ti.io.read_scores(tmp_path)
