"""Builds each notebook from its plain-text twin and executes it, so the committed .ipynb carries outputs.

Every notebook `notebooks/NAME.ipynb` is generated from `notebooks/NAME.py`, a percent-format
script: `# %%` starts a code cell, `# %% [markdown]` a markdown cell whose lines are comments
(`# text`). Edit the .py, then run

    python notebooks/build.py                 # every notebook
    python notebooks/build.py quickstart      # only these

Execution runs in a fresh temporary folder (files the notebooks write never land in the
repository) with a kernel started from this interpreter. `tests/test_notebooks.py` checks
that each .ipynb holds exactly the cells of its .py and that it runs without error.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
KERNEL = "tinfluence-python"
CELL_TIMEOUT = 600


def read_script(path: Path) -> list[tuple[str, str]]:
    """Returns the cells of a percent-format script as `(kind, source)`, kind "code" or "markdown"."""
    cells, kind, lines = [], None, []

    def close():
        if kind is not None:
            text = "\n".join(lines).strip("\n")
            if kind == "markdown":
                text = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in text.splitlines())
            cells.append((kind, text))

    for line in Path(path).read_text().splitlines():
        if line.startswith("# %%"):
            close()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    close()
    return cells


def notebook_from_script(path: Path):
    """Returns an unexecuted notebook holding the cells of `path`."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
                for kind, src in read_script(path)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def kernel_dir(root: Path) -> Path:
    """Writes a kernel spec that starts `sys.executable` under `root/kernels/` and returns `root`.

    Point JUPYTER_PATH at `root` and run with `kernel_name=KERNEL`: the kernel is then this
    interpreter, whatever `python` on PATH is.
    """
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True, exist_ok=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tinfluence (this interpreter)", "language": "python"}))
    return root


def execute(nb, cwd: Path, *, timeout: int = CELL_TIMEOUT):
    """Executes `nb` in place in folder `cwd` with this interpreter's kernel; returns it."""
    previous = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(kernel_dir(Path(tempfile.mkdtemp(prefix="tinfluence-kernel-"))))
    try:
        kernelspec = dict(nb.metadata["kernelspec"])
        NotebookClient(nb, timeout=timeout, kernel_name=KERNEL, resources={"metadata": {"path": str(cwd)}}).execute()
        nb.metadata["kernelspec"] = kernelspec          # keep the portable "python3" in the saved file
    finally:
        if previous is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = previous
    return nb


def build(name: str) -> float:
    """Generates and executes `NAME.ipynb` from `NAME.py`; returns the execution time in seconds."""
    nb = notebook_from_script(HERE / f"{name}.py")
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as cwd:
        execute(nb, Path(cwd))
    seconds = time.perf_counter() - tic
    nbformat.write(nb, HERE / f"{name}.ipynb")
    return seconds


def scripts() -> list[str]:
    """Names of the notebook scripts in this folder (every .py but this one)."""
    return sorted(p.stem for p in HERE.glob("*.py") if p.name != Path(__file__).name)


if __name__ == "__main__":
    for name in sys.argv[1:] or scripts():
        print(f"{name}: executed in {build(name):.1f} s", flush=True)
