"""Factored per-example gradients of linear layers against per-example gradients from an autograd loop.

Every model checks which parameters came out factored (so a pass cannot come from the
fallback alone) and that the Gram matrix, the squared norms and the materialized gradients
equal those of `ti.testing.loop_grads` (one `torch.autograd.grad` call per example).
"""

import pytest
import torch
import torch.nn.functional as F
from models import build, cases
from torch import nn

import tinfluence as ti
from tinfluence import factored as fa
from tinfluence.testing import loop_grads


def _close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def _check_against_loop(loss, params, train, test, *, linear, dense):
    """F_test, F_train factored as named; gram, sq_norms and materialize equal the loop's."""
    F_train, F_test = fa.grad_factors(loss, params, train), fa.grad_factors(loss, params, test, chunk_size=3)
    assert (sorted(F_train.linear), sorted(F_train.dense)) == (sorted(linear), sorted(dense))
    G_train, G_test = loop_grads(loss, params, train), loop_grads(loss, params, test)
    _close(fa.gram(F_test, F_train), ti.tree.pairwise_vdot(G_test, G_train))
    _close(fa.sq_norms(F_train), ti.tree.pairwise_vdot(G_train, G_train).diagonal())
    for name, leaf in fa.materialize(F_train).items():
        _close(leaf, G_train[name])
    return F_train, F_test


def _cross_entropy(apply):
    return lambda p, batch: F.cross_entropy(apply(p, batch[0]), batch[1], reduction="none")


def test_functional_call_hands_the_parameter_tensors_to_linear():
    """The capture recognizes parameters by identity: F.linear must receive the very objects of `params`."""
    seen = []

    class Record(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                seen.append((args[1], args[2]))
            return func(*args, **(kwargs or {}))

    apply, params = ti.functionalize(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))
    with Record():
        apply(params, torch.randn(5, 4))
    assert [(w is params[f"{i}.weight"], b is params[f"{i}.bias"]) for (w, b), i in zip(seen, (0, 2))] == [(True, True)] * 2


def test_digits_lr_gram_equals_per_example_grads(digits_lr):
    d = digits_lr
    F_train, F_test = fa.grad_factors(d.loss, d.params, d.train), fa.grad_factors(d.loss, d.params, d.test)
    assert (sorted(F_train.linear), sorted(F_train.dense)) == (["weight"], ["bias"])
    assert F_train.linear["weight"][0].shape == (1000, 1, 64) and F_train.linear["weight"][1].shape == (1000, 1, 10)
    G_train, G_test = ti.per_example_grads(d.loss, d.params, d.train), ti.per_example_grads(d.loss, d.params, d.test)
    _close(fa.gram(F_test, F_train), ti.tree.pairwise_vdot(G_test, G_train))
    _close(fa.sq_norms(F_train), ti.tree.pairwise_vdot(G_train, G_train).diagonal())
    small = ti.take(d.train, slice(0, 20))
    _close(fa.gram(fa.grad_factors(d.loss, d.params, small), F_test),
           ti.tree.pairwise_vdot(loop_grads(d.loss, d.params, small), G_test))


def test_mlp_with_biases(digits_lr):
    torch.manual_seed(0)
    apply, params = ti.functionalize(nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)))
    train, test = ti.take(digits_lr.train, slice(0, 40)), ti.take(digits_lr.test, slice(0, 7))
    _check_against_loop(_cross_entropy(apply), params, train, test, linear=["0.weight", "2.weight"], dense=["0.bias", "2.bias"])


class Sequence(nn.Module):
    """Tokens `[B, L, 16]` -> two per-position linear layers -> mean over positions -> linear head.

    With L positions a layer factors when L²·(in + out) < in·out: `mid` (64 -> 64) for L <= 5,
    `up` (16 -> 64) for L = 2 but not L = 5 (its gradients are formed), the head (T = 1) always.
    """

    def __init__(self):
        super().__init__()
        self.up, self.mid, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.mid(torch.tanh(self.up(x)))).mean(1))


def test_sequence_axis_and_sides_with_other_lengths():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    apply, params = ti.functionalize(Sequence())
    train = (torch.randn(25, 5, 16, generator=g), torch.randint(0, 3, (25,), generator=g))
    test = (torch.randn(6, 2, 16, generator=g), torch.randint(0, 3, (6,), generator=g))
    biases = ["head.bias", "mid.bias", "up.bias"]
    F_train, F_test = _check_against_loop(_cross_entropy(apply), params, train, test,
                                          linear=["head.weight", "mid.weight"], dense=biases + ["up.weight"])
    assert F_train.linear["mid.weight"][0].shape == (25, 5, 64) and F_test.linear["mid.weight"][0].shape == (6, 2, 64)
    assert sorted(F_test.linear) == ["head.weight", "mid.weight", "up.weight"]   # the mixed pair is formed on one side


@pytest.mark.parametrize("name, linear", [("cnn", ["3.weight"]), ("tied", ["proj.weight"]), ("text_dict", ["head.weight"])])
def test_fallback_leaves_of_models_with_other_layers(name, linear):
    """The cnn's convolution (T = 16) and text_dict's embedding (T = 7) cost more as factors than
    formed, so their gradients are formed; the embedding tied to the output layer's weight is used
    by F.embedding too, so that weight falls back to vmap(grad)."""
    _, params, loss, data = build(next(c for c in cases(n=10) if c[0] == name))
    F_all = fa.grad_factors(loss, params, data)
    assert sorted(F_all.linear) == linear
    G = loop_grads(loss, params, data)
    _close(fa.gram(F_all, F_all), ti.tree.pairwise_vdot(G, G))
    _close(fa.sq_norms(F_all), ti.tree.pairwise_vdot(G, G).diagonal())
    for key, leaf in fa.materialize(F_all).items():
        _close(leaf, G[key])


class Shared(nn.Module):
    """`cell` is applied twice (to the input and to a buffer without an example axis); `proj`'s
    weight is also used transposed; `head`'s weight is read only for its shape."""

    def __init__(self):
        super().__init__()
        self.cell, self.proj, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.register_buffer("h0", torch.randn(16))

    def forward(self, x):
        h = torch.tanh(self.cell(x) + self.cell(self.h0))
        h = torch.tanh(self.proj(h)) @ self.proj.weight.t()
        return self.head(h[:, : self.head.weight.shape[1]])


def test_weight_in_two_linear_calls_and_weight_used_otherwise():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    apply, params = ti.functionalize(Shared())
    data = (torch.randn(20, 16, generator=g), torch.randint(0, 3, (20,), generator=g))
    F_all, _ = _check_against_loop(_cross_entropy(apply), params, data, ti.take(data, slice(0, 5)),
                                   linear=["cell.weight", "head.weight"], dense=["cell.bias", "head.bias", "proj.bias", "proj.weight"])
    assert F_all.linear["cell.weight"][0].shape == (20, 2, 16)   # the two calls, concatenated along T


def test_one_tensor_under_two_names_is_not_factored():
    torch.manual_seed(0)
    apply, params = ti.functionalize(nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5)))
    params = {**params, "2.weight": params["0.weight"]}
    data = (torch.randn(8, 5), torch.randint(0, 5, (8,)))
    _check_against_loop(_cross_entropy(apply), params, data, data, linear=[], dense=sorted(params))


@pytest.fixture(scope="module")
def mlp(digits_lr):
    """A 64-32-10 tanh MLP and three checkpoints along full-batch gradient descent."""
    torch.manual_seed(0)
    apply, params = ti.functionalize(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)))
    loss = _cross_entropy(apply)
    train, test = ti.take(digits_lr.train, slice(0, 50)), ti.take(digits_lr.test, slice(0, 9))
    grad = torch.func.grad(ti.objective(loss, train))
    ckpts = []
    for lr in (0.5, 0.3, 0.1):
        ckpts.append((params, lr))
        params = ti.tree.add_scaled(params, -lr, grad(params))
    return loss, ckpts, train, test


def test_methods_factored_equal_formed(mlp):
    loss, ckpts, train, test = mlp
    params = ckpts[-1][0]
    for method in (ti.grad_dot, ti.grad_cos):
        _close(method(loss, params, train, test, factored=True, chunk_size=16), method(loss, params, train, test))
    _close(ti.tracin(loss, ckpts, train, test, factored=True, chunk_size=16), ti.tracin(loss, ckpts, train, test))
    _close(ti.tracin_self_influence(loss, ckpts, train, factored=True, chunk_size=16), ti.tracin_self_influence(loss, ckpts, train))


def test_errors(mlp):
    loss, ckpts, train, test = mlp
    params = ckpts[0][0]
    with pytest.raises(TypeError, match=r"ti.factored.grad_factors: `params` must be a dict\[str, Tensor\] .*; got list"):
        fa.grad_factors(lambda p, b: loss(dict(zip(params, p)), b), list(params.values()), train)
    with pytest.raises(ValueError, match=r"ti.factored.grad_factors: `loss` must return one value per example"):
        fa.grad_factors(lambda p, b: loss(p, b).mean(), params, train)
    with pytest.raises(TypeError, match=r"ti.factored.grad_factors: `loss` must be a function"):
        fa.grad_factors(None, params, train)
    with pytest.raises(ValueError, match=r"ti.factored.grad_factors: `chunk_size` must be None or an int >= 1; got 0"):
        fa.grad_factors(loss, params, train, chunk_size=0)
    F_train = fa.grad_factors(loss, params, train)
    with pytest.raises(TypeError, match=r"ti.factored.gram: `F2` must be a GradFactors \(from ti.factored.grad_factors\); got dict"):
        fa.gram(F_train, ti.per_example_grads(loss, params, train))
    with pytest.raises(TypeError, match=r"ti.factored.sq_norms: `factors` must be a GradFactors .*; got dict"):
        fa.sq_norms({})
    with pytest.raises(TypeError, match=r"ti.factored.materialize: `factors` must be a GradFactors .*; got tuple"):
        fa.materialize(tuple(F_train))
    fewer = fa.GradFactors(F_train.linear, {k: v for k, v in F_train.dense.items() if k != "0.bias"}, F_train.embedding)
    with pytest.raises(ValueError, match=r"ti.factored.gram: `F1` and `F2` must hold the same parameters; "
                                         r"only in F1: \[\], only in F2: \['0.bias'\]"):
        fa.gram(fewer, F_train)
    with pytest.raises(TypeError, match=r"ti.grad_dot: `factored` must be True or False; got 'yes'"):
        ti.grad_dot(loss, params, train, test, factored="yes")
    with pytest.raises(TypeError, match=r"ti.tracin_self_influence: `factored` must be True or False; got 1"):
        ti.tracin_self_influence(loss, ckpts, train, factored=1)
    with pytest.raises(ValueError, match=r"ti.tracin: `projection_dim` needs the per-example gradients formed, "
                                         r"which `factored=True` avoids; use factored=True without projection_dim"):
        ti.tracin(loss, ckpts, train, test, factored=True, projection_dim=8, generator=torch.Generator())


def test_forward_that_changes_between_calls_is_refused(mlp):
    loss, ckpts, train, _ = mlp
    calls = []

    def fickle(p, batch):   # the first (plain, one-example) call runs the model twice, later calls once
        calls.append(1)
        return loss(p, batch) + (loss(p, batch) if len(calls) == 1 else 0)

    with pytest.raises(RuntimeError, match=r"ti.grad_cos: the forward made other F.linear, conv or embedding calls on the parameters under "
                                           r"vmap than in a plain call on one example \(expected 4 calls"):
        ti.grad_cos(fickle, ckpts[0][0], train, train, factored=True)


# ---------------------------------------------------------------- convolutions and embeddings

def _always(T, width, size):
    """A keep rule that keeps every factor, so the factored products are checked whatever their cost."""
    return True


class Conv(nn.Module):
    """One convolution (conv1d or conv2d, with the given options), tanh, flatten and a linear head."""

    def __init__(self, dim, options, spatial):
        super().__init__()
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.conv = conv(2, 3, (3,) if dim == 1 else (3, 2), **options)
        with torch.no_grad():
            width = self.conv(torch.zeros(1, 2, *spatial)).numel()
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class Bag(nn.Module):
    """An embedding (with the given options), tanh, mean over the tokens and a linear head."""

    def __init__(self, **options):
        super().__init__()
        self.emb, self.head = nn.Embedding(7, 4, **options), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids)).mean(1))


def _check_kept(loss, params, train, test, *, linear, embedding):
    """Every recognised weight kept as factors: gram, sq_norms, materialize and dense_gram equal the loop's."""
    kernel = fa.factor_fn(loss, call="test", keep=_always)
    F_train, F_test = kernel(params, train), kernel(params, test)
    assert (sorted(F_train.linear), sorted(F_train.embedding)) == (sorted(linear), sorted(embedding))
    G_train, G_test = loop_grads(loss, params, train), loop_grads(loss, params, test)
    _close(fa.gram(F_test, F_train), ti.tree.pairwise_vdot(G_test, G_train))
    _close(fa.sq_norms(F_train), ti.tree.pairwise_vdot(G_train, G_train).diagonal())
    for name, leaf in fa.materialize(F_train).items():
        _close(leaf, G_train[name])
    g = torch.Generator().manual_seed(3)
    for k in (1, 3):
        V = ti.tree.map(lambda p, k=k: torch.randn(k, *p.shape, generator=g, dtype=p.dtype), params)
        _close(fa.dense_gram(V, F_train), ti.tree.pairwise_vdot(V, G_train))
    formed = fa.grad_factors(loss, params, test)                      # the test side formed by the cost rule
    _close(fa.gram(formed, F_train), ti.tree.pairwise_vdot(G_test, G_train))
    return F_train


@pytest.mark.parametrize("dim, options, spatial", [
    (2, {}, (5, 4)),
    (2, {"stride": 2}, (6, 5)),
    (2, {"stride": (2, 1), "padding": (1, 0)}, (5, 4)),
    (2, {"padding": 1, "dilation": 2}, (6, 5)),
    (2, {"padding": "same", "dilation": (2, 1)}, (4, 4)),
    (2, {"padding": "valid", "bias": False}, (4, 3)),
    (2, {"padding": 1, "padding_mode": "reflect"}, (4, 3)),
    (1, {"stride": 2, "padding": 1}, (7,)),
    (1, {"dilation": 2, "padding": "same"}, (6,)),
])
def test_conv_weight_factored_on_its_patches(dim, options, spatial):
    """A convolution's weight is a linear layer on its im2col patches, T = the output positions."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    apply, params = ti.functionalize(Conv(dim, options, spatial).double())
    data = (torch.randn(9, 2, *spatial, generator=g, dtype=torch.float64), torch.randint(0, 3, (9,), generator=g))
    F_train = _check_kept(_cross_entropy(apply), params, data, ti.take(data, slice(0, 4)),
                          linear=["conv.weight", "head.weight"], embedding=[])
    A, G = F_train.linear["conv.weight"]
    assert A.shape[2:] == params["conv.weight"].shape[1:] and G.shape[2] == 3 and A.shape[1] == G.shape[1]


def test_grouped_convolution_falls_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double()
    apply, params = ti.functionalize(model)
    data = (torch.randn(6, 2, 3, 3, dtype=torch.float64), torch.randint(0, 3, (6,)))
    _check_kept(_cross_entropy(apply), params, data, data, linear=["3.weight"], embedding=[])


@pytest.mark.parametrize("options", [{}, {"padding_idx": 0}, {"padding_idx": -1}])
def test_embedding_weight_factored_on_its_indices(options):
    """Repeated tokens within and across examples, and the padding row's zero gradient."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    apply, params = ti.functionalize(Bag(**options).double())
    ids = torch.randint(0, 7, (10, 6), generator=g)
    ids[:, :2] = torch.tensor([0, 6])          # every example holds both padding candidates
    data = (ids, torch.randint(0, 3, (10,), generator=g))
    F_train = _check_kept(_cross_entropy(apply), params, data, ti.take(data, slice(0, 4)),
                          linear=["head.weight"], embedding=["emb.weight"])
    assert F_train.embedding["emb.weight"][0].shape == (10, 6) and F_train.embedding["emb.weight"][1].shape == (10, 6, 4)


def test_embedding_with_frequency_scaling_falls_back():
    """(`max_norm` renormalizes the table in place, which no per-example gradient under vmap allows.)"""
    torch.manual_seed(0)
    apply, params = ti.functionalize(Bag(scale_grad_by_freq=True).double())
    data = (torch.randint(0, 7, (6, 5)), torch.randint(0, 3, (6,)))
    _check_kept(_cross_entropy(apply), params, data, data, linear=["head.weight"], embedding=[])


class SmallCNN(nn.Module):
    """A strided, padded Conv2d at T = 2 positions and an embedding of 3 tokens, each below its cost rule."""

    def __init__(self):
        super().__init__()
        self.conv, self.emb = nn.Conv2d(6, 16, 3, stride=2, padding=1), nn.Embedding(30, 6)
        self.head = nn.Linear(32 + 6, 3)

    def forward(self, batch):
        x, ids = batch
        return self.head(torch.cat([torch.tanh(self.conv(x)).flatten(1), torch.tanh(self.emb(ids)).mean(1)], 1))


def test_methods_factored_equal_formed_for_conv_and_embedding():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    apply, params = ti.functionalize(SmallCNN().double())
    loss = lambda p, b: F.cross_entropy(apply(p, b[0]), b[1], reduction="none")  # noqa: E731
    data = ((torch.randn(30, 6, 2, 3, generator=g, dtype=torch.float64), torch.randint(0, 30, (30, 3), generator=g)),
            torch.randint(0, 3, (30,), generator=g))
    train, test = ti.take(data, slice(0, 24)), ti.take(data, slice(24, 30))
    factors = fa.grad_factors(loss, params, train)
    assert (sorted(factors.linear), sorted(factors.embedding)) == (["conv.weight", "head.weight"], ["emb.weight"])
    chunked, G = fa.grad_factors(loss, params, train, chunk_size=5), loop_grads(loss, params, train)
    assert sorted(chunked.embedding) == ["emb.weight"] and chunked.embedding["emb.weight"][2].shape == (24, 30, 0)
    _close(fa.gram(chunked, factors), ti.tree.pairwise_vdot(G, G))
    for method in (ti.grad_dot, ti.grad_cos):
        _close(method(loss, params, train, test, factored=True, chunk_size=10), method(loss, params, train, test))
    ckpts = [(params, 0.1), (ti.tree.map(lambda p: 0.9 * p, params), 0.2)]
    _close(ti.tracin(loss, ckpts, train, test, factored=True, chunk_size=10), ti.tracin(loss, ckpts, train, test))
