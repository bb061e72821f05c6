"""The on-disk gradient store: exact round trip, SIGKILL-resume bit for bit, 2 gloo processes = 1, scoring."""

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import store_job
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import exit_rank

import tinfluence as ti

JOB = Path(__file__).with_name("store_job.py")


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture(scope="module")
def job():
    loss, params, train, proj = store_job.setup()
    Z = ti.compressed_grads(loss, params, train, projector=proj)
    return loss, params, train, proj, Z


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_store_holds_the_compressed_gradients_in_its_dtype(job, dtype, tmp_path):
    loss, params, train, proj, Z = job
    store = store_job.write(tmp_path, dtype)
    assert store.complete and store.n == store_job.N and store.dim == proj.dim
    assert store.n_chunks == store_job.N // store_job.CHUNK_ROWS
    got = store.read()
    assert got.dtype == getattr(torch, dtype)
    torch.testing.assert_close(got.float(), Z.to(getattr(torch, dtype)).float(), rtol=0, atol=0)
    again = ti.io.open_store(tmp_path)
    assert torch.equal(again.read(), got)


@pytest.mark.slow
def test_store_survives_random_sigkills_bit_for_bit(tmp_path):
    reference = tmp_path / "reference"
    store_job.write(reference, "bfloat16")
    folder = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(JOB.parent.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    rng = random.Random(0)
    partial_kills = 0
    for _ in range(12):
        proc = subprocess.Popen([sys.executable, str(JOB), str(folder), "bfloat16"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout.readline().strip() == "ready"
        before = len(list(folder.glob("chunk-*.bin")))
        wanted = before + rng.randint(1, 4)
        deadline = time.time() + 30
        while proc.poll() is None and len(list(folder.glob("chunk-*.bin"))) < wanted and time.time() < deadline:
            time.sleep(rng.uniform(0, 0.01))
        time.sleep(rng.uniform(0, 0.02))          # somewhere inside the next chunk (or its write)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            done = len(list(folder.glob("chunk-*.bin")))
            partial_kills += 0 < done < store_job.N // store_job.CHUNK_ROWS
        if proc.returncode == 0 or partial_kills == 3:
            break
    assert partial_kills == 3
    store = store_job.write(folder, "bfloat16")    # resume to the end in this process
    assert store.complete
    assert not list(folder.glob(".*.tmp"))
    assert _files(folder) == _files(reference)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, folder):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        store_job.write(folder, "float32", group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.mark.slow
def test_two_gloo_processes_write_the_store_of_one(tmp_path):
    store_job.write(tmp_path / "one", "float32")
    # half the chunks already there from an interrupted single-process run: the two ranks finish it
    partial = tmp_path / "two"
    store_job.write(partial, "float32")
    for j in range(0, 24, 3):
        (partial / f"chunk-{j:06d}.bin").unlink()
    mp.spawn(_worker, args=(2, _free_port(), str(partial)), nprocs=2, join=True)
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_store_scores_equal_dense_influence_and_topk_is_exact(job, tmp_path):
    loss, params, train, proj, Z = job
    store = store_job.write(tmp_path, "float32")
    queries = ti.compressed_grads(loss, params, ti.take(train, slice(0, 7)), projector=proj)
    curv = ti.projected_curvature(store, damping=0.5)
    dense_curv = ti.projected_curvature(Z.float(), damping=0.5)
    torch.testing.assert_close(curv.inverses[0], dense_curv.inverses[0])
    Zs = Z.float()
    expected = torch.linalg.solve(Zs.T @ Zs / len(Zs) + 0.5 * torch.eye(Zs.shape[1], dtype=Zs.dtype), queries.float().T).T @ Zs.T / len(Zs)
    scores = store.influence(queries, curv)
    assert scores.shape == (7, store_job.N)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    per_token_shaped = store.influence(queries.reshape(7, 1, -1), curv)
    assert per_token_shaped.shape == (7, 1, store_job.N)
    for largest in (True, False):
        values, ids = store.topk(queries, 9, curv, largest=largest)
        top = scores.topk(9, dim=1, largest=largest)
        torch.testing.assert_close(values, top.values)
        assert torch.equal(ids, top.indices)
    plain = store.influence(queries)
    torch.testing.assert_close(plain, queries @ Zs.to(queries.dtype).T, rtol=1e-5, atol=1e-5 * float(plain.abs().max()))


def test_store_refuses_other_settings_and_reports_missing_chunks(job, tmp_path):
    loss, params, train, proj, _ = job
    store = store_job.write(tmp_path, "float32")
    other = ti.projector(params, k_in=4, k_out=4, generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match=r"ti.io.write_store: .* holds a store written with other settings"):
        ti.io.write_store(loss, params, train, projector=other, folder=tmp_path, chunk_rows=store_job.CHUNK_ROWS)
    with pytest.raises(ValueError, match=r"ti.io.write_store: `dtype`"):
        ti.io.write_store(loss, params, train, projector=proj, folder=tmp_path / "x", dtype="int8")
    (tmp_path / "chunk-000003.bin").unlink()
    with pytest.raises(ValueError, match=r"ti.io.GradientStore: 1 of 24 chunks .* missing \(first: 3\)"):
        store.influence(torch.zeros(1, proj.dim))
    with pytest.raises(ValueError, match=r"ti.io.GradientStore.topk: `k`"):
        store.topk(torch.zeros(1, proj.dim), 0)
    with pytest.raises(ValueError, match=r"ti.io.write_store: chunk 0 .* non-finite values in float16"):
        ti.io.write_store(lambda p, b: loss(p, b) * 1e30, params, train, projector=proj, folder=tmp_path / "h",
                          dtype="float16", chunk_rows=store_job.CHUNK_ROWS, progress=False)
