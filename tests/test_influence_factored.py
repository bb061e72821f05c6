"""`ti.influence(factored=True)` against the dense `ti.influence`, and `ti.factored.dense_gram` against
the materialized per-example gradients.

Every model checks which parameters came out factored (so a pass cannot come from the dense
fallback alone); the dense `ti.influence` is itself checked against explicit matrices in
tests/test_influence.py.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tinfluence as ti
from tinfluence import factored as fa

L2, DAMPING = 1e-2, 1e-3


class PointwiseConv(nn.Module):
    """A Conv2d, then one Linear applied at each of its 4 output locations (T = 4), pooled, and a head."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix, self.head = nn.Conv2d(1, 8, 3), nn.Linear(8, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2).mT             # [B, 4, 8]
        return self.head(torch.tanh(self.mix(h)).mean(1))


class Tokens(nn.Module):
    """Embedding, one Linear per token (T = 3), mean pooling and a head."""

    def __init__(self, vocab=13, dim=8):
        super().__init__()
        self.emb, self.mix, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, 12), nn.Linear(12, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.emb(ids))).mean(1))


class Strided(nn.Module):
    """A strided, padded, dilated Conv2d (T = 2), a Conv1d over its output rows (T = 1) and a head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, stride=(2, 1), padding=(1, 2), dilation=(1, 2))
        self.line, self.head = nn.Conv1d(6, 5, 2, stride=2), nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(2)                 # [B, 6, 2]
        return self.head(torch.tanh(self.line(h)).mean(2))


def _problem(name):
    """(model, train, test, the weights that must come out factored) in float64, 40 train / 4 test."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    if name == "mlp":
        model, x = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)), torch.randn(44, 5, generator=g)
        factored = ["0.weight", "2.weight"]
    elif name == "conv":
        model, x = PointwiseConv(), torch.randn(44, 1, 4, 4, generator=g)
        factored = ["conv.weight", "head.weight", "mix.weight"]
    elif name == "strided":
        model, x = Strided(), torch.randn(44, 2, 4, 1, generator=g)
        factored = ["conv.weight", "head.weight", "line.weight"]
    elif name == "embedding":
        model, x = Tokens(), torch.randint(0, 13, (44, 3), generator=g)
        factored = ["emb.weight", "head.weight", "mix.weight"]
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3))
        x, factored = torch.randn(44, 5, generator=g), ["0.weight", "3.weight"]
    model = model.double()
    if x.is_floating_point():
        x = x.double()
    y = torch.randint(0, 3, (44,), generator=g)
    return model, (x[:40], y[:40]), (x[40:], y[40:]), factored


def _fitted(name):
    model, train, test, factored = _problem(name)
    apply, params = ti.functionalize(model)
    predict = lambda p, b: apply(p, b[0])  # noqa: E731
    output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")  # noqa: E731
    loss = lambda p, b: output_loss(predict(p, b), b)  # noqa: E731
    R = ti.objective(loss, train, l2=L2)
    params = ti.minimize(R, params, gtol=1e-6, newton_steps=3)
    return params, loss, predict, output_loss, R, train, test, factored


def _ihvps(params, loss, predict, output_loss, R, train):
    return {"direct": ti.direct(ti.hessian(R, params), damping=DAMPING),
            "cg": ti.cg(ti.hvp(R, params), damping=DAMPING, tol=1e-10, maxiter=500),
            "ekfac": ti.ekfac(loss, params, train, predict=predict, output_loss=output_loss, damping=DAMPING).ihvp}


def _close(got, expected, tol=1e-12):
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["mlp", "conv", "strided", "embedding", "layernorm"])
def test_factored_influence_equals_dense_for_every_solver(name):
    params, loss, predict, output_loss, R, train, test, factored = _fitted(name)
    kept = fa.factor_fn(loss, call="test", keep=fa.for_dense_products)(params, train)
    assert sorted([*kept.linear, *kept.embedding]) == factored
    cand = torch.tensor([[0, 39, 7], [3, 3, 12], [20, 1, 0], [38, 2, 9]])
    for solver, ihvp in _ihvps(params, loss, predict, output_loss, R, train).items():
        dense = ti.influence(loss, params, train, test, ihvp=ihvp, chunk_size=16)
        got = ti.influence(loss, params, train, test, ihvp=ihvp, chunk_size=16, factored=True)
        assert got.shape == (4, 40), solver
        _close(got, dense)
        _close(ti.influence(loss, params, train, test, ihvp=ihvp, candidates=cand, factored=True),
               dense.gather(1, cand))
        one = ti.take(test, slice(1, 2))                                  # k = 1: contracted first when T > 1
        _close(ti.influence(loss, params, train, one, ihvp=ihvp, factored=True),
               ti.influence(loss, params, train, one, ihvp=ihvp))


@pytest.mark.parametrize("name, chunk", [("mlp", 40), ("conv", 40), ("conv", 1), ("strided", 40), ("strided", 1),
                                         ("embedding", 7), ("embedding", 1)])
def test_dense_gram_equals_products_with_materialized_gradients(name, chunk):
    """Each contraction path (T = 1; T > 1 contracted first for k = 1; T > 1 formed for k > 1) against
    the inner products of a random dense stack with `ti.per_example_grads`."""
    params, loss, *_, train, _, _ = _fitted(name)
    factors = fa.factor_fn(loss, call="test", keep=fa.for_dense_products)(params, ti.take(train, slice(0, chunk)))
    assert "mix.weight" in factors.linear or name in ("mlp", "strided")
    assert {"conv": "conv.weight" in factors.linear, "strided": {"conv.weight", "line.weight"} <= factors.linear.keys(),
            "embedding": "emb.weight" in factors.embedding}.get(name, True)
    G = ti.per_example_grads(loss, params, ti.take(train, slice(0, chunk)))
    g = torch.Generator().manual_seed(1)
    for k in (1, 3):
        V = ti.tree.map(lambda p, k=k: torch.randn(k, *p.shape, generator=g, dtype=p.dtype), params)
        _close(fa.dense_gram(V, factors), ti.tree.pairwise_vdot(V, G))


def test_dense_gram_rejects_bad_arguments():
    params, loss, *_, train, _, _ = _fitted("mlp")
    factors = fa.grad_factors(loss, params, train)
    V = ti.tree.map(lambda p: p[None], params)
    with pytest.raises(TypeError, match=r"ti.factored.dense_gram: `factors` must be a GradFactors"):
        fa.dense_gram(V, ti.per_example_grads(loss, params, train))
    with pytest.raises(ValueError, match=r"ti.factored.dense_gram: `V` must hold .*only in factors: \['2.bias'\]"):
        fa.dense_gram({k: v for k, v in V.items() if k != "2.bias"}, factors)
    with pytest.raises(ValueError, match=r"ti.factored.dense_gram: `V\['0.weight'\]` must be \[k, 7, 5\]"):
        fa.dense_gram({**V, "0.weight": V["0.weight"][0]}, factors)


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_factored_value_raises(bad):
    params, loss, predict, output_loss, R, train, test, _ = _fitted("mlp")
    with pytest.raises(TypeError, match=r"ti.influence: `factored` must be True or False"):
        ti.influence(loss, params, train, test, ihvp=ti.direct(ti.hessian(R, params)), factored=bad)


def _sharded_factored(rank, world, params, train, test, cand):
    import torch.distributed as dist
    from test_distributed import _loss

    shard = ti.distributed.shard(train, rank, world)
    R = ti.objective(_loss, shard, l2=L2, group=dist.group.WORLD)
    cg = ti.cg(ti.hvp(R, params), damping=DAMPING, tol=1e-12, maxiter=500)
    kw = dict(ihvp=cg, group=dist.group.WORLD, factored=True)
    return {"all": ti.influence(_loss, params, shard, test, **kw),
            "local": ti.influence(_loss, params, shard, test, gather=False, **kw),
            "candidates": ti.influence(_loss, params, shard, test, candidates=cand, **kw)}


@pytest.mark.slow
def test_factored_influence_over_two_processes_equals_dense_one_process(digits_lr, tmp_path):
    from test_distributed import _loss, _spawn

    train, test = ti.take(digits_lr.train, slice(0, 60)), ti.take(digits_lr.test, slice(0, 3))
    params = ti.minimize(ti.objective(_loss, train, l2=L2), ti.tree.zeros_like(digits_lr.params), gtol=1e-10,
                         newton_steps=5)
    cg = ti.cg(ti.hvp(ti.objective(_loss, train, l2=L2), params), damping=DAMPING, tol=1e-12, maxiter=500)
    cand = torch.tensor([[0, 59, 30], [31, 29, 1], [5, 45, 5]])
    expected = ti.influence(_loss, params, train, test, ihvp=cg)
    for rank, got in enumerate(_spawn(2, _sharded_factored, (params, train, test, cand), tmp_path)):
        start, stop = ti.distributed.shard_bounds(60, rank, 2)
        _close(got["all"], expected, tol=1e-10)               # the sharded CG sums in another order
        _close(got["local"], expected[:, start:stop], tol=1e-10)
        _close(got["candidates"], expected.gather(1, cand), tol=1e-10)


def test_ekfac_influence_of_a_float32_model_equals_its_float64_computation():
    """The fit's per-chunk products run in the model's dtype, summed over chunks in float64: the float32
    scores (factored and dense) equal those of the same model and data in float64 to float32 accuracy."""
    g = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(600, 30, generator=g), torch.randint(0, 4, (600,), generator=g)
    output_loss = lambda o, b: F.cross_entropy(o, b[1], reduction="none")  # noqa: E731
    scores = {}
    for dtype in (torch.float32, torch.float64):
        apply, params = ti.functionalize(model.to(dtype))
        train, test = (x[:580].to(dtype), y[:580]), (x[580:].to(dtype), y[580:])
        predict = lambda p, b, apply=apply: apply(p, b[0])  # noqa: E731
        loss = lambda p, b, predict=predict: output_loss(predict(p, b), b)  # noqa: E731
        curv = ti.ekfac(loss, params, train, predict=predict, output_loss=output_loss, damping=1e-3, chunk_size=200)
        scores[dtype] = [ti.influence(loss, params, train, test, ihvp=curv.ihvp, factored=f).double()
                         for f in (True, False)]
    for got in scores[torch.float32]:
        expected = scores[torch.float64][0]
        assert float((got - expected).norm() / expected.norm()) < 1e-5
