"""Sharded runs over 2 and 3 CPU processes (gloo on 127.0.0.1) equal one process's numbers."""

import os
import socket
import sys
import time
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import tinfluence as ti

pytestmark = pytest.mark.slow   # spawns gloo process groups: the fast subset (-m "not slow") leaves it out

L2, DAMPING = 1e-2, 1e-3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss(params, batch):
    x, y = batch
    return F.cross_entropy(x @ params["weight"].T + params["bias"], y, reduction="none")


def _methods(params, train, test, group):
    """Every estimator, run on `train` (a shard when `group` is given)."""
    R = ti.objective(_loss, train, l2=L2, chunk_size=50, group=group)
    cg = ti.cg(ti.hvp(R, params), damping=DAMPING, tol=1e-12, maxiter=500)
    g = torch.Generator().manual_seed(3)
    lissa = ti.lissa(_loss, params, train, l2=L2, damping=0.5, depth=40, batch_size=16, generator=g, group=group)
    predict = lambda p, b: b[0] @ p["weight"].T + p["bias"]  # noqa: E731
    output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")  # noqa: E731
    ggn = ti.ggn_vp(predict, params, train, output_loss=output_loss, l2=L2, chunk_size=50, group=group)
    cand = torch.tensor([[0, 5, 119, 60], [1, 2, 3, 4], [100, 41, 40, 39], [7, 7, 80, 81], [118, 0, 59, 61]])
    ckpts = [(params, 0.5), (ti.tree.scale(0.9, params), 0.25)]
    return {
        "value": R(params),
        "hessian": ti.hessian(R, params),
        "hvp_nocache": ti.ravel(ti.hvp(R, params, cache=False)(ti.tree.map(torch.ones_like, params))),
        "ggn": ti.to_dense(ggn, params),
        "cg": ti.influence(_loss, params, train, test, ihvp=cg, group=group),
        "cg_local": ti.influence(_loss, params, train, test, ihvp=cg, group=group, gather=False),
        "candidates": ti.influence(_loss, params, train, test, ihvp=cg, candidates=cand, group=group),
        "direct": ti.influence(_loss, params, train, test, ihvp=ti.direct(ti.hessian(R, params), damping=DAMPING),
                               group=group),
        "lissa": ti.influence(_loss, params, train, test, ihvp=lissa, group=group),
        "tracin": ti.tracin(_loss, ckpts, train, test, group=group),
        "tracin_self": ti.tracin_self_influence(_loss, ckpts, train, group=group),
        "empirical": ti.empirical_if(_loss, params, train, test, group=group),
        "empirical_dirs": ti.empirical_if(_loss, params, train, test, directions=8,
                                          generator=torch.Generator().manual_seed(1), group=group),
        "grad_dot": ti.grad_dot(_loss, params, train, test, group=group),
        "grad_cos": ti.grad_cos(_loss, params, train, test, group=group),
    }


def _spawn(world, fn, args, out, *, timeout=60.0, deadline=60.0):
    """Runs `fn(rank, world, *args)` in `world` gloo processes (collective `timeout` in seconds); each rank's
    return value is saved to out/rankR.pt.

    A hard deadline: processes still running after `deadline` seconds are killed and the test fails.
    """
    context = mp.start_processes(_rank_main, args=(world, _free_port(), fn, args, str(out), timeout), nprocs=world,
                                 join=False, start_method="spawn")
    end = time.monotonic() + deadline
    while not context.join(timeout=1.0):
        if time.monotonic() > end:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} over {world} processes still running after {deadline} s (a hang)")
    paths = [os.path.join(out, f"rank{rank}.pt") for rank in range(world)]
    return [torch.load(path) if os.path.exists(path) else None for path in paths]   # None: the rank died


def exit_rank() -> None:
    """Ends a spawned rank whose group is destroyed without interpreter shutdown, where gloo can
    abort (SIGABRT) after a clean run (as the CLI ends)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _rank_main(rank, world, port, fn, args, out, timeout):
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    ti.distributed.init("gloo", timeout=timeout, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.save(fn(rank, world, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


def _worker(rank, world, port, params, train, test, out):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = _methods(params, ti.distributed.shard(train, rank, world), test, dist.group.WORLD)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    exit_rank()


@pytest.fixture(scope="module")
def small_lr(digits_lr):
    train = ti.take(digits_lr.train, slice(0, 120))
    test = ti.take(digits_lr.test, slice(0, 5))
    params = ti.minimize(ti.objective(_loss, train, l2=L2), ti.tree.zeros_like(digits_lr.params), gtol=1e-10,
                         newton_steps=5)
    return params, train, test, _methods(params, train, test, None)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_runs_equal_one_process(small_lr, world, tmp_path):
    params, train, test, expected = small_lr
    mp.spawn(_worker, args=(world, _free_port(), params, train, test, str(tmp_path)), nprocs=world, join=True)
    bounds = [ti.distributed.shard_bounds(120, r, world) for r in range(world)]
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, value in expected.items():
            if name == "cg_local":
                start, stop = bounds[rank]
                value = value[:, start:stop]
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-10 * float(value.abs().max()),
                                       msg=lambda m, name=name, rank=rank: f"{name} (rank {rank}): {m}")


def test_shards_are_contiguous_in_rank_order():
    data = (torch.arange(10.0), torch.arange(10))
    parts = [ti.distributed.shard(data, r, 3) for r in range(3)]
    assert [len(p[0]) for p in parts] == [4, 3, 3]
    assert torch.equal(torch.cat([p[0] for p in parts]), data[0])


def test_shard_rejects_bad_rank_and_tiny_data():
    with pytest.raises(ValueError, match=r"ti.distributed.shard: `rank` must be an int in \[0, 2\); got 2"):
        ti.distributed.shard(torch.zeros(5), 2, 2)
    with pytest.raises(ValueError, match="ti.distributed.shard: `world` must be an int >= 1; got 0"):
        ti.distributed.shard(torch.zeros(5), 0, 0)
    with pytest.raises(ValueError, match="ti.distributed.shard: `data` has 2 examples, fewer than world=3"):
        ti.distributed.shard(torch.zeros(2), 0, 3)


def test_minimize_rejects_a_process_group_objective(digits_lr):
    grouped = ti.Objective(loss=digits_lr.loss, data=digits_lr.train, l2=0.0, chunk_size=None, n=1000, group=object())
    with pytest.raises(ValueError, match="ti.minimize: `f` is an objective over a process group"):
        ti.minimize(grouped, digits_lr.params)


# --- self-influence over uneven shards: every collective solve gets the same right-hand sides ----------------

UNEVEN = {2: [0, 75, 121], 3: [0, 50, 71, 121]}   # shard bounds: chunk counts differ between ranks


def _self_influence_solvers(params, train, scale, group):
    """`ti.self_influence` with every solver on `train` (a shard with a group); 48 right-hand sides per solve."""
    R = ti.objective(_loss, train, l2=L2, group=group)
    lissa = ti.lissa(_loss, params, train, l2=L2, damping=0.5, scale=scale, depth=40, batch_size=16,
                     generator=torch.Generator().manual_seed(5), group=group)
    solvers = {"direct": ti.direct(ti.hessian(R, params), damping=DAMPING),
               "cg": ti.cg(ti.hvp(R, params), damping=DAMPING, tol=1e-12, maxiter=500),
               "lissa": lissa}
    return {name: ti.self_influence(_loss, params, train, ihvp=ihvp, chunk_size=48, group=group)
            for name, ihvp in solvers.items()}


def _sharded_self_influence(rank, world, params, train, scale):
    start, stop = UNEVEN[world][rank], UNEVEN[world][rank + 1]
    return _self_influence_solvers(params, ti.take(train, slice(start, stop)), scale, dist.group.WORLD)


@pytest.fixture(scope="module")
def lr121(digits_lr):
    """121 training points (shards of 75/46 and 50/21/50), the optimum, LiSSA's scale and the 1-process scores."""
    train = ti.take(digits_lr.train, slice(0, 121))
    params = ti.minimize(ti.objective(_loss, train, l2=L2), ti.tree.zeros_like(digits_lr.params), gtol=1e-10,
                         newton_steps=5)
    scale = 4 * float(torch.linalg.eigvalsh(ti.hessian(ti.objective(_loss, train, l2=L2), params)).max())
    return params, train, scale, _self_influence_solvers(params, train, scale, None)


def test_one_process_self_influence_equals_dense_reference(lr121):
    """Ground truth: diag(G (H + λI)⁻¹ Gᵀ) / n with H from torch.autograd.functional.hessian."""
    params, train, _, got = lr121
    flat = ti.ravel(params)
    R = lambda x: _loss(ti.tree.unravel(x, params), train).mean() + L2 / 2 * x.pow(2).sum()  # noqa: E731
    H = torch.autograd.functional.hessian(R, flat) + DAMPING * torch.eye(flat.numel())
    G = ti.ravel(ti.per_example_grads(_loss, params, train), batch_ndim=1)
    expected = (G * torch.linalg.solve(H, G.T).T).sum(1) / 121
    for name in ("direct", "cg"):
        torch.testing.assert_close(got[name], expected, rtol=1e-9, atol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_self_influence_equals_one_process_for_every_solver(lr121, world, tmp_path):
    params, train, scale, expected = lr121
    for rank, got in enumerate(_spawn(world, _sharded_self_influence, (params, train, scale), tmp_path)):
        for name, value in expected.items():
            torch.testing.assert_close(got[name], value, rtol=1e-10, atol=0,
                                       msg=lambda m, name=name, rank=rank: f"{name} (rank {rank}): {m}")


# --- the ranks must agree on what is replicated ---------------------------------------------------------------

def _mismatched_calls(rank, world, params, train, test):
    """Each group call with rank 1 holding other parameters or test points; returns the messages raised."""
    group = dist.group.WORLD
    shard = ti.distributed.shard(train, rank, world)
    nudged = {**params, "bias": params["bias"] + torch.eye(10)[3] * 1e-9} if rank == 1 else params
    reordered = ti.take(test, torch.tensor([1, 0, 2, 3, 4])) if rank == 1 else test
    R = ti.objective(_loss, shard, l2=L2, group=group)
    ihvp = ti.direct(ti.hessian(R, params), damping=DAMPING)
    predict = lambda p, b: b[0] @ p["weight"].T + p["bias"]  # noqa: E731
    output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")  # noqa: E731
    calls = {
        "influence_test": lambda: ti.influence(_loss, params, shard, reordered, ihvp=ihvp, group=group),
        "influence_params": lambda: ti.influence(_loss, nudged, shard, test, ihvp=ihvp, group=group),
        "self_influence": lambda: ti.self_influence(_loss, nudged, shard, ihvp=ihvp, group=group),
        "hvp": lambda: ti.hvp(R, nudged),
        "hvp_l2": lambda: ti.hvp(ti.objective(_loss, shard, l2=L2 * (1 + rank), group=group), params),
        "ggn_vp": lambda: ti.ggn_vp(predict, nudged, shard, output_loss=output_loss, l2=L2, group=group),
        "lissa": lambda: ti.lissa(_loss, params, shard, l2=L2, scale=10.0, depth=5,
                                  generator=torch.Generator().manual_seed(rank), group=group),
        "check_replicated": lambda: ti.distributed.check_replicated(group, params=nudged),
        "grad_dot": lambda: ti.grad_dot(_loss, params, shard, reordered, group=group),
        "grad_cos": lambda: ti.grad_cos(_loss, nudged, shard, test, group=group),
        "tracin": lambda: ti.tracin(_loss, [(nudged, 0.1)], shard, test, group=group),
        "tracin_projection": lambda: ti.tracin(_loss, [(params, 0.1)], shard, test, projection_dim=4,
                                               generator=torch.Generator().manual_seed(rank), group=group),
        "tracin_self": lambda: ti.tracin_self_influence(_loss, [(params, 0.1 * (1 + rank))], shard, group=group),
        "empirical_if": lambda: ti.empirical_if(_loss, params, shard, reordered, group=group),
        "empirical_if_sphere": lambda: ti.empirical_if(_loss, params, shard, test, directions=2,
                                                       generator=torch.Generator().manual_seed(rank), group=group),
    }
    messages = {}
    for name, call in calls.items():
        try:
            call()
        except ValueError as err:
            messages[name] = str(err)
    # a backend failure inside a public collective names that collective (each rank fails locally: nothing pairs)
    failing = mock.Mock(side_effect=RuntimeError("Connection closed by peer"))
    with mock.patch.object(dist, "all_reduce", failing), mock.patch.object(dist, "all_gather", failing):
        for name, call in {"all_reduce": lambda: ti.distributed.all_reduce(params, group),
                           "gather_rows": lambda: ti.distributed.gather_rows(test, torch.tensor([5, 5]), group)}.items():
            try:
                call()
            except ti.distributed.CollectiveError as err:
                messages[name] = str(err)
    return messages


def test_ranks_with_different_params_or_test_points_are_refused(small_lr, tmp_path):
    params, train, test, _ = small_lr
    for got in _spawn(2, _mismatched_calls, (params, train, test), tmp_path):
        expected = {"influence_test": ("ti.influence", "`test` differs from rank 0's on rank(s) [1]"),
                    "influence_params": ("ti.influence", "`params` differs from rank 0's on rank(s) [1]"),
                    "self_influence": ("ti.self_influence", "`params` differs from rank 0's on rank(s) [1]"),
                    "hvp": ("ti.hvp", "`params` differs from rank 0's on rank(s) [1]"),
                    "hvp_l2": ("ti.hvp", "`l2` differs from rank 0's on rank(s) [1]"),
                    "ggn_vp": ("ti.ggn_vp", "`params` differs from rank 0's on rank(s) [1]"),
                    "lissa": ("ti.lissa", "`generator` differs from rank 0's on rank(s) [1]"),
                    "check_replicated": ("ti.distributed.check_replicated", "`params` differs from rank 0's on rank(s) [1]"),
                    "grad_dot": ("ti.grad_dot", "`test` differs from rank 0's on rank(s) [1]"),
                    "grad_cos": ("ti.grad_cos", "`params` differs from rank 0's on rank(s) [1]"),
                    "tracin": ("ti.tracin", "`checkpoints` differs from rank 0's on rank(s) [1]"),
                    "tracin_projection": ("ti.tracin", "`generator` differs from rank 0's on rank(s) [1]"),
                    "tracin_self": ("ti.tracin_self_influence", "`checkpoints` differs from rank 0's on rank(s) [1]"),
                    "empirical_if": ("ti.empirical_if", "`test` differs from rank 0's on rank(s) [1]"),
                    "empirical_if_sphere": ("ti.empirical_if", "`generator` differs from rank 0's on rank(s) [1]")}
        collectives = ("all_reduce", "gather_rows")
        assert set(got) == set(expected) | set(collectives)
        for name, (where, what) in expected.items():
            assert got[name].startswith(f"{where}: with `group`, every rank must pass the same"), got[name]
            assert what in got[name], got[name]
        for name in collectives:
            assert got[name].startswith(f"ti.distributed.{name}: a collective over the process group failed on rank"), got[name]
            assert "Connection closed by peer" in got[name], got[name]


# --- a dead or stalled peer gives a bounded wait and a clear error --------------------------------------------

def _stalled_influence(rank, world, params, train, test, fault, timeout):
    """Rank 1 stalls (sleeps) or dies instead of joining; rank 0 reports what it got and how long it took."""
    if rank == 1:
        if fault == "dies":
            os._exit(0)
        time.sleep(3 * timeout)
        return None
    shard = ti.distributed.shard(train, rank, world)
    ihvp = ti.direct(ti.hessian(ti.objective(_loss, shard, l2=L2), params))
    tic = time.monotonic()
    try:
        ti.influence(_loss, params, shard, test, ihvp=ihvp, group=dist.group.WORLD)
    except ti.distributed.CollectiveError as err:
        return {"message": str(err), "seconds": time.monotonic() - tic}
    return {"message": "no error", "seconds": time.monotonic() - tic}


@pytest.mark.parametrize("fault", ["stalls", "dies"])
def test_a_stalled_or_dead_peer_raises_within_the_timeout(small_lr, fault, tmp_path):
    params, train, test, _ = small_lr
    timeout = 2.0
    got = _spawn(2, _stalled_influence, (params, train, test, fault, timeout), tmp_path, timeout=timeout,
                 deadline=40.0)[0]
    assert got["message"].startswith("ti.influence: a collective over the process group failed on rank 0 of 2 "
                                     "after waiting"), got["message"]
    assert "another rank died, stalled past the group's timeout" in got["message"]
    assert "ti.distributed.init(timeout=...)" in got["message"]
    assert got["seconds"] < 3 * timeout, got


def test_init_rejects_a_bad_timeout():
    with pytest.raises(ValueError, match=r"ti.distributed.init: `timeout` must be a finite number of seconds > 0; "
                                         r"got -1"):
        ti.distributed.init("gloo", timeout=-1)
