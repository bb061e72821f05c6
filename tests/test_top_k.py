"""A retrained set of one point has no correlation: top_k = 1 is refused before any work, in the
demo, in task files and on the command line (before, the run retrained every model and then
failed inside ti.pearson)."""

import textwrap
import time

import pytest

import tinfluence.demo as demo
from tinfluence.cli import main
from tinfluence.pipeline import TaskError, load_task

TASK = """
import torch, torch.nn.functional as F
import tinfluence as ti
x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
train, test = (x[:24], (x[:24, 0] > 0).long()), (x[24:], (x[24:, 0] > 0).long())
apply, params = ti.functionalize(torch.nn.Linear(4, 2).double())
def loss(params, batch):
    return F.cross_entropy(apply(params, batch[0]), batch[1], reduction="none")
method, top_k = ["direct"], {top_k}
"""


def test_demo_run_refuses_top_k_1_before_training(tmp_path):
    tic = time.perf_counter()
    with pytest.raises(ValueError, match=r"ti\.demo\.run: `top_k` must be an int in \[2, 1000\]; got 1"):
        demo.run(["direct"], [0], 1, str(tmp_path), progress=False, echo=lambda line: None)
    assert time.perf_counter() - tic < 1.0          # refused before the model is trained
    assert list(tmp_path.iterdir()) == []


def test_task_file_with_top_k_1_is_refused(tmp_path):
    path = tmp_path / "task.py"
    path.write_text(textwrap.dedent(TASK.format(top_k=1)))
    with pytest.raises(TaskError, match=r"`top_k` must be between 2 and 24"):
        load_task(path)
    path.write_text(textwrap.dedent(TASK.format(top_k=2)))
    assert load_task(path).top_k == 2


def test_cli_demo_refuses_top_k_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["demo", "--method", "direct", "--test-ids", "0", "--top-k", "1", "--out", str(tmp_path), "--no-progress"])
    assert stop.value.code == 2
    assert "argument --top-k: must be between 2 and 1000" in capsys.readouterr().err
