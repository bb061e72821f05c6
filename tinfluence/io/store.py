"""An on-disk store of compressed training gradients: written once, chunk by chunk, memory-mapped.

Layout of a store folder:

    index.json            {"n", "dim", "dtype", "chunk_rows", "n_chunks", "fingerprint", "params", "version"}
    chunk-000000.bin      rows [0, chunk_rows) as raw little-endian `dtype`, [rows, dim] row-major
    chunk-000001.bin      ...

The index is the one description of the store, written (atomically) before any chunk. Chunk j
holds the projected gradients of training examples `[j·chunk_rows, min((j+1)·chunk_rows, n))`.
Every chunk is written under a temporary name, flushed to disk and renamed into place, so a
process killed at any moment leaves each chunk complete or absent: a restarted `write_store`
computes exactly the absent chunks (nothing lost, nothing written twice), and the finished
files are byte-identical to an uninterrupted run's. The chunk layout does not depend on the
number of processes: with a `torch.distributed` group, rank r writes its contiguous share of
the chunk ids, so 1, 2 or 3 processes, and any interrupted mix of them, write the same bytes.

Scoring reads the chunks through `numpy.memmap` (float16, float32; bfloat16 as its raw 16-bit
words viewed by torch), one chunk in memory at a time, and meets them with the query side
(preconditioned once per query batch) in one matrix product per chunk.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .. import distributed as dd
from ..core import checks
from ..core import data as D
from ..core.tree import PyTree
from ..methods.compressed import ProjectedCurvature, Projector, compressed_kernel
from .scores import _atomic_write

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["GradientStore", "create_store", "write_store", "open_store"]

INDEX = "index.json"
VERSION = 1
DTYPES = {"float16": (torch.float16, np.float16), "bfloat16": (torch.bfloat16, np.uint16),
          "float32": (torch.float32, np.float32)}


def _dtype_name(where: str, dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"{where}: `dtype` must be one of {sorted(DTYPES)} (or the torch dtype); got {dtype!r}.")
    return name


class GradientStore:
    """A folder of chunked, memory-mapped projected gradients `[n, dim]` (see the module notes).

    Open an existing store with `ti.io.open_store(folder)`; `write_store` creates and fills one.

    Attributes:
      folder: the store's folder.
      n: rows (training examples).
      dim: columns (`projector.dim`).
      dtype: the torch dtype the rows are kept in.
      chunk_rows: rows per chunk file; `n_chunks` files in all.
      fingerprint: the projector's fingerprint (`Projector.fingerprint`), checked on resume.

    Cost: scoring (`influence`, `topk`) reads every chunk once per call, n·dim numbers, with
    one chunk in memory at a time.

    Examples:
      >>> import tempfile
      >>> proj = ti.projector(params, k_in=2, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> store = ti.io.write_store(loss, params, train, projector=proj, folder=tempfile.mkdtemp(), chunk_rows=16,
      ...                           progress=False)
      >>> q = torch.randn(3, proj.dim)
      >>> values, ids = store.topk(q, 4)
      >>> len(store), torch.equal(ids, store.influence(q).topk(4).indices)
      (60, True)
    """

    def __init__(self, folder: str | os.PathLike, index: dict):
        self.folder = Path(folder)
        self.index = index
        self.n, self.dim, self.chunk_rows = index["n"], index["dim"], index["chunk_rows"]
        self.n_chunks, self.fingerprint = index["n_chunks"], index["fingerprint"]
        self.dtype, self._np_dtype = DTYPES[index["dtype"]]

    def __repr__(self) -> str:
        return (f"GradientStore({str(self.folder)!r}, n={self.n}, dim={self.dim}, dtype={self.index['dtype']}, "
                f"chunks={self.n_chunks - len(self.missing())}/{self.n_chunks})")

    def __len__(self) -> int:
        return self.n

    def path(self, j: int) -> Path:
        """The file of chunk j."""
        return self.folder / f"chunk-{j:06d}.bin"

    def bounds(self, j: int) -> tuple[int, int]:
        """`(start, stop)` of the training examples in chunk j."""
        start = j * self.chunk_rows
        return start, min(start + self.chunk_rows, self.n)

    def missing(self) -> list[int]:
        """The chunk ids not yet written, in order."""
        return [j for j in range(self.n_chunks) if not self.path(j).exists()]

    @property
    def complete(self) -> bool:
        """True once every chunk is written."""
        return not self.missing()

    def write_chunk(self, j: int, rows: torch.Tensor) -> None:
        """Writes chunk j (rows `[stop - start, dim]`, cast to the store's dtype) atomically.

        Raises:
          ValueError: wrong shape, or values that are not finite after the cast (float16 overflows
            above 65504: use bfloat16 or float32).
          OSError: the file could not be written completely (nothing is left in its place).
        """
        self._write_chunk("ti.io.GradientStore.write_chunk", j, rows)

    def _write_chunk(self, where: str, j: int, rows: torch.Tensor) -> None:
        """`write_chunk` for the public call `where` (the name its errors give)."""
        start, stop = self.bounds(j)
        if tuple(rows.shape) != (stop - start, self.dim):
            raise ValueError(f"{where}: chunk {j} must be [{stop - start}, {self.dim}]; got {list(rows.shape)}.")
        cast = rows.detach().to("cpu", self.dtype).contiguous()
        if not bool(torch.isfinite(cast).all()):
            raise ValueError(f"{where}: chunk {j} (examples {start}..{stop - 1}) has non-finite values in "
                             f"{self.index['dtype']}; gradients overflowed or were not finite. Use dtype='bfloat16' "
                             "or 'float32', or check the loss.")
        raw = cast.view(torch.uint16) if self.dtype == torch.bfloat16 else cast
        data = raw.numpy().astype(np.dtype(self._np_dtype).newbyteorder("<"), copy=False).tobytes()
        _atomic_write(self.path(j), data, where)

    def chunk(self, j: int) -> torch.Tensor:
        """Chunk j as a `[rows, dim]` tensor mapped from its file (copy-on-write, the file is never changed).

        Raises:
          ValueError: the chunk has not been written.
        """
        start, stop = self.bounds(j)
        if not self.path(j).exists():
            raise ValueError(f"ti.io.GradientStore: chunk {j} of {self.folder} is missing; the store is incomplete "
                             "(run ti.io.write_store again with the same arguments to finish it).")
        array = np.memmap(self.path(j), dtype=np.dtype(self._np_dtype).newbyteorder("<"), mode="c",
                          shape=(stop - start, self.dim))
        t = torch.from_numpy(array)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t

    def chunks(self, *, progress: bool = False, desc: str = "store") -> Iterator[tuple[int, torch.Tensor]]:
        """Yields `(start, rows)` for every chunk in order (`rows` memory-mapped)."""
        missing = self.missing()
        if missing:
            raise ValueError(f"ti.io.GradientStore: {len(missing)} of {self.n_chunks} chunks of {self.folder} are missing "
                             f"(first: {missing[0]}); run ti.io.write_store again with the same arguments to finish it.")
        for j in tqdm(range(self.n_chunks), desc=desc, disable=not progress, leave=False):
            yield self.bounds(j)[0], self.chunk(j)

    def __iter__(self):
        return (rows for _, rows in self.chunks())

    def read(self) -> torch.Tensor:
        """The whole store `[n, dim]` in memory (for small stores and tests)."""
        return torch.cat([rows.clone() for rows in self])

    def _queries(self, where: str, queries: torch.Tensor, curvature) -> torch.Tensor:
        if not isinstance(queries, torch.Tensor) or queries.dim() < 1 or queries.shape[-1] != self.dim:
            got = list(queries.shape) if isinstance(queries, torch.Tensor) else type(queries).__name__
            raise ValueError(f"{where}: `queries` must be a tensor [..., {self.dim}] of projected query gradients "
                             f"(ti.compressed_grads with the store's projector); got {got}.")
        if curvature is None:
            return queries
        if not isinstance(curvature, ProjectedCurvature):
            raise TypeError(f"{where}: `curvature` must be a ti.ProjectedCurvature (ti.projected_curvature(store, ...)) "
                            f"or None; got {type(curvature).__name__}.")
        return curvature.query(queries)

    def influence(self, queries: torch.Tensor, curvature: ProjectedCurvature | None = None, *,
                  progress: bool = False) -> torch.Tensor:
        """Returns scores of every stored training example for every query, `[..., n]`.

        With `curvature`, `(1/n) q (Ĉ + λI)⁻¹ ĝ_z` (`ti.compressed_influence`'s score; positive =
        helpful); without, the projected gradient dot product `q · ĝ_z`. The query side is
        preconditioned once, then one matrix product per chunk.

        Args:
          queries: `[..., dim]` projected query gradients (any leading shape: `[n_query, dim]`,
            per-token `[n_query, T, dim]`).
          curvature: `ti.projected_curvature(store, damping=...)`, or None.
          progress: a tqdm bar over the chunks.

        Returns:
          `[..., n]` in the queries' (preconditioned) dtype.

        Notes:
          Memory: the result plus one chunk; cost n·dim per query row.
        """
        Q = self._queries("ti.io.GradientStore.influence", queries, curvature)
        flat = Q.reshape(-1, self.dim)
        parts = [flat @ rows.to(flat.dtype).mT for _, rows in self.chunks(progress=progress, desc="influence")]
        return torch.cat(parts, dim=-1).reshape(*Q.shape[:-1], self.n)

    def topk(self, queries: torch.Tensor, k: int, curvature: ProjectedCurvature | None = None, *,
             largest: bool = True, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the k highest (or lowest) scores per query and their training ids, never forming `[..., n]`.

        A running top-k over the chunks: each chunk's `[m, chunk_rows]` scores are merged with the
        best k so far. Scores are those of `influence`; ties keep the earlier id.

        Args:
          queries: `[..., dim]` projected query gradients.
          k: how many per query, 1 <= k <= n.
          curvature: as for `influence`.
          largest: True for the most helpful (highest scores), False for the most harmful.
          progress: a tqdm bar over the chunks.

        Returns:
          `(values, ids)`, each `[..., k]`, sorted (descending if `largest`, else ascending).

        Raises:
          ValueError: k out of range; bad queries.
        """
        where = "ti.io.GradientStore.topk"
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n:
            raise ValueError(f"{where}: `k` must be an int in [1, {self.n}]; got {k!r}.")
        Q = self._queries(where, queries, curvature)
        flat = Q.reshape(-1, self.dim)
        sign = 1.0 if largest else -1.0
        best_v = flat.new_full((flat.shape[0], 0), 0.0)
        best_i = torch.zeros((flat.shape[0], 0), dtype=torch.long, device=flat.device)
        for start, rows in self.chunks(progress=progress, desc="top-k"):
            s = sign * (flat @ rows.to(flat.dtype).mT)
            ids = torch.arange(start, start + rows.shape[0], device=flat.device).expand(flat.shape[0], -1)
            v, i = torch.cat([best_v, s], 1), torch.cat([best_i, ids], 1)
            top = v.topk(min(k, v.shape[1]), dim=1, sorted=True, largest=True)
            best_v, best_i = top.values, i.gather(1, top.indices)
        return (sign * best_v).reshape(*Q.shape[:-1], k), best_i.reshape(*Q.shape[:-1], k)


def _read_index(folder: Path) -> dict | None:
    path = folder / INDEX
    return json.loads(path.read_text()) if path.exists() else None


def open_store(folder: str | os.PathLike) -> GradientStore:
    """Opens the gradient store in `folder` (complete or not).

    Args:
      folder: a folder written by `write_store` or `create_store`.

    Returns:
      The `GradientStore`; `store.missing()` lists the chunks not yet written.

    Raises:
      ValueError: `folder` holds no store index.

    Cost: reads the index only; chunks are mapped when scored.

    Examples:
      >>> import tempfile
      >>> proj = ti.projector(params, k_in=2, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> folder = tempfile.mkdtemp()
      >>> store = ti.io.write_store(loss, params, train, projector=proj, folder=folder, progress=False)
      >>> torch.equal(ti.io.open_store(folder).read(), store.read())
      True
    """
    index = _read_index(Path(folder))
    if index is None:
        raise ValueError(f"ti.io.open_store: {folder} has no {INDEX}; write a store there with ti.io.write_store first.")
    return GradientStore(folder, index)


def _params_digest(params: dict) -> str:
    """A digest of the parameters' names, shapes, dtypes, sums and first 256 values.

    A resume with other parameters is refused without hashing every number.
    """
    h = hashlib.sha256()
    for name, p in params.items():
        flat = p.detach().reshape(-1)
        head = torch.cat([flat[:256], flat.sum(0, keepdim=True)]).to("cpu", torch.float64)
        h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        h.update(head.numpy().tobytes())
    return h.hexdigest()


def _create(where: str, folder: Path, index: dict) -> GradientStore:
    """Writes the index (or checks that an existing one matches) and returns the store."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    found = _read_index(folder)
    if found is None:
        text = json.dumps(index, indent=1)
        _atomic_write(folder / INDEX, text.encode(), where)
    elif found != index:
        differ = {k: (found.get(k), v) for k, v in index.items() if found.get(k) != v}
        raise ValueError(f"{where}: {folder} holds a store written with other settings {differ} (found, asked); "
                         "resume with the same projector, data size, dtype and chunk_rows, or use a new folder.")
    return GradientStore(folder, index)


def _create_store(where: str, folder, *, projector: Projector, params: dict, n: int, dtype="float32",
                  chunk_rows: int = 1024) -> GradientStore:
    """`create_store` for the public call `where` (the name its errors give)."""
    name = _dtype_name(where, dtype)
    checks.integer(where, "chunk_rows", chunk_rows, minimum=1)
    if not isinstance(projector, Projector):
        raise TypeError(f"{where}: `projector` must be a ti.Projector (from ti.projector); got {type(projector).__name__}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{where}: `n` must be an int >= 1; got {n!r}.")
    index = {"version": VERSION, "n": n, "dim": projector.dim, "dtype": name, "chunk_rows": chunk_rows,
             "n_chunks": -(-n // chunk_rows), "fingerprint": projector.fingerprint, "params": _params_digest(params)}
    return _create(where, Path(folder), index)


def create_store(folder: str | os.PathLike, *, projector: Projector, params: dict, n: int, dtype: str | torch.dtype = "float32",
                 chunk_rows: int = 1024) -> GradientStore:
    """Returns an empty (or partly written) store for n rows of `projector.dim`; writes its index.

    The building block of `write_store` for callers that fill the chunks themselves
    (`GradientStore.write_chunk(j, rows)` for every j in `store.missing()`). An existing index in
    `folder` must match (same projector, parameters, n, dtype, chunk_rows).

    Args:
      folder: the store's folder (created).
      projector: `ti.projector(params, ...)`; the rows are `projector.dim` wide.
      params: `dict[str, Tensor]`, the parameters the gradients are taken at (a digest is recorded).
      n: rows (training examples), an int >= 1.
      dtype: "float32", "bfloat16" or "float16" (or the torch dtype) for the stored rows.
      chunk_rows: rows per chunk file, an int >= 1.

    Returns:
      The `GradientStore` (`store.missing()` lists the chunks still to write).

    Raises:
      ValueError: bad `dtype`/`chunk_rows`/`n`; a store with other settings in `folder`.
      TypeError: `projector` is not a `ti.Projector`.

    Cost: O(1) disk (the index); a digest of at most 257 numbers per parameter tensor.

    Examples:
      >>> import tempfile
      >>> proj = ti.projector(params, k_in=2, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> store = ti.io.create_store(tempfile.mkdtemp(), projector=proj, params=params, n=60, chunk_rows=16)
      >>> store.n_chunks, store.missing()
      (4, [0, 1, 2, 3])
    """
    return _create_store("ti.io.create_store", folder, projector=projector, params=params, n=n, dtype=dtype,
                         chunk_rows=chunk_rows)


def write_store(loss: Callable, params: dict, train: PyTree, *, projector: Projector, folder: str | os.PathLike,
                dtype: str | torch.dtype = "float32",
                chunk_rows: int = 1024, chunk_size: int | None = None, group: ProcessGroup | None = None,
                progress: bool = True) -> GradientStore:
    """Writes the projected per-example gradients of `train` to a store in `folder`; returns it.

    Resumable: chunks already in `folder` (from a run killed at any point) are kept and only
    the missing ones are computed; the finished store is byte-identical to an uninterrupted
    run's. The index records the projector's fingerprint, a digest of the parameters, n, dim, dtype
    and chunk_rows; a resume with other settings is refused.

    Args:
      loss: `(params, batch) -> Tensor[B]`, one loss per example.
      params: `dict[str, Tensor]`.
      train: the WHOLE training set (a pytree with leading axis n) on every rank; each rank
        reads only the chunks it writes.
      projector: `ti.projector(params, ...)`; query gradients must use the same one.
      folder: the store's folder (created).
      dtype: "float32", "bfloat16" or "float16" (or the torch dtype) for the stored rows.
      chunk_rows: training examples per chunk file (the unit of resumption and of scoring).
      chunk_size: examples per vectorized backward inside a chunk (default: chunk_rows).
      group: a `torch.distributed` process group: rank r writes its contiguous share of the
        chunk ids (`ti.distributed.shard_bounds`), rank 0 writes the index first, and every rank
        returns once all chunks are written.
      progress: a tqdm bar over this rank's chunks.

    Returns:
      The complete `GradientStore`.

    Raises:
      ValueError: bad `dtype`/`chunk_rows`, a store with other settings in `folder`,
        non-finite rows (see `GradientStore.write_chunk`); errors of `ti.compressed_grads`.

    Cost: one projected-gradient pass over the missing chunks; disk n·dim·itemsize bytes;
    memory one chunk's gradients.

    Examples:
      >>> import tempfile
      >>> proj = ti.projector(params, k_in=2, k_out=2, generator=torch.Generator().manual_seed(0))
      >>> store = ti.io.write_store(loss, params, train, projector=proj, folder=tempfile.mkdtemp(), chunk_rows=16,
      ...                           progress=False)
      >>> store.complete, torch.equal(store.read(), ti.compressed_grads(loss, params, train, projector=proj).float())
      (True, True)
    """
    where = "ti.io.write_store"
    checks.chunk_size(where, chunk_size)
    n = D._count_examples(train, name="train", call=where)
    make = lambda: _create_store(where, folder, projector=projector, params=params, n=n, dtype=dtype,  # noqa: E731
                                 chunk_rows=chunk_rows)
    rank, world = (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))
    if rank == 0:
        store = make()
    if group is not None:
        dist.barrier(group)
        if rank != 0:
            store = make()
    lo, hi = dd.shard_bounds(store.n_chunks, rank, world)
    todo = [j for j in store.missing() if lo <= j < hi]
    kernel = compressed_kernel(loss, projector, where=where)
    for j in tqdm(todo, desc=f"store (rank {rank})" if group is not None else "store", disable=not progress):
        start, stop = store.bounds(j)
        chunk = D.take(train, slice(start, stop))
        rows = D.chunk_cat(lambda part: kernel(params, part), chunk, chunk_size or chunk_rows)
        store._write_chunk(where, j, rows)
    if group is not None:
        dist.barrier(group)
    return store
