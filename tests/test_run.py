"""`tinfluence run TASK.py`: the pipeline for a user's own model, end to end on reduced sizes."""

import csv
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import tinfluence as ti
from tinfluence.cli import main
from tinfluence.pipeline import load_task

pytestmark = pytest.mark.slow   # runs the pipeline end to end: the fast subset (-m "not slow") leaves it out

ROOT = Path(__file__).resolve().parent.parent
MULTIMODAL = str(ROOT / "examples" / "multimodal.py")
MNIST_LIKE = str(ROOT / "examples" / "mnist_like.py")
SMALL_ENV = {"TINFLUENCE_EXAMPLE_N": "150"}
SMALL = ["run", MULTIMODAL, "--method", "cg", "--test-ids", "0", "1", "--top-k", "2"]


def _env(extra=SMALL_ENV):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


def _start(args, out, stdout=subprocess.PIPE, env=None):
    return subprocess.Popen([sys.executable, "-m", "tinfluence", *args, "--out", str(out)], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=env or _env())


def _loo(folder):
    """The complete records of loo.jsonl, in file order."""
    path = Path(folder) / "loo.jsonl"
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def _table(folder):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in json.loads((Path(folder) / "table.json").read_text())["rows"]]


def _results(folder):
    """Every result file's bytes, except those holding timings (table.json: compared by `_table`)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in ("table.json",) and p.suffix != ".png"}


def _snapshot(folder):
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted reduced-size multimodal run: (folder, stdout, seconds)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    tic = time.perf_counter()
    job = _start([*SMALL, "--no-progress"], out)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    return out, stdout, time.perf_counter() - tic


def test_multimodal_task_runs_end_to_end(reference):
    out, stdout, _ = reference
    for name in ("run.json", "model.pt", "loo.jsonl", "figure2.png", "top_examples_cg.png", "table.json", "changes.csv",
                 "scores/cg/index.jsonl", "scores/cg/0.npy", "scores/cg/1.npy"):
        assert (out / name).stat().st_size > 0, name
    records = _loo(out)
    ids = [r["id"] for r in records]
    assert ids[0] == -1 and len(set(ids)) == len(ids)
    assert f"retraining {len(ids)} models ..." in stdout and "resumed" not in stdout
    with open(out / "changes.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["train_id"]) for r in rows}) == sorted(ids[1:])
    base = records[0]["values"]
    by_id = {r["id"]: r["values"] for r in records}
    for r in rows:                                   # the table's actual change is the records' difference
        t = [0, 1].index(int(r["test_id"]))
        assert float(r["actual"]) == by_id[int(r["train_id"])][t] - base[t]
    assert "most harmful training points by cg" in stdout


def test_scores_match_a_dense_hessian_solve(reference):
    """The pipeline's CG scores at its saved θ̂ equal classic influence with a dense (damped) Cholesky solve."""
    out = reference[0]
    os.environ.update(SMALL_ENV)
    try:
        task = load_task(MULTIMODAL)
    finally:
        del os.environ["TINFLUENCE_EXAMPLE_N"]
    params = torch.load(out / "model.pt", weights_only=True)
    R = ti.objective(task.loss, task.train, l2=task.l2)
    expected = ti.influence(task.loss, params, task.train, ti.take(task.test, torch.tensor([0, 1])),
                            ihvp=ti.direct(ti.hessian(R, params), damping=task.damping))
    got = ti.io.read_scores(out / "scores" / "cg", [0, 1])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_a_rerun_resumes_everything_and_changes_no_result(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    before = _results(out)
    job = _start([*SMALL, "--no-progress"], out)
    stdout, stderr = job.communicate(timeout=300)
    models = len(_loo(out))
    assert job.returncode == 0, stderr[-3000:]
    assert "holds a run with the same task and settings (run.json): resuming it" in stdout
    assert "model: θ̂ loaded from" in stdout and "scores cg: resumed 2/2 test points" in stdout
    assert f"resumed {models}/{models} models" in stdout
    assert _results(out) == before and _table(out) == _table(reference[0])


@pytest.mark.parametrize("other", ["another task", "--top-k 3", "--test-ids 0 2", "no run.json"])
def test_a_folder_of_another_task_or_other_settings_is_refused_and_left_alone(reference, tmp_path, capsys, other,
                                                                               monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    if other == "no run.json":
        (out / "run.json").unlink()
    before = _snapshot(out)
    monkeypatch.setenv("TINFLUENCE_EXAMPLE_N", "150")
    args = {"another task": ["run", "digits", "--method", "direct", "--top-k", "2"],
            "--top-k 3": [*SMALL[:-1], "3"], "--test-ids 0 2": [*SMALL[:5], "0", "2", *SMALL[7:]]}.get(other, SMALL)
    assert main([*args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    held = (r"tinfluence run's files \(model.pt, scores, loo.jsonl, .*\) without a readable run.json"
            if other == "no run.json" else r"results of a run with other settings \(task multimodal \(multimodal.py, ")
    assert re.search(rf"^tinfluence run: error: .*run holds {held}.*; this command has task .*\. Nothing was changed\. "
                     r"Name a new folder with --out, or pass --fresh to delete that run's files \(model.pt, scores, "
                     r"loo.jsonl, .*run.json\) in .* and start afresh\.$", err), err
    assert _snapshot(out) == before


def _wait_for(job, ready, timeout=120):
    deadline = time.time() + timeout
    while job.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.005)


@pytest.mark.slow
def test_killed_and_interrupted_runs_resume_to_the_uninterrupted_results(reference, tmp_path):
    """SIGINT and SIGKILL at random moments of a run (training, scoring, retraining, writing); each
    rerun says what it resumes, nothing is lost or repeated, and the last equals the uninterrupted run."""
    ref, printed, _ = reference
    seconds = float(re.search(r"\(total ([\d.]+) s\)", printed).group(1))     # from the task's first line to the end
    reference_records = _loo(ref)
    rng = random.Random(20)
    out, log = tmp_path / "run", tmp_path / "stdout.txt"
    cut_short = 0                       # runs stopped before their last line
    for how in (signal.SIGINT, signal.SIGKILL, signal.SIGINT, signal.SIGKILL):
        with open(log, "w") as stdout:
            job = _start([*SMALL, "--no-progress"], out, stdout=stdout)
            _wait_for(job, lambda: "multimodal:" in log.read_text())      # the task file is loaded
            time.sleep(rng.uniform(0.02, 0.7) * seconds)
            if job.poll() is None:
                job.send_signal(how)
            _, stderr = job.communicate(timeout=300)
        if job.returncode == 0:
            break
        if how == signal.SIGINT:
            # -SIGINT only when the signal landed after the run's last line, while the interpreter was exiting
            assert job.returncode == -signal.SIGINT and "wrote " in log.read_text() or job.returncode == 130 and \
                stderr.endswith("interrupted; rerun the same command to resume\n"), (job.returncode, stderr, log.read_text())
        else:
            assert job.returncode == -signal.SIGKILL
        cut_short += "wrote " not in log.read_text()
        records = _loo(out)
        assert records == reference_records[:len(records)]             # nothing repeated, nothing different
    assert cut_short >= 1
    start = len(_loo(out))
    job = _start([*SMALL, "--no-progress"], out)
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    if start:
        assert f"resumed {start}/{len(reference_records)} models" in stdout
    assert _loo(out) == reference_records
    assert _results(out) == _results(ref) and _table(out) == _table(ref)
    assert not list(out.glob(".writing-*"))


@pytest.mark.slow
def test_the_digits_task_gives_the_demos_table(tmp_path):
    args = ["--method", "direct", "cg", "--top-k", "4"]
    for command in (["demo"], ["run", "digits"]):
        job = _start([*command, *args, "--no-progress"], tmp_path / command[-1], env=_env({}))
        _, stderr = job.communicate(timeout=300)
        assert job.returncode == 0, stderr[-3000:]
    assert _table(tmp_path / "digits") == _table(tmp_path / "demo")
    assert [r["values"] for r in _loo(tmp_path / "digits")] == [r["values"] for r in _loo(tmp_path / "demo")]


def _fashion_mnist_missing():
    folder = os.environ.get("TINFLUENCE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
    return not os.path.exists(os.path.join(folder, "train-images-idx3-ubyte.gz"))


@pytest.mark.slow
@pytest.mark.skipif(_fashion_mnist_missing(), reason="Fashion-MNIST is not installed: "
                    "sudo apt-get install dataset-fashion-mnist")
def test_fashion_mnist_task_runs_end_to_end(tmp_path):
    job = _start(["run", MNIST_LIKE, "--test-ids", "0", "--top-k", "2", "--no-progress"], tmp_path / "run",
                 env=_env({"TINFLUENCE_EXAMPLE_N": "500"}))
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert "fashion-mnist: 500 training / 100 test points, 7850 parameters" in stdout
    assert len(_loo(tmp_path / "run")) == 3 and (tmp_path / "run" / "top_examples_cg.png").stat().st_size > 0


def test_missing_fashion_mnist_is_explained(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TINFLUENCE_FASHION_MNIST", str(tmp_path / "nowhere"))
    assert main(["run", MNIST_LIKE, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST is not installed" in err and "apt-get install dataset-fashion-mnist" in err
    assert not (tmp_path / "run").exists()


TASK = '''
import torch, torch.nn.functional as F
import tinfluence as ti

apply, params = ti.functionalize(torch.nn.Linear(3, 2).double())
g = torch.Generator().manual_seed(0)
train = (torch.randn(20, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (20,), generator=g))
test = (torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (5,), generator=g))
def loss(params, batch):
    return F.cross_entropy(apply(params, batch[0]), batch[1], reduction="none")
'''


@pytest.mark.parametrize("edit, message", [
    ("del loss", r"`loss` is missing; define `def loss\(params, batch\): ...` returning one loss per example, shape \[B\]"),
    ("del train", r"`train` is missing; define a data set: a pytree of tensors"),
    ("train = lambda: None", r"`train` must be a data set: a pytree of tensors .* \(a training function goes in `fit`\); "
                             "got function"),
    ("test = (torch.zeros(5, 3), torch.zeros(4))", r"`test` must hold tensors with one shared, non-zero leading example axis"),
    ("params = [1, 2]", r"`params` must be a dict of tensors, e.g. `apply, params = ti.functionalize\(model\)`"),
    ("loss = 3", r"`loss` must be `def loss\(params, batch\)"),
    ("method = 'newton'", r"`method` must be one of direct, cg, lissa, tracin, empirical, grad_dot"),
    ("method = 'tracin'", r"`checkpoints` is missing, and method 'tracin' needs it"),
    ("test_ids = [0, 5]", r"`test_ids` must be distinct ids into `test` \(0 to 4\); got \[0, 5\]"),
    ("top_k = 21", r"`top_k` must be between 2 and 20 \(the training set size\); got 21"),
    ("l2 = -1", r"`l2` must be >= 0; got -1.0"),
    ("fit = 'adam'", r"`fit` must be a function `\(params, data\) -> params` that trains starting from `params`; got 'adam'"),
    ("checkpoint = 'nowhere.pt'", r"`checkpoint` names '.*nowhere.pt', which cannot be read"),
    ("raise RuntimeError('no data here')", r"task file '.*task.py' raised RuntimeError: no data here"),
])
def test_task_file_errors_name_the_field_and_the_fix(tmp_path, capsys, edit, message):
    path = tmp_path / "task.py"
    path.write_text(TASK + edit + "\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^tinfluence run: (task file '.*task.py': )?{message}", err), err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_is_loaded_instead_of_training(tmp_path, capsys):
    """A task naming a checkpoint skips training: θ̂ is the file's parameters, and the scores are theirs."""
    path = tmp_path / "task.py"
    path.write_text(TASK + "l2 = 1e-2\nmethod = 'direct'\n")
    task = load_task(path)
    trained = ti.minimize(ti.objective(task.loss, task.train, l2=1e-2), task.params, gtol=1e-12, newton_steps=5)
    torch.save(trained, tmp_path / "trained.pt")
    path.write_text(TASK + "l2 = 1e-2\nmethod = 'direct'\ncheckpoint = 'trained.pt'\ntop_k = 2\n")
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert "model: the task's trained parameters (trained.pt)" in capsys.readouterr().out
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    R = ti.objective(task.loss, task.train, l2=1e-2)
    expected = ti.influence(task.loss, trained, task.train, ti.take(task.test, torch.tensor([0, 1, 2])),
                            ihvp=ti.cg(ti.hvp(R, trained), tol=1e-12, maxiter=100))
    torch.testing.assert_close(ti.io.read_scores(tmp_path / "run" / "scores" / "direct", [0, 1, 2]), expected,
                               rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_fresh_replaces_only_the_pipelines_own_files(reference, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    (out / "notes.txt").write_text("mine")
    monkeypatch.setenv("TINFLUENCE_EXAMPLE_N", "150")
    assert main(["run", MULTIMODAL, "--method", "cg", "--test-ids", "3", "--top-k", "2", "--out", str(out), "--fresh",
                 "--no-progress"]) == 0
    assert capsys.readouterr().out.startswith(f"--fresh: deleted this pipeline's earlier files in {out}; starting afresh.")
    assert (out / "notes.txt").read_text() == "mine"
    records = _loo(out)
    assert records[0]["meta"]["test_ids"] == [3] and len(records) == 3
    assert sorted(p.name for p in (out / "scores" / "cg").iterdir()) == ["3.npy", "index.jsonl"]


def test_ctrl_c_in_a_run_says_how_to_resume(monkeypatch, tmp_path, capsys):
    import tinfluence.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinfluence.pipeline, "run_task", interrupted)
    assert main(["run", "digits", "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"


def test_help_lists_run(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["run", "--help"])
    assert stop.value.code == 0 and "TASK" in capsys.readouterr().out
