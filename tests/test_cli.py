"""The `tinfluence` command and the plots it draws."""

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from importlib import metadata

import numpy as np
import pytest
import torch

import tinfluence as ti
from tinfluence.cli import main

pytestmark = pytest.mark.slow   # runs the demo end to end: the fast subset (-m "not slow") leaves it out


def test_demo_writes_every_file_and_direct_influence_tracks_leave_one_out(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tinfluence", "demo", "--test-ids", "0", "1", "--top-k", "8",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("figure2.png", *(f"top_examples_{m}.png" for m in ("direct", "cg", "lissa", "tracin", "empirical")),
                 "scores.npz", "loo.jsonl", "table.json"):
        assert (out / name).stat().st_size > 0, name
    rows = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+)\s+(-?\d\.\d+)\s", done.stdout, re.M)}
    assert set(rows) == {"direct", "cg", "lissa", "tracin", "empirical"}, done.stdout
    assert rows["direct"] >= 0.95, done.stdout
    assert "TracIn checkpoints: recorded by the demo" in done.stdout
    saved = np.load(out / "scores.npz")
    assert saved["scores_direct"].shape == (2, 1000) and list(saved["test_ids"]) == [0, 1]
    np.testing.assert_array_equal(saved["train_ids"], np.arange(1000))
    ids = [json.loads(line)["id"] for line in (out / "loo.jsonl").read_text().splitlines()]
    assert ids[0] == -1 and sorted(ids[1:]) == sorted(saved["retrained_ids"].tolist()) and len(set(ids)) == len(ids)


def test_distributed_demo_gives_the_single_process_scores(tmp_path):
    """`torchrun --nproc_per_node=2 -m tinfluence demo --distributed` shards the scoring (gloo on
    loopback) and writes the same scores and leave-one-out table as one process."""
    common = ["demo", "--method", "direct", "cg", "tracin", "empirical", "--test-ids", "4", "--top-k", "5", "--no-progress"]
    runs = {}
    for name, launcher in [("single", [sys.executable, "-m", "tinfluence"]),
                           ("sharded", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node=2", "-m", "tinfluence"])]:
        out = tmp_path / name
        extra = ["--distributed"] if name == "sharded" else []
        done = subprocess.run([*launcher, *common, *extra, "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = np.load(out / "scores.npz")
    one, two = runs["single"], runs["sharded"]
    for method in ("direct", "tracin", "empirical"):
        np.testing.assert_allclose(two[f"scores_{method}"], one[f"scores_{method}"], rtol=1e-10, atol=1e-16)
    # CG stops at relative residual 1e-8; the sharded sums only reorder floating-point additions
    np.testing.assert_allclose(two["scores_cg"], one["scores_cg"], rtol=0, atol=1e-8 * np.abs(one["scores_cg"]).max())
    np.testing.assert_array_equal(two["retrained_ids"], one["retrained_ids"])
    np.testing.assert_allclose(two["actual"], one["actual"], rtol=1e-12, atol=1e-16)


def test_distributed_flag_outside_torchrun_is_explained(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--out", str(tmp_path), "--distributed"])
    assert stop.value.code == 2
    assert "argument --distributed: start the processes with torchrun" in capsys.readouterr().err


SMALL = ["demo", "--method", "direct", "cg", "--test-ids", "0", "1", "2", "--top-k", "6"]   # 19 models, ~10 s


def _demo(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    return subprocess.Popen([sys.executable, "-m", "tinfluence", *args], stdout=stdout, stderr=stderr, text=True)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """An uninterrupted reduced-size demo run, with its progress bar: (folder, stdout, stderr)."""
    out = tmp_path_factory.mktemp("small") / "run"
    job = _demo([*SMALL, "--out", str(out)])
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    return out, stdout, stderr


def _snapshot(folder):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def _loo(folder):
    """The complete records of the folder's loo.jsonl, in file order."""
    text = (folder / "loo.jsonl").read_text() if (folder / "loo.jsonl").exists() else ""
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def test_the_text_and_the_progress_bar_count_the_same_models(small_run):
    out, stdout, stderr = small_run
    models = len(_loo(out))
    assert models == len(np.load(out / "scores.npz")["retrained_ids"]) + 1
    assert f"leave-one-out: {models} models, the base run and {models - 1} removals" in stdout
    assert f"retraining {models} models ..." in stdout and "resumed" not in stdout
    assert re.search(rf"leave-one-out models: 100%.* {models}/{models} ", stderr), stderr[-500:]
    assert json.loads((out / "run.json").read_text())["test_ids"] == [0, 1, 2]


@pytest.mark.parametrize("other", [["--test-ids", "3", "4"], ["--top-k", "5"], ["--method", "direct"], ["--seed", "1"],
                                   "no run.json"])
def test_a_folder_of_other_settings_is_refused_and_left_alone(small_run, tmp_path, capsys, other):
    out = tmp_path / "run"
    shutil.copytree(small_run[0], out)
    args = {"--test-ids": [*SMALL[:4], *other, *SMALL[7:]], "--top-k": [*SMALL[:8], *other],
            "--method": [*SMALL[:1], *other, *SMALL[4:]], "--seed": [*SMALL, *other]}.get(other[0], SMALL)
    if other == "no run.json":          # a folder from a version before run.json
        (out / "run.json").unlink()
    before = _snapshot(out)
    with pytest.raises(SystemExit) as stop:
        main([*args, "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    held = ("the demo's files \\(figure2.png, top_examples_direct.png, top_examples_cg.png, scores.npz, loo.jsonl, table.json\\) "
            "without a readable "
            "run.json \\(an older version's run\\)" if other == "no run.json" else
            r"results of a run with other settings \(--method direct cg --test-ids 0 1 2 --top-k 6 --seed 0\)")
    assert stop.value.code == 2 and re.search(
        rf"tinfluence demo: error: argument --out: .*run holds {held}; this command has --method .*\. Nothing was "
        r"changed\. Name a new folder with --out, or pass --fresh to delete that run's files \(figure2.png, "
        r"top_examples_direct.png, top_examples_cg.png, top_examples_lissa.png, top_examples_tracin.png, "
        r"top_examples_empirical.png, scores.npz, loo.jsonl, table.json, run.json\) in .* and start afresh", err), err
    assert _snapshot(out) == before


@pytest.mark.slow
def test_fresh_replaces_only_the_demos_own_files(small_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(small_run[0], out)
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--method", "direct", "--test-ids", "5", "--top-k", "3", "--out", str(out), "--fresh",
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"--fresh: deleted the demo's earlier files in {out}; starting afresh.")
    assert (out / "notes.txt").read_text() == "mine"
    records = _loo(out)
    assert records[0]["meta"]["test_ids"] == [5] and len(records) == 4 and not list(out.glob(".writing-*"))


@pytest.mark.slow
def test_a_damaged_leave_one_out_file_is_refused_and_left_alone(small_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(small_run[0], out)
    lines = (out / "loo.jsonl").read_text().splitlines(keepends=True)
    (out / "loo.jsonl").write_text("".join(lines + lines[2:3]))            # line 3 repeated at the end
    before = _snapshot(out)
    assert main([*SMALL, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"^tinfluence demo: error: ti.leave_one_out_records: `out` file '.*loo.jsonl' line {len(lines) + 1} "
                     r"repeats training point \d+ of line 3\. .* Or pass --fresh to start .* afresh\.$", err), err
    assert _snapshot(out) == before


def _wait_for(job, ready, timeout=120):
    deadline = time.time() + timeout
    while job.poll() is None and not ready() and time.time() < deadline:
        time.sleep(0.005)


def _interrupt(args, out, log, how, ready, pause):
    """Starts the demo and sends `how` `pause` seconds after `ready()` holds; returns (rc, stderr)."""
    with open(log, "w") as stdout:
        job = _demo([*args, "--out", str(out)], stdout=stdout)
        _wait_for(job, ready)
        time.sleep(pause)
        assert job.poll() is None, "the run ended before it could be interrupted"
        job.send_signal(how)
        _, stderr = job.communicate(timeout=120)
    return job.returncode, stderr


@pytest.mark.slow
def test_interrupted_and_killed_runs_resume_to_the_uninterrupted_table(small_run, tmp_path):
    """SIGINT during retraining, then SIGKILL at a random moment from scoring on; the reruns say what
    they resume, and the last gives the uninterrupted run's table and records."""
    reference, _, _ = small_run
    models = len(_loo(reference))
    rng = random.Random(2026)
    out, log, args = tmp_path / "run", tmp_path / "stdout.txt", [*SMALL, "--no-progress"]
    lines = lambda: len(_loo(out))  # noqa: E731
    consistent = lambda: {r["id"]: r["values"] for r in _loo(out)}.items() <= {  # noqa: E731
        r["id"]: r["values"] for r in _loo(reference)}.items()
    target = rng.randint(1, models // 2)
    rc, stderr = _interrupt(args, out, log, signal.SIGINT, lambda: lines() >= target, rng.uniform(0, 0.05))
    assert rc == 130 and stderr == "interrupted; rerun the same command to resume\n", stderr
    assert f"retraining {models} models" in log.read_text() and 0 < lines() < models and consistent()
    start = lines()
    rc, _ = _interrupt(args, out, log, signal.SIGKILL, lambda: "digits:" in log.read_text(), rng.uniform(0, 1.5))
    assert rc == -signal.SIGKILL and log.read_text().startswith(
        f"{out} holds a run with the same settings (run.json): resuming it")
    assert start <= lines() <= models and consistent()   # the kill may land after the last model, while writing
    start = lines()
    job = _demo([*args, "--out", str(out)])
    stdout, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.index(f"resumed {start}/{models} models") < stdout.index("leave-one-out: retrained")
    assert _loo(out) == _loo(reference)
    table = lambda folder: [{k: v for k, v in row.items() if k != "seconds"}  # noqa: E731
                            for row in json.loads((folder / "table.json").read_text())["rows"]]
    assert table(out) == table(reference)
    np.testing.assert_array_equal(np.load(out / "scores.npz")["actual"], np.load(reference / "scores.npz")["actual"])


def test_ctrl_c_says_how_to_resume(monkeypatch, tmp_path, capsys):
    import tinfluence.demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tinfluence.demo, "run", interrupted)
    assert main(["demo", "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    assert capsys.readouterr().err == "interrupted; rerun the same command to resume\n"


def test_version(capsys):
    import tomllib

    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"tinfluence {metadata.version('tinfluence')}\n"
    assert metadata.version("tinfluence") == declared


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "demo" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--method", "direct", "newton"], r"argument --method: invalid choice: newton \(choose from direct, cg, lissa, tracin, empirical\)"),
    (["--method", "cg", "cg"], r"argument --method: each method may appear once; got cg cg"),
    (["--test-ids", "0", "797"], r"argument --test-ids: 797 is out of range; the digits test set has 797 points \(ids 0 to 796\)"),
    (["--test-ids", "3", "3"], r"argument --test-ids: each id may appear once; got 3 3"),
    (["--top-k", "0"], r"argument --top-k: must be between 2 and 1000 \(the training set size\); got 0"),
    (["--threads", "0"], r"argument --threads: must be >= 1; got 0"),
])
def test_bad_arguments(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and re.search(message, err.replace("'", ""))   # argparse quotes choices in some versions, err
    assert err.startswith("usage: tinfluence demo")


def test_unwritable_output_folder(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--out", str(blocker / "run")])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    assert re.search(r"argument --out: cannot write to '.*a_file/run' \(.*\); choose a folder you can write to", err), err


def test_loo_scatter_and_top_examples_and_hist(tmp_path, generator):
    actual = torch.randn(2, 30, generator=generator)
    predicted = {"a": actual + 0.1 * torch.randn(2, 30, generator=generator), "b": 5.0 * actual}
    fig = ti.plot.loo_scatter(actual, predicted, labels=["t0", "t1"], scale_free=["b"], path=tmp_path / "s.png")
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    r = ti.pearson(predicted["a"], actual)
    assert titles == [f"a, t0: Pearson {r[0]:.3f}", f"a, t1: Pearson {r[1]:.3f}", "b, t0: Pearson 1.000",
                      "b, t1: Pearson 1.000"]
    images = torch.rand(20, 8, 8, generator=generator)
    scores = torch.linspace(-1, 1, 20)
    fig = ti.plot.top_examples(images, scores, images[0], k=3, labels=torch.arange(20), path=tmp_path / "t.png")
    shown = [ax.get_title() for ax in fig.axes if ax.get_visible()][1:]
    assert [t.split()[0] for t in shown] == ["#19", "#18", "#17", "#0", "#1", "#2"]
    ti.plot.score_hist({"a": scores}, path=tmp_path / "h.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("s.png", "t.png", "h.png"))


@pytest.mark.parametrize("call, match", [
    (lambda: ti.plot.loo_scatter(torch.zeros(3), {}), r"ti.plot.loo_scatter: `predicted` is empty"),
    (lambda: ti.plot.loo_scatter(torch.zeros(3), {"a": torch.zeros(4)}),
     r"ti.plot.loo_scatter: scores of 'a' must be shaped like `actual` \[\[3\]\]; got \[\[4\]\]"),
    (lambda: ti.plot.top_examples(torch.zeros(5, 2, 2), torch.zeros(4), torch.zeros(2, 2)),
     r"ti.plot.top_examples: `scores` must be \[n_train\] = \[5\] \(one test point's row\); got \[4\]"),
    (lambda: ti.plot.top_examples(torch.zeros(5, 2, 2), torch.zeros(5), torch.zeros(2, 2), k=6),
     r"ti.plot.top_examples: `k` must be an int in \[1, 5\]; got 6"),
    (lambda: ti.plot.score_hist({}), r"ti.plot.score_hist: `scores` is empty"),
])
def test_plot_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
