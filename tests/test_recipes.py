"""The documentation's recipes run as written (each asserts its own result)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # runs every recipe script: the fast subset (-m "not slow") leaves it out

RECIPES = Path(__file__).resolve().parents[1] / "docs" / "recipes"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*command, timeout=300):
    done = subprocess.run(command, cwd=RECIPES.parents[1], env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_convex_recipe():
    out = _run(sys.executable, str(RECIPES / "convex.py"))
    assert "Pearson(influence, actual leave-one-out change)" in out


def test_deep_float32_recipe():
    out = _run(sys.executable, str(RECIPES / "deep_float32.py"))
    assert "all converged: True" in out


def test_mislabels_ekfac_recipe():
    out = _run(sys.executable, str(RECIPES / "mislabels_ekfac.py"))
    assert "flipped labels among the top 100 of self-influence" in out


def test_huggingface_recipe():
    pytest.importorskip("transformers")
    out = _run(sys.executable, str(RECIPES / "huggingface.py"))
    assert "most helpful training windows for query 0" in out


def test_large_data_recipe():
    out = _run(sys.executable, str(RECIPES / "large_data.py"))
    assert "fraction of the top-5 helpful training digits with the query's label" in out


@pytest.mark.slow
def test_distributed_recipe():
    out = _run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(RECIPES / "distributed.py"))
    assert "2 ranks: scores [4, 1000]" in out
