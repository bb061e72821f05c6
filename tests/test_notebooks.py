"""Every notebook in notebooks/ runs top to bottom without error, matches its .py twin, and shows its figures."""

import importlib.util
import shutil
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow   # executes every notebook: the fast subset (-m "not slow") leaves it out

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
WITH_FIGURES = {"quickstart", "figure2", "mislabels", "language_model", "deep_models"}


def _build_module():
    spec = importlib.util.spec_from_file_location("notebooks_build", FOLDER / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _build_module()
NAMES = build.scripts()


def test_every_script_has_a_notebook():
    assert NAMES, "no notebook scripts found"
    assert sorted(p.stem for p in FOLDER.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_matches_its_script(name):
    nb = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
    assert [(c.cell_type, c.source) for c in nb.cells] == build.read_script(FOLDER / f"{name}.py"), \
        f"{name}.ipynb is out of date: run python notebooks/build.py {name}"


@pytest.mark.parametrize("name", NAMES)
def test_committed_outputs(name):
    nb = nbformat.read(FOLDER / f"{name}.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert all(c.execution_count for c in nb.cells if c.cell_type == "code"), f"{name}.ipynb was not executed"
    assert not [o for o in outputs if o.output_type == "error"]
    if name in WITH_FIGURES:
        assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}.ipynb has no figure in its outputs"


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, tmp_path):
    shutil.copy(FOLDER / f"{name}.ipynb", tmp_path)
    nb = nbformat.read(tmp_path / f"{name}.ipynb", as_version=4)
    tic = time.perf_counter()
    build.execute(nb, tmp_path)          # raises CellExecutionError on any error
    print(f"{name}: executed in {time.perf_counter() - tic:.1f} s")
    if name in WITH_FIGURES:
        assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
