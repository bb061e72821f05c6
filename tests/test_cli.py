"""The `tinfluence` command and the plots it draws."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import tinfluence as ti
from tinfluence.cli import main


def test_demo_writes_every_file_and_direct_influence_tracks_leave_one_out(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tinfluence", "demo", "--test-ids", "0", "1", "--top-k", "8",
                           "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("figure2.png", "top_examples.png", "scores.npz", "loo.jsonl", "table.json"):
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


def test_help_lists_the_demo(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0 and "demo" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--method", "direct", "newton"], r"argument --method: invalid choice: newton \(choose from direct, cg, lissa, tracin, empirical\)"),
    (["--method", "cg", "cg"], r"argument --method: each method may appear once; got cg cg"),
    (["--test-ids", "0", "797"], r"argument --test-ids: 797 is out of range; the digits test set has 797 points \(ids 0 to 796\)"),
    (["--test-ids", "3", "3"], r"argument --test-ids: each id may appear once; got 3 3"),
    (["--top-k", "0"], r"argument --top-k: must be between 1 and 1000 \(the training set size\); got 0"),
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
     r"ti.plot.top_examples: `k` must be between 1 and 5; got 6"),
    (lambda: ti.plot.score_hist({}), r"ti.plot.score_hist: `scores` is empty"),
])
def test_plot_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
