"""Sharded runs over 2 and 3 CPU processes (gloo on 127.0.0.1) equal one process's numbers."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import tinfluence as ti

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


def _worker(rank, world, port, params, train, test, out):
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = _methods(params, ti.distributed.shard(train, rank, world), test, dist.group.WORLD)
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


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
                                       msg=lambda m, name=name: f"{name} (rank {rank}): {m}")


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
