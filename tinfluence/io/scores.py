"""Resumable score files: one `<id>.npy` per test point plus `index.jsonl`, written atomically.

A long run over many test points writes each finished test point's scores `[n_train]` to
its own file. Every file is written under a temporary name in the same folder, flushed to
disk (fsync) and renamed into place (`os.replace`), so a process killed at any moment
leaves either a complete file or none. A restarted run reads what is there and computes
only the missing test points; the files it writes are byte-identical to an uninterrupted
run's.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import data as D

__all__ = ["ScoreWriter", "influence_to_files", "read_scores"]

INDEX = "index.jsonl"


def _atomic_write(path: Path, write: Callable) -> None:
    """Writes `path` by `write(file)` to a temporary file in the same folder, fsync, os.replace."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ScoreWriter:
    """A folder of per-test-point score files `<id>.npy` and their `index.jsonl`.

    `index.jsonl` holds one JSON object per finished test point, in the order they were
    finished: `{"id": ..., "file": "<id>.npy", "n_train": ..., "dtype": ...}`. On opening,
    a torn last line (a writer killed mid-append) is dropped and score files missing from
    the index are added, so `done` is exactly the set of complete files.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink()
        self.entries = self._recover()

    def _recover(self) -> list:
        entries, seen = [], set()
        index = self.folder / INDEX
        lines = index.read_text().splitlines() if index.exists() else []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if (self.folder / entry["file"]).exists() and entry["id"] not in seen:
                entries.append(entry)
                seen.add(entry["id"])
        orphans = sorted(int(p.stem) for p in self.folder.glob("*.npy") if p.stem.isdigit() and int(p.stem) not in seen)
        for test_id in orphans:
            entries.append(self._entry(test_id, np.load(self.folder / f"{test_id}.npy")))
        text = "".join(json.dumps(e) + "\n" for e in entries)
        if not index.exists() or index.read_text() != text:
            _atomic_write(index, lambda f: f.write(text.encode()))
        return entries

    @staticmethod
    def _entry(test_id, scores: np.ndarray) -> dict:
        return {"id": test_id, "file": f"{test_id}.npy", "n_train": int(scores.shape[0]), "dtype": str(scores.dtype)}

    @property
    def done(self) -> set:
        """The ids whose score files are complete."""
        return {e["id"] for e in self.entries}

    def write(self, test_id, scores: torch.Tensor) -> None:
        """Writes `<test_id>.npy` (the `[n_train]` scores) atomically, then appends its index line."""
        array = scores.detach().cpu().numpy()
        _atomic_write(self.folder / f"{test_id}.npy", lambda f: np.save(f, array, allow_pickle=False))
        entry = self._entry(test_id, array)
        with open(self.folder / INDEX, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.entries.append(entry)


def read_scores(folder, test_ids=None) -> torch.Tensor:
    """Returns the scores stored in `folder` as `[len(test_ids), n_train]` (default: index order)."""
    writer = ScoreWriter(folder)
    ids = [e["id"] for e in writer.entries] if test_ids is None else list(test_ids)
    missing = [i for i in ids if i not in writer.done]
    if missing:
        raise ValueError(f"ti.io.read_scores: no score file for test ids {missing[:10]} in {folder}; run ti.influence_to_files first.")
    return torch.stack([torch.from_numpy(np.load(Path(folder) / f"{i}.npy")) for i in ids])


def influence_to_files(loss: Callable, params, train, test, *, ihvp: Callable, out, test_ids=None,
                       chunk_size: int | None = None, block_size: int = 64, progress: bool = True, **options) -> Path:
    """Returns the folder `out`, after writing every test point's `ti.influence` scores to it.

    Test points are scored in fixed blocks of `block_size` (one `ihvp` call and one pass
    over the training gradients per block): block b is positions
    [b·block_size, (b+1)·block_size) of `test_ids`. A block whose files all exist is
    skipped, so a restarted run (same arguments) resumes where the last one stopped, and
    because blocks never change composition its files are byte-identical to an
    uninterrupted run's. File `<id>.npy` holds `ti.influence(...)[row]`, shape `[n_train]`
    (positive = helpful), dtype of `params`.

    Args:
      loss, params, train, test, ihvp: as for `ti.influence`.
      out: output folder (created if missing).
      test_ids: ints, the rows of `test` to score and the names of their files; default all.
      chunk_size: training examples per vectorized gradient computation.
      block_size: test points solved together per `ihvp` call.
      progress: show a tqdm bar over test points.
      **options: passed on to `ti.influence` (e.g. `measure`).

    Returns:
      `Path(out)`; read the scores with `ti.io.read_scores(out)`.

    Raises:
      ValueError: `block_size` < 1, or `test_ids` out of range or repeated.
    """
    from ..methods.influence import influence

    n_test = D.num_examples(test, name="test", where="ti.influence_to_files")
    ids = list(range(n_test)) if test_ids is None else [int(i) for i in test_ids]
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"ti.influence_to_files: `block_size` must be an int >= 1; got {block_size!r}.")
    if len(set(ids)) != len(ids) or any(not 0 <= i < n_test for i in ids):
        raise ValueError(f"ti.influence_to_files: `test_ids` must be distinct rows of `test` in [0, {n_test}); got {ids[:10]}...")
    writer = ScoreWriter(out)
    bar = tqdm(total=len(ids), initial=len(writer.done & set(ids)), desc="ti.influence_to_files", disable=not progress)
    for start in range(0, len(ids), block_size):
        block = ids[start:start + block_size]
        todo = [i for i in block if i not in writer.done]
        if not todo:
            continue
        scores = influence(loss, params, train, D.take(test, torch.tensor(block)), ihvp=ihvp, chunk_size=chunk_size, **options)
        for row, test_id in enumerate(block):
            if test_id in writer.done:
                continue
            writer.write(test_id, scores[row])
            bar.update(1)
    bar.close()
    return writer.folder
