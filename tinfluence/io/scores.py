"""Resumable score files: one `<id>.npy` per test point plus `index.jsonl`, written atomically and verified.

A long run over many test points writes each finished test point's scores `[n_train]` to
its own file. Every file is written under a temporary name in the same folder, flushed to
disk (fsync), read back and compared with what was meant to be written (size and sha256),
and only then renamed into place (`os.replace`), so a process killed at any moment, or a
write cut short (a full disk, a file-size limit), leaves either a complete file or none.
A restarted run reads what is there and computes only the missing test points; the files
it writes are byte-identical to an uninterrupted run's.

`index.jsonl` holds one line per finished test point, in the order they were finished:

    {"id": 5, "file": "5.npy", "run": "3f9c...", "n_train": 1000, "dtype": "float64", "bytes": 8128, "sha256": "..."}

`run` is the identity of the run that wrote the file (`run_identity`: a hash of the
parameters, the test data, `n_train`, the dtype, `block_size` and the caller's `meta`). A
score file counts as done only when its index line is complete and the file's size and
sha256 match the line; a file without its line (a run killed between the rename and the
append) or a damaged one is computed again. A folder whose index holds another run's
lines is refused and left as it is.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import optree
import torch
from tqdm.auto import tqdm

from ..core import data as D
from ..core.tree import PyTree

__all__ = ["ScoreWriter", "influence_to_files", "read_scores", "run_identity"]

INDEX = "index.jsonl"
_ENTRY = {"id": int, "file": str, "run": str, "n_train": int, "dtype": str, "bytes": int, "sha256": str}


def _hash_tree(h, tree) -> None:
    """Feeds the structure, dtypes, shapes and bytes of every tensor leaf of `tree` into the hash `h`."""
    leaves, spec = optree.tree_flatten(tree, namespace="")
    h.update(str(spec).encode())
    for leaf in leaves:
        leaf = leaf.detach().cpu().contiguous()
        h.update(f"{leaf.dtype}{tuple(leaf.shape)}".encode())
        h.update(leaf.reshape(-1).view(torch.uint8).numpy().tobytes())


def run_identity(params: PyTree, train: PyTree, test: PyTree, *, block_size: int, meta: object = None) -> str:
    """The identity of a score-file run: a hash of `params`, `test`, `n_train`, the dtype, `block_size` and `meta`.

    The training data enter by their size only (hashing them would cost a pass over all of
    them); `meta` (JSON) describes what no hash sees: the solver, its damping, `measure`.

    Args:
      params: the parameters (a pytree of tensors), hashed bytewise.
      train: the training set; only its size n_train enters.
      test: the test points (a pytree of tensors), hashed bytewise.
      block_size: test points per block, as for `ti.influence_to_files`.
      meta: JSON-serializable description of the rest of the run (default None).

    Returns:
      A str of 16 hexadecimal digits.

    Raises:
      ValueError, TypeError: `train` is not a data set; `meta` is not JSON-serializable.

    Cost: one sha256 pass over the bytes of `params` and `test`.

    Examples:
      >>> rid = ti.io.run_identity(params, train, test, block_size=64, meta={"solver": "direct"})
      >>> len(rid), rid == ti.io.run_identity(params, train, test, block_size=32, meta={"solver": "direct"})
      (16, False)
    """
    h = hashlib.sha256()
    _hash_tree(h, params)
    _hash_tree(h, test)
    h.update(json.dumps({"n_train": D._count_examples(train, name="train", call="ti.io.run_identity"),
                         "block_size": block_size, "meta": meta}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _index_entries(folder: Path, where: str) -> list[tuple[int, dict]]:
    """`(line number, entry)` of every complete line of `folder/index.jsonl`; reads only.

    A torn last line (a writer killed mid-append) is left out; any other line that is not an
    entry, or repeats a test id, raises ValueError naming the line.
    """
    index = folder / INDEX
    if not index.exists():
        return []
    raw = index.read_bytes()
    entries: list[tuple[int, dict]] = []
    seen: dict[int, int] = {}
    for number, line in enumerate(raw[:raw.rfind(b"\n") + 1].splitlines(), start=1):
        try:
            entry = json.loads(line)
            wrong = [k for k, kind in _ENTRY.items() if type(entry.get(k)) is not kind]
            if wrong or entry["file"] != f"{entry['id']}.npy":
                raise ValueError(f"fields {wrong or ['file']} missing or of the wrong type")
        except (ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{where}: {str(index)!r} line {number} is not a score-index entry ({err}): the folder "
                             "was written by another program or version, or edited. Pass a new `out` folder, or "
                             "delete this one to start over.") from None
        if entry["id"] in seen:
            raise ValueError(f"{where}: {str(index)!r} line {number} repeats test id {entry['id']} of line "
                             f"{seen[entry['id']]}: the index was edited. Pass a new `out` folder, or delete this one "
                             "to start over.")
        seen[entry["id"]] = number
        entries.append((number, entry))
    return entries


def _read_verified(folder: Path, entry: dict) -> tuple[bytes | None, str | None]:
    """`(bytes, None)` when the entry's file has the size and sha256 of its index line, else `(None, what is wrong)`."""
    path = folder / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, "is missing"
    if len(data) != entry["bytes"]:
        return None, f"holds {len(data)} bytes where its index line says {entry['bytes']} (truncated or overwritten)"
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        return None, "does not match the sha256 of its index line (corrupted)"
    return data, None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, data: bytes, where: str) -> None:
    """Writes `data` to a temporary file beside `path`, fsyncs, reads it back, and renames it into place.

    Raises:
      OSError: the write failed or came back short or different; no file is left behind.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())         # the permissions of a file made by open(), not mkstemp's 0600
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        written = Path(tmp).read_bytes()
        if written != data:
            raise OSError(f"{len(written)} of {len(data)} bytes came back"
                          + (", with other contents" if len(written) == len(data) else ""))
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(f"{where}: writing {str(path)!r} failed ({err}); nothing was counted as done. Check the free "
                      "space and the file-size limit (`ulimit -f`), then rerun the same call to resume.") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ScoreWriter:
    """A folder of per-test-point score files `<id>.npy` and their `index.jsonl` (format in the module docstring).

    Opening reads only: it checks that every index line belongs to this run (`run`,
    `n_train`, `dtype`) and verifies every file against its line. The first `write` prepares
    the folder: it creates it, removes temporary files of killed writers and cuts a torn last
    line off the index. A damaged file's line stays in place until the file is written again.
    A folder whose files are all done is never written.

    Args:
      folder: the output folder (created on the first write).
      run: the run's identity, from `run_identity`.
      n_train: training-set size, the length of every score row.
      dtype: dtype of the scores, e.g. torch.float64.

    Attributes:
      done: the ids whose files are complete and verified; `entries`: their index lines;
        `damaged`: `{id: what is wrong}` for the files that are not.

    Raises:
      ValueError: the index holds a line of another run, or a line that is not an entry.

    Cost: opening reads and hashes (sha256) every file listed in the index; each `write`
    writes, fsyncs and reads back one file of n_train numbers.

    Examples:
      >>> import tempfile
      >>> folder = tempfile.mkdtemp()
      >>> writer = ti.io.ScoreWriter(folder, run="0" * 16, n_train=60, dtype=torch.float64)
      >>> writer.write(3, torch.zeros(60, dtype=torch.float64))
      >>> ti.io.ScoreWriter(folder, run="0" * 16, n_train=60, dtype=torch.float64).done
      {3}
    """

    def __init__(self, folder: str | os.PathLike, *, run: str, n_train: int, dtype: torch.dtype):
        self._open("ti.io.ScoreWriter", folder, run, n_train, dtype)

    def _open(self, where: str, folder, run: str, n_train: int, dtype) -> None:
        """Reads and verifies the folder, for the public call `where` (the name every error of this writer gives)."""
        self.folder, self.where = Path(folder), where
        self.identity = {"run": run, "n_train": int(n_train), "dtype": _dtype_name(dtype)}
        self._lines, self.damaged = [], {}        # every index line in order; what is wrong with the damaged ones
        for number, entry in _index_entries(self.folder, where):
            self._check_identity(number, entry)
            problem = _read_verified(self.folder, entry)[1]
            if problem is not None:
                self.damaged[entry["id"]] = problem
            self._lines.append(entry)
        self._prepared = False

    def _check_identity(self, number: int, entry: dict) -> None:
        ours = self.identity
        if (entry["n_train"], entry["dtype"]) != (ours["n_train"], ours["dtype"]):
            differ = f"{entry['dtype']} scores over n_train={entry['n_train']}; this call gives {ours['dtype']} " \
                     f"scores over n_train={ours['n_train']}"
        elif entry["run"] != ours["run"]:
            differ = (f"scores of run {entry['run']}; this call is run {ours['run']} (other parameters, test data, "
                      "block_size or meta)")
        else:
            return
        raise ValueError(f"{self.where}: folder {str(self.folder)!r} holds another run's results ({INDEX} line "
                         f"{number}: {differ}). Pass a new `out` folder, or delete this one to start over.")

    @property
    def entries(self) -> list:
        """The index lines of the complete, verified score files, in index order."""
        return [e for e in self._lines if e["id"] not in self.damaged]

    @property
    def done(self) -> set:
        """The ids whose score files are complete and verified."""
        return {e["id"] for e in self.entries}

    def _rewrite_index(self) -> None:
        """Replaces the index, atomically, by its complete lines when it holds anything else (a torn last line).

        The lines of damaged files stay (they never verify, so they are never counted as done)
        until those files are recomputed in their places.
        """
        index = self.folder / INDEX
        text = "".join(json.dumps(e) + "\n" for e in self._lines).encode()
        if index.read_bytes() != text if index.exists() else text:
            _atomic_write(index, text, self.where)

    def _prepare(self) -> None:
        """Creates the folder, removes stale temporary files, and cuts a torn last line off the index."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink()
        self._rewrite_index()
        self._prepared = True

    def _append_index(self, entry: dict) -> None:
        try:
            with open(self.folder / INDEX, "ab") as f:
                f.write((json.dumps(entry) + "\n").encode())
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise OSError(f"{self.where}: appending to {str(self.folder / INDEX)!r} failed ({err}); {entry['file']} "
                          "is not counted as done. Check the free space and the file-size limit (`ulimit -f`), "
                          "then rerun the same call to resume.") from None

    def write(self, test_id: int, scores: torch.Tensor) -> None:
        """Writes `<test_id>.npy` (the `[n_train]` scores) atomically and verified, then records it in the index.

        A new test id's line is appended; a damaged file's line is put back in its place (the
        index is rewritten atomically), so the index reads as an uninterrupted run's.

        Args:
          test_id: an int, the file's name and its id in the index.
          scores: `[n_train]` of the writer's dtype.

        Raises:
          ValueError: `scores` of another shape or dtype.
          OSError: the file or the index line could not be written completely; nothing is
            counted as done, and the same call resumes.
        """
        array = scores.detach().cpu().numpy()
        if array.shape != (self.identity["n_train"],) or str(array.dtype) != self.identity["dtype"]:
            raise ValueError(f"{self.where}: scores of test id {test_id} must be [{self.identity['n_train']}] "
                             f"{self.identity['dtype']}; got {list(array.shape)} {array.dtype}.")
        if not self._prepared:
            self._prepare()
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        _atomic_write(self.folder / f"{test_id}.npy", data, self.where)
        entry = {"id": int(test_id), "file": f"{test_id}.npy", **self.identity, "bytes": len(data),
                 "sha256": hashlib.sha256(data).hexdigest()}
        if test_id in self.damaged:
            self._lines = [entry if e["id"] == test_id else e for e in self._lines]
            del self.damaged[test_id]
            self._rewrite_index()
        else:
            self._append_index(entry)
            self._lines.append(entry)


def _score_writer(where: str, folder, *, run: str, n_train: int, dtype) -> ScoreWriter:
    """`ScoreWriter` for the public call `where` (the name its errors give)."""
    writer = ScoreWriter.__new__(ScoreWriter)
    writer._open(where, folder, run, n_train, dtype)
    return writer


def read_scores(folder: str | os.PathLike, test_ids: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Returns the scores stored in `folder` as `[len(test_ids), n_train]` (default: index order); reads only.

    Every file is checked against its index line (size and sha256) before it is parsed.

    Args:
      folder: a folder written by `ti.influence_to_files` or a `ScoreWriter`.
      test_ids: ints, the test ids to read, in the order of the rows; default all, in index order.

    Returns:
      `[len(test_ids), n_train]` in the dtype the scores were written in, on the CPU.

    Raises:
      ValueError: a test id without a score file; a damaged file; a folder holding the lines
        of more than one run; an index line that is not an entry. The message says how to recover.

    Cost: one read and one sha256 of each file asked for; memory the result.

    Examples:
      >>> import tempfile
      >>> folder = tempfile.mkdtemp()
      >>> writer = ti.io.ScoreWriter(folder, run="0" * 16, n_train=60, dtype=torch.float64)
      >>> for i in (0, 1):
      ...     writer.write(i, torch.full((60,), float(i), dtype=torch.float64))
      >>> ti.io.read_scores(folder, [1, 0])[:, 0].tolist()
      [1.0, 0.0]
    """
    where, folder = "ti.io.read_scores", Path(folder)
    entries = {e["id"]: e for _, e in _index_entries(folder, where)}
    runs = sorted({e["run"] for e in entries.values()})
    if len(runs) > 1:
        raise ValueError(f"{where}: {str(folder)!r} holds the scores of {len(runs)} runs ({', '.join(runs)}): its "
                         "index was edited. Recompute into a new folder with ti.influence_to_files.")
    ids = list(entries) if test_ids is None else [int(i) for i in test_ids]
    missing = [i for i in ids if i not in entries]
    if missing:
        raise ValueError(f"{where}: no score file for test ids {missing[:10]} in {folder}; run ti.influence_to_files first.")
    rows = []
    for i in ids:
        data, problem = _read_verified(folder, entries[i])
        if data is None:
            raise ValueError(f"{where}: score file {str(folder / entries[i]['file'])!r} (test id {i}) {problem}. "
                             "Rerun ti.influence_to_files with the same arguments into this folder to recompute "
                             "it, then read again.")
        rows.append(torch.from_numpy(np.load(io.BytesIO(data), allow_pickle=False)))
    return torch.stack(rows)


def influence_to_files(loss: Callable, params: PyTree, train: PyTree, test: PyTree, *, ihvp: Callable, out: str | os.PathLike,
                       test_ids: Sequence[int] | torch.Tensor | None = None,
                       chunk_size: int | None = None, block_size: int = 64, meta: object = None, progress: bool = True,
                       **options: Any) -> Path:
    """Returns the folder `out`, after writing every test point's `ti.influence` scores to it.

    Test points are scored in fixed blocks of `block_size` (one `ihvp` call and one pass
    over the training gradients per block): block b is positions
    [b·block_size, (b+1)·block_size) of `test_ids`. A block whose files all exist and verify
    is skipped, so a restarted run (same arguments) resumes where the last one stopped, and
    because blocks never change composition its files are byte-identical to an
    uninterrupted run's. File `<id>.npy` holds `ti.influence(...)[row]`, shape `[n_train]`
    (positive = helpful), dtype of `params`. A damaged file (truncated, corrupted, missing)
    is computed again, with a warning naming it. A folder written by another run (see
    `run_identity`) is refused and left as it is; when every file is done, nothing is written.

    Args:
      loss: as for `ti.influence`.
      params: as for `ti.influence`.
      train: as for `ti.influence`.
      test: as for `ti.influence`.
      ihvp: as for `ti.influence`.
      out: output folder (created if missing).
      test_ids: ints, the rows of `test` to score and the names of their files; default all.
      chunk_size: training examples per vectorized gradient computation.
      block_size: test points solved together per `ihvp` call.
      meta: JSON-serializable description of what the run's hash cannot see (the solver and
        its settings, `measure`); part of the run's identity.
      progress: show a tqdm bar over test points.
      **options: passed on to `ti.influence` (e.g. `measure`).

    Returns:
      `Path(out)`; read the scores with `ti.io.read_scores(out)`.

    Raises:
      ValueError: `block_size` < 1, `test_ids` out of range or repeated, or `out` holding
        another run's results.
      OSError: a score file could not be written completely (full disk, file-size limit);
        the files finished before it stay done, and a rerun resumes.
      RuntimeWarning (a warning): a damaged score file found on resume is recomputed.

    Cost: `ti.influence`'s for every block not yet done (one `ihvp` call and one pass over
    the training gradients per block of `block_size` test points), plus one write, fsync,
    read-back and sha256 of n_train numbers per test point; memory one block's
    `[block_size, n_train]` scores.

    Examples:
      >>> import tempfile
      >>> ihvp = ti.direct(ti.hessian(ti.objective(loss, train, l2=1e-2), params))
      >>> out = ti.influence_to_files(loss, params, train, test, ihvp=ihvp, out=tempfile.mkdtemp(), progress=False)
      >>> torch.allclose(ti.io.read_scores(out), ti.influence(loss, params, train, test, ihvp=ihvp))
      True
    """
    from ..methods.influence import influence

    where = "ti.influence_to_files"
    n_test = D._count_examples(test, name="test", call=where)
    ids = list(range(n_test)) if test_ids is None else [int(i) for i in test_ids]
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"{where}: `block_size` must be an int >= 1; got {block_size!r}.")
    if len(set(ids)) != len(ids) or any(not 0 <= i < n_test for i in ids):
        raise ValueError(f"{where}: `test_ids` must be distinct rows of `test` in [0, {n_test}); got {ids[:10]}...")
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{where}: `meta` must be JSON-serializable with finite numbers; got {type(meta).__name__} "
                        f"({err}).") from None
    writer = _score_writer(where, out, run=run_identity(params, train, test, block_size=block_size, meta=meta),
                           n_train=D._count_examples(train, name="train", call=where),
                           dtype=optree.tree_leaves(params, namespace="")[0].dtype)
    for test_id, problem in writer.damaged.items():
        if test_id in ids:
            warnings.warn(f"{where}: score file {str(writer.folder / f'{test_id}.npy')!r} {problem}; recomputing it.",
                          RuntimeWarning, stacklevel=2)
    with tqdm(total=len(ids), initial=len(writer.done & set(ids)), desc=where, disable=not progress) as bar:
        for start in range(0, len(ids), block_size):
            block = ids[start:start + block_size]
            todo = [i for i in block if i not in writer.done]
            if not todo:
                continue
            scores = influence(loss, params, train, D.take(test, torch.tensor(block)), ihvp=ihvp, chunk_size=chunk_size,
                               **options)
            for row, test_id in enumerate(block):
                if test_id in writer.done:
                    continue
                writer.write(test_id, scores[row])
                bar.update(1)
    return writer.folder
